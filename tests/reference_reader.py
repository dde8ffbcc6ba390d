"""An independent reader of the wfactor family format, versions 1 to 3, written from ``spec/FORMAT.md`` alone.

It exists to show that the specification is complete: it imports only the Python standard library,
numpy and zstandard, and shares no code with the ``wfactor`` package.

API::

    fam = open_family("path/to/FAMILY")
    fam.members                 # list of member names, in manifest order
    fam.state_dict("member")    # {tensor name: np.ndarray}, in the member's manifest order

Dtypes of the returned arrays: F64 -> float64, F32 -> float32, F16 -> float16, I64 -> int64,
I32 -> int32, I16 -> int16, I8 -> int8, U8 -> uint8, BOOL -> bool, and **BF16 -> uint16**: numpy has
no bfloat16, so a BF16 tensor is returned as its raw 16-bit patterns (``np.uint16``); to get the
values, ``(a.astype(np.uint32) << 16).view(np.float32)``.

Every failure raises :class:`RefError`, whose ``code`` is one of the error codes of FORMAT.md section 10.

Readings chosen where FORMAT.md leaves room (see the report that came with this file):

* A zstd frame that declares no content size, or a size other than N*s, is ``limit`` (4.3); a corrupt,
  truncated or trailed frame is ``codec``.
* Breaking a rule of 4.1-4.3 (records, terms, parts, bases) is ``codec``; a part key that is not a
  tensor of the delta, a stray tensor or two records for one tensor is ``format`` (4.1, last paragraph).
* The tensor-name limit (7) applies to record names and manifest tensor names (1..1024 bytes) and the
  key limit to every safetensors header key (1..1280 bytes); a header entry holds exactly dtype, shape
  and data_offsets.
* The member's manifest ``tensors`` and the delta's records must describe the same tensors (same names,
  shapes and dtypes); otherwise ``format``.
* 5.1 is applied literally, with its step 0 shortcuts (a dense record is its values, byte for byte; a
  record without terms whose base has dtype T is the base view copied bytewise, also when the shapes
  differ), canonical NaNs after rounding to any T, and the BOOL rule of 5.2 for every BOOL result.
* Informative fields (``created_by``, ``backbone_origin``, ``source``, ``plan``, ``original_bytes``,
  a record's ``error``) must have the types of the tables; otherwise ``format`` (``codec`` in a record).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import numpy as np
import zstandard

__all__ = ["RefError", "RefFamily", "open_family", "read_safetensors", "SafetensorsFile", "READER_VERSION"]

READER_VERSION = 5

MIB64 = 64 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_DIMS = 8
MAX_ELEMENTS = 2**40
MAX_NAME_BYTES = 1024
MAX_KEY_BYTES = 1280
MAX_MEMBERS = 10_000
MAX_TERMS = 8
MEMBER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
ZSTD_MAGIC = 0xFD2FB528

# dtype name -> (size in bytes, numpy dtype of the returned array)
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "F64": (8, np.dtype("<f8")),
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),
    "I64": (8, np.dtype("<i8")),
    "I32": (4, np.dtype("<i4")),
    "I16": (2, np.dtype("<i2")),
    "I8": (1, np.dtype("i1")),
    "U8": (1, np.dtype("u1")),
    "BOOL": (1, np.dtype("?")),
    "F8_E4M3": (1, np.dtype("u1")),  # version 4: 8-bit floats as their bit patterns
    "F8_E5M2": (1, np.dtype("u1")),
    "U16": (2, np.dtype("<u2")),
    "U32": (4, np.dtype("<u4")),
    "U64": (8, np.dtype("<u8")),
}
# (exponent bits, mantissa bits, bias, saturating): E4M3 has no infinities and saturates (section 5.1)
F8_KINDS = {"F8_E4M3": (4, 3, 7, True), "F8_E5M2": (5, 2, 15, False)}
V4_DTYPES = {"F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
CODECS = {"dense", "lowrank", "sparse", "quant", "rescale", "requant"}
LAYOUTS = {"rows", "columns", "codes"}
ENCODINGS = {"raw", "zstd", "zstd_planes", "bitplanes"}


class RefError(Exception):
    """A reader failure; ``code`` is an error code of FORMAT.md section 10."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


# ----------------------------------------------------------------------------------------------------
# JSON (section 7: no duplicate keys; RFC 8259 JSON, so no NaN/Infinity constants)


def _loads(text: str | bytes, code: str, what: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise RefError(code, f"{what}: duplicate JSON key {k!r}")
            out[k] = v
        return out

    def bad_constant(name: str) -> Any:
        raise RefError(code, f"{what}: {name} is not JSON")

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RefError(code, f"{what}: not UTF-8 ({e})") from None
    try:
        return json.loads(text, object_pairs_hook=hook, parse_constant=bad_constant)
    except RefError:
        raise
    except (ValueError, RecursionError) as e:
        raise RefError(code, f"{what}: invalid JSON ({e})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_shape(shape: Any, code: str, what: str) -> list[int]:
    """A shape: a list of at most 8 non-negative ints with at most 2^40 elements (limits -> ``limit``)."""
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise RefError(code, f"{what}: invalid shape {shape!r}")
    if len(shape) > MAX_DIMS:
        raise RefError("limit", f"{what}: {len(shape)} dimensions > {MAX_DIMS}")
    if _prod(shape) > MAX_ELEMENTS:
        raise RefError("limit", f"{what}: more than 2^40 elements")
    return list(shape)


def _check_dtype(dtype: Any, code: str, what: str) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise RefError(code, f"{what}: unknown dtype {dtype!r}")
    return dtype


def _check_tensor_name(name: Any, code: str, what: str) -> str:
    if not isinstance(name, str):
        raise RefError(code, f"{what}: tensor name must be a string")
    n = len(name.encode("utf-8", "surrogatepass"))
    if not 1 <= n <= MAX_NAME_BYTES:
        raise RefError("limit", f"{what}: tensor name of {n} bytes (limit 1..{MAX_NAME_BYTES})")
    return name


# ----------------------------------------------------------------------------------------------------
# Safetensors (section 6)


class SafetensorsFile:
    """A parsed safetensors file held in memory: ``metadata``, ``entries`` (name -> (dtype, shape, begin,
    end)) in header order, and :meth:`array` to view a tensor as numpy (BF16 as uint16)."""

    def __init__(self, data: bytes, what: str = "file") -> None:
        self.what = what
        self.data = data
        size = len(data)
        if size < 8:
            raise RefError("not_safetensors", f"{what}: shorter than 8 bytes")
        n = int.from_bytes(data[:8], "little")
        if n > MIB64:
            raise RefError("not_safetensors", f"{what}: header length {n} > 64 MiB")
        if 8 + n > size:
            raise RefError("not_safetensors", f"{what}: header length {n} runs past the end of the file")
        header = _loads(data[8 : 8 + n], "not_safetensors", f"{what} header")
        if not isinstance(header, dict):
            raise RefError("not_safetensors", f"{what}: header is not a JSON object")
        self.metadata: dict[str, str] = {}
        if "__metadata__" in header:
            meta = header["__metadata__"]
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise RefError("not_safetensors", f"{what}: __metadata__ must map strings to strings")
            self.metadata = meta
        names = [k for k in header if k != "__metadata__"]
        if len(names) > MAX_TENSORS:
            raise RefError("limit", f"{what}: {len(names)} tensors > {MAX_TENSORS}")
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}
        for name in names:
            if not 1 <= len(name.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES:
                raise RefError("limit", f"{what}: a header key must have 1..{MAX_KEY_BYTES} UTF-8 bytes")
            e = header[name]
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                raise RefError("not_safetensors", f"{what}: tensor {name!r}: malformed entry")
            dtype = _check_dtype(e["dtype"], "not_safetensors", f"{what}: tensor {name!r}")
            shape = _check_shape(e["shape"], "not_safetensors", f"{what}: tensor {name!r}")
            offs = e["data_offsets"]
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)):
                raise RefError("not_safetensors", f"{what}: tensor {name!r}: bad data_offsets")
            begin, end = offs
            if end < begin or end - begin != _prod(shape) * DTYPES[dtype][0]:
                raise RefError("not_safetensors", f"{what}: tensor {name!r}: byte range does not match shape")
            self.entries[name] = (dtype, shape, begin, end)
        data_len = size - 8 - n
        pos = 0
        for _, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != pos:
                raise RefError("not_safetensors", f"{what}: tensor byte ranges are not contiguous")
            pos = end
        if pos != data_len:
            raise RefError("not_safetensors", f"{what}: tensors do not end exactly at the end of the file")
        self.data_start = 8 + n

    def array(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        np_dtype = DTYPES[dtype][1]
        a = np.frombuffer(self.data, dtype=np_dtype, count=_prod(shape), offset=self.data_start + begin)
        return a.reshape(shape)


def _backbone_file(data: bytes, what: str) -> SafetensorsFile:
    """A backbone file or shard (sections 2, 2.1): safetensors, kind 'backbone' if given, a known version."""
    st = SafetensorsFile(data, what)
    kind = st.metadata.get("wfactor.kind")
    if kind is not None and kind != "backbone":
        raise RefError("format", f"{what}: wfactor.kind is {kind!r}, not 'backbone'")
    if "wfactor.format_version" in st.metadata:
        _meta_version(st.metadata["wfactor.format_version"], what)
    return st


class _Shards:
    """The tensors of a sharded backbone (section 2.1), with the ``entries``/``array`` of one file."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}
        self.files: dict[str, SafetensorsFile] = {}

    def array(self, name: str) -> np.ndarray:
        return self.files[name].array(name)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, {name: array}) of a safetensors file, in header order; BF16 as uint16."""
    with open(path, "rb") as f:
        st = SafetensorsFile(f.read(), str(path))
    return st.metadata, {k: st.array(k) for k in st.entries}


# ----------------------------------------------------------------------------------------------------
# Floating-point helpers (section 5)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round F32 to BF16 (nearest, ties to even, overflow to infinity); NaN -> 0x7FC0. Returns uint16."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    lsb = (u >> np.uint64(16)) & np.uint64(1)
    rounded = ((u + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


def _f8_max(kind: str) -> float:
    e_bits, m_bits, bias, sat = F8_KINDS[kind]
    top = (1 << e_bits) - 1  # E4M3: the top exponent holds finite values but for mantissa 111 (NaN)
    if sat:
        return float((2 - 2 * 2.0**-m_bits) * 2.0 ** (top - bias))
    return float((2 - 2.0**-m_bits) * 2.0 ** (top - 1 - bias))


def _f8_to_f32(bits: np.ndarray, kind: str) -> np.ndarray:
    """8-bit float bit patterns -> float32 values (exact)."""
    e_bits, m_bits, bias, sat = F8_KINDS[kind]
    b = np.asarray(bits, dtype=np.uint8).astype(np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp = (b >> m_bits) & ((1 << e_bits) - 1)
    man = b & ((1 << m_bits) - 1)
    top = (1 << e_bits) - 1
    with np.errstate(over="ignore"):
        val = np.where(exp == 0, man * 2.0 ** (1 - bias - m_bits), (1 + man / 2.0**m_bits) * 2.0 ** (exp - bias))
    if sat:
        val = np.where((exp == top) & (man == (1 << m_bits) - 1), np.nan, val)
    else:
        val = np.where(exp == top, np.where(man == 0, np.inf, np.nan), val)
    return (sign * val).astype(np.float32)


def _f32_to_f8(x: np.ndarray, kind: str) -> np.ndarray:
    """Round float32 to an 8-bit float (section 5.1): nearest, ties to even; E4M3 saturates to +-448 (also
    infinities), E5M2 overflows to infinity; NaN -> 0x7F. Returns the uint8 bit patterns."""
    e_bits, m_bits, bias, sat = F8_KINDS[kind]
    with np.errstate(invalid="ignore", over="ignore"):
        return _f32_to_f8_bits(x, e_bits, m_bits, bias, sat, kind)


def _f32_to_f8_bits(x: np.ndarray, e_bits: int, m_bits: int, bias: int, sat: bool, kind: str) -> np.ndarray:
    a = np.abs(np.asarray(x, dtype=np.float64))
    neg = np.signbit(np.asarray(x, dtype=np.float32))
    finite = np.isfinite(a)
    safe = np.where(finite & (a > 0), a, 1.0)
    _m, ex = np.frexp(safe)  # safe = _m * 2**ex, _m in [0.5, 1)
    e = np.maximum(ex - 1, 1 - bias)  # the exponent whose quantum applies (subnormals share the smallest)
    quantum = np.ldexp(1.0, e - m_bits)
    q = np.rint(safe / quantum)  # round half to even
    val = np.where(finite & (a > 0), q * quantum, 0.0)
    mx = _f8_max(kind)
    over = (val > mx) | ~finite
    # the bit pattern of each (now representable) value
    v = np.where(over, mx, val)
    vs = np.where(v > 0, v, 1.0)
    _m2, ex2 = np.frexp(vs)
    e2 = ex2 - 1
    sub = e2 < 1 - bias
    man = np.where(sub, vs / 2.0 ** (1 - bias - m_bits), vs / np.ldexp(1.0, e2 - m_bits) - (1 << m_bits))
    expf = np.where(sub, 0, e2 + bias)
    bits = ((expf.astype(np.int64) << m_bits) | np.rint(man).astype(np.int64)).astype(np.int64)
    bits = np.where(v > 0, bits, 0)
    if not sat:  # E5M2: overflow (and infinity) is infinity
        bits = np.where(over, ((1 << e_bits) - 1) << m_bits, bits)
    bits = bits | np.where(neg, 0x80, 0)
    bits = np.where(np.isnan(np.asarray(x, dtype=np.float32)), 0x7F, bits)
    return bits.astype(np.uint8)


def _cast_c(a: np.ndarray, dtype: str, c: np.dtype) -> np.ndarray:
    """cast_C: the array ``a`` holding values of ``dtype`` (BF16 as uint16 bits, F8 as uint8 bits) as
    compute dtype ``c``."""
    if dtype == "BF16":
        return _bf16_to_f32(a).astype(c)
    if dtype in F8_KINDS:
        return _f8_to_f32(a, dtype).astype(c)
    return a.astype(c)


def _round_t(x: np.ndarray, t: str) -> np.ndarray:
    """round_T of section 5.1 step 3, from the compute dtype to T."""
    if t == "BF16":
        return _f32_to_bf16(x)
    if t in F8_KINDS:
        return _f32_to_f8(x, t)
    canonical = {
        "F64": (np.float64, np.uint64, 0x7FF8000000000000),
        "F32": (np.float32, np.uint32, 0x7FC00000),
        "F16": (np.float16, np.uint16, 0x7E00),
    }
    if t not in canonical:
        raise AssertionError(t)
    ftype, utype, nan = canonical[t]
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.ascontiguousarray(x.astype(ftype))
    bits = y.view(utype).copy()
    bits[np.isnan(y)] = utype(nan)
    return bits.view(ftype)


def _padded_view(b: np.ndarray, shape: list[int], dtype: np.dtype) -> np.ndarray:
    """Zeros of ``shape`` with the overlap with ``b`` copied from ``b`` (section 5.1 step 1)."""
    x = np.zeros(shape, dtype=dtype)
    sl = tuple(slice(0, min(bs, s)) for bs, s in zip(b.shape, shape))
    x[sl] = b[sl]
    return x


def _matrix_view(shape: list[int]) -> tuple[int, int]:
    if len(shape) >= 2:
        return shape[0], _prod(shape[1:])
    if len(shape) == 1:
        return 1, shape[0]
    return 1, 1


# ----------------------------------------------------------------------------------------------------
# Family (sections 1-5, 8, 9)


def _check_path(root_real: str, rel: Any, what: str) -> str:
    if not isinstance(rel, str) or rel == "":
        raise RefError("format", f"{what}: path must be a non-empty string")
    if "\\" in rel or "\0" in rel:
        raise RefError("format", f"{what}: path {rel!r} contains a backslash or NUL")
    for seg in rel.split("/"):
        if seg in ("", ".", ".."):
            raise RefError("format", f"{what}: path {rel!r} has an empty, '.' or '..' segment")
    full = os.path.realpath(os.path.join(root_real, *rel.split("/")))
    if os.path.commonpath([root_real, full]) != root_real:
        raise RefError("format", f"{what}: path {rel!r} leads outside the family")
    return full


def _check_fileref(root_real: str, ref: Any, what: str) -> dict[str, Any]:
    if not isinstance(ref, dict) or not {"path", "sha256", "size"} <= set(ref):
        raise RefError("format", f"{what}: FileRef needs path, sha256 and size")
    if not isinstance(ref["sha256"], str) or not SHA_RE.fullmatch(ref["sha256"]):
        raise RefError("format", f"{what}: sha256 must be 64 lowercase hex digits")
    if not _is_int(ref["size"]) or ref["size"] < 0:
        raise RefError("format", f"{what}: size must be a non-negative integer")
    return {"full": _check_path(root_real, ref["path"], what), "sha256": ref["sha256"], "size": ref["size"]}


def _check_size(ref: dict[str, Any], what: str) -> None:
    try:
        size = os.path.getsize(ref["full"])
    except FileNotFoundError:
        raise RefError("not_found", f"{what}: {ref['full']} does not exist") from None
    if size != ref["size"]:
        raise RefError("integrity", f"{what}: size {size} != {ref['size']} in the manifest")


def _read_checked(ref: dict[str, Any], what: str) -> bytes:
    _check_size(ref, what)
    with open(ref["full"], "rb") as f:
        data = f.read()
    if len(data) != ref["size"]:
        raise RefError("integrity", f"{what}: size {len(data)} != {ref['size']} in the manifest")
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise RefError("integrity", f"{what}: SHA-256 differs from the manifest")
    return data


def _version(v: Any, what: str) -> int:
    if not _is_int(v) or v < 1:
        raise RefError("format", f"{what}: invalid format_version {v!r}")
    if v > READER_VERSION:
        raise RefError("version", f"file is v{v}; this reader supports up to v{READER_VERSION}")
    return v


def _meta_version(v: Any, what: str) -> int:
    """A ``wfactor.format_version`` of ``__metadata__``: a decimal string without sign or leading zeros."""
    if not isinstance(v, str) or not re.fullmatch(r"[1-9][0-9]*", v):
        raise RefError("format", f"{what}: wfactor.format_version must be a positive decimal string, not {v!r}")
    return _version(int(v), what)


class _Member:
    def __init__(self, m: Any, root_real: str, i: int) -> None:
        what = f"manifest: members[{i}]"
        if not isinstance(m, dict) or not {"name", "delta", "tensors"} <= set(m):
            raise RefError("format", f"{what}: needs name, delta and tensors")
        name = m["name"]
        if not isinstance(name, str) or not MEMBER_RE.fullmatch(name):
            raise RefError("format", f"{what}: invalid member name {name!r}")
        self.name = name
        self.delta = _check_fileref(root_real, m["delta"], f"member {name!r}: delta")
        tensors = m["tensors"]
        if not isinstance(tensors, list):
            raise RefError("format", f"member {name!r}: tensors must be an array")
        if len(tensors) > MAX_TENSORS:
            raise RefError("limit", f"member {name!r}: {len(tensors)} tensors > {MAX_TENSORS}")
        self.tensors: list[tuple[str, list[int], str]] = []
        seen: set[str] = set()
        for t in tensors:
            if not isinstance(t, dict) or not {"name", "shape", "dtype"} <= set(t):
                raise RefError("format", f"member {name!r}: a tensor entry needs name, shape and dtype")
            tn = _check_tensor_name(t["name"], "format", f"member {name!r}")
            if tn in seen:
                raise RefError("format", f"member {name!r}: tensor {tn!r} listed twice")
            seen.add(tn)
            self.tensors.append(
                (
                    tn,
                    _check_shape(t["shape"], "format", f"{name}/{tn}"),
                    _check_dtype(t["dtype"], "format", f"{name}/{tn}"),
                )
            )
        for key, typ in (("original_bytes", int), ("source", dict), ("aux_files", list), ("plan", dict)):
            if key in m and not isinstance(m[key], typ):
                raise RefError("format", f"member {name!r}: {key} has the wrong type")
        if "original_bytes" in m and (not _is_int(m["original_bytes"]) or m["original_bytes"] < 0):
            raise RefError("format", f"member {name!r}: original_bytes must be a non-negative integer")
        for j, ref in enumerate(m.get("aux_files", [])):
            _check_fileref(root_real, ref, f"member {name!r}: aux_files[{j}]")


class RefFamily:
    """A family opened by the reference reader. See the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = os.fspath(path)
        if not os.path.isdir(root):
            raise RefError("not_found", f"{root} is not a directory")
        self.root = os.path.realpath(root)
        mpath = os.path.join(self.root, "wfactor.json")
        if not os.path.isfile(mpath):
            raise RefError("not_found", f"{mpath} does not exist")
        if os.path.getsize(mpath) > MIB64:
            raise RefError("limit", "wfactor.json is larger than 64 MiB")
        with open(mpath, "rb") as f:
            man = _loads(f.read(), "format", "wfactor.json")
        if not isinstance(man, dict):
            raise RefError("format", "wfactor.json is not a JSON object")
        if man.get("format") != "wfactor.family":
            raise RefError("format", "wfactor.json: format is not 'wfactor.family'")
        if "format_version" not in man:
            raise RefError("format", "wfactor.json: no format_version")
        self.format_version = _version(man["format_version"], "wfactor.json")
        if "created_by" in man and not isinstance(man["created_by"], str):
            raise RefError("format", "wfactor.json: created_by must be a string")
        if "backbone_origin" in man and not isinstance(man["backbone_origin"], dict):
            raise RefError("format", "wfactor.json: backbone_origin must be an object")
        if "backbone" not in man or "members" not in man:
            raise RefError("format", "wfactor.json: needs backbone and members")
        self.backbone_ref = _check_fileref(self.root, man["backbone"], "backbone")
        # Section 2.1 (version 2): a sharded backbone; ``backbone`` then names the shard list.
        self.shard_refs: list[dict[str, Any]] = []
        if "backbone_shards" in man:
            shards = man["backbone_shards"]
            if self.format_version < 2:
                raise RefError("format", "wfactor.json: backbone_shards needs format_version 2")
            if not isinstance(shards, list) or not 1 <= len(shards) <= MAX_MEMBERS:
                raise RefError("format", "wfactor.json: backbone_shards must be an array of 1..10000 FileRefs")
            for j, ref in enumerate(shards):
                r = _check_fileref(self.root, ref, f"backbone_shards[{j}]")
                r["path"] = ref["path"]
                self.shard_refs.append(r)
            if len({r["path"] for r in self.shard_refs} | {man["backbone"]["path"]}) != len(shards) + 1:
                raise RefError("format", "wfactor.json: backbone and backbone_shards must name distinct files")
        members = man["members"]
        if not isinstance(members, list):
            raise RefError("format", "wfactor.json: members must be an array")
        if len(members) > MAX_MEMBERS:
            raise RefError("limit", f"{len(members)} members > {MAX_MEMBERS}")
        self._members: dict[str, _Member] = {}
        for i, m in enumerate(members):
            mem = _Member(m, self.root, i)
            if mem.name in self._members:
                raise RefError("format", f"member name {mem.name!r} is not unique")
            self._members[mem.name] = mem
        # Section 9, reference behaviour: sizes on every open.
        _check_size(self.backbone_ref, "backbone")
        for j, r in enumerate(self.shard_refs):
            _check_size(r, f"backbone shard {j}")
        for mem in self._members.values():
            _check_size(mem.delta, f"member {mem.name!r}: delta")
        self._backbone: SafetensorsFile | None = None

    @property
    def members(self) -> list[str]:
        return list(self._members)

    # -- backbone -------------------------------------------------------------------------------------

    def backbone(self) -> SafetensorsFile:
        if self._backbone is None:
            data = _read_checked(self.backbone_ref, "backbone")
            if not self.shard_refs:
                self._backbone = _backbone_file(data, "backbone")
            else:  # section 2.1: the shard list, rebuilt from backbone_shards, then every shard
                lines = "".join(f"{r['sha256']}  {r['path']}\n" for r in self.shard_refs).encode("utf-8")
                if data != lines:
                    raise RefError("integrity", "backbone: the shard list differs from backbone_shards")
                union = _Shards()
                for j, r in enumerate(self.shard_refs):
                    st = _backbone_file(_read_checked(r, f"backbone shard {j}"), f"backbone shard {j}")
                    for name in st.entries:
                        if name in union.entries:
                            raise RefError("format", f"backbone: tensor {name!r} is in two shards")
                        union.entries[name] = st.entries[name]
                        union.files[name] = st
                self._backbone = union  # type: ignore[assignment]
            if self.format_version < 4 and any(e[0] in V4_DTYPES for e in self._backbone.entries.values()):
                raise RefError("format", "backbone: F8/U16/U32/U64 tensors need format_version 4")
        return self._backbone

    # -- delta ----------------------------------------------------------------------------------------

    def records(self, name: str) -> list[dict[str, Any]]:
        """The validated records of member ``name`` (after the checks of section 9)."""
        return self._open_delta(name)[1]

    def _open_delta(self, name: str) -> tuple[SafetensorsFile, list[dict[str, Any]]]:
        if name not in self._members:
            raise RefError("not_found", f"no member {name!r}")
        mem = self._members[name]
        what = f"delta of {name!r}"
        st = SafetensorsFile(_read_checked(mem.delta, what), what)
        meta = st.metadata
        if meta.get("wfactor.kind") != "delta":
            raise RefError("format", f"{what}: wfactor.kind is not 'delta'")
        version = _meta_version(meta.get("wfactor.format_version"), what)
        if version > self.format_version:
            raise RefError("format", f"{what}: a v{version} delta in a v{self.format_version} family")
        if not isinstance(meta.get("wfactor.backbone_sha256"), str) or not SHA_RE.fullmatch(
            meta["wfactor.backbone_sha256"]
        ):
            raise RefError("format", f"{what}: wfactor.backbone_sha256 must be 64 lowercase hex digits")
        if meta.get("wfactor.backbone_sha256") != self.backbone_ref["sha256"]:
            raise RefError(
                "backbone_mismatch",
                f"{what}: written for backbone {meta.get('wfactor.backbone_sha256')!r}, "
                f"the family's is {self.backbone_ref['sha256']}",
            )
        if "wfactor.records" not in meta:
            raise RefError("format", f"{what}: no wfactor.records")
        records = _loads(meta["wfactor.records"], "format", f"{what}: records")
        if not isinstance(records, list):
            raise RefError("format", f"{what}: records must be an array")
        if len(records) > MAX_TENSORS:
            raise RefError("limit", f"{what}: {len(records)} records > {MAX_TENSORS}")
        keys: set[str] = set()
        by_name: dict[str, dict[str, Any]] = {}
        for r in records:
            _validate_record(r, st, keys, what)
            if r["name"] in by_name:
                raise RefError("format", f"{what}: two records for {r['name']!r}")
            tied = r.get("same_as")
            if tied is not None:
                target = by_name.get(tied)  # must be an earlier record
                if (
                    target is None
                    or target.get("same_as") is not None
                    or (target["shape"], target["dtype"])
                    != (
                        r["shape"],
                        r["dtype"],
                    )
                ):
                    raise RefError("format", f"{what}: {r['name']!r}: bad same_as {tied!r}")
            by_name[r["name"]] = r
        if version < 3 and any(
            isinstance(part, dict) and part.get("encoding") == "bitplanes"
            for r in records
            for part in [r.get("residual")] + [p for t in r.get("terms") or [] for p in (t.get("parts") or {}).values()]
        ):
            raise RefError("format", f"{what}: a bitplanes part needs format version 3, the delta is v{version}")
        if version < 4 and any(
            r.get("dtype") in V4_DTYPES
            or any(isinstance(t, dict) and t.get("codec") == "rescale" for t in r.get("terms") or [])
            for r in records
        ):
            raise RefError(
                "format", f"{what}: an F8/U16/U32/U64 record or a rescale term needs version 4, the delta is v{version}"
            )
        if version < 5 and any(
            isinstance(t, dict) and t.get("codec") == "requant" for r in records for t in r.get("terms") or []
        ):
            raise RefError("format", f"{what}: a requant term needs version 5, the delta is v{version}")
        for r in records:  # section 4.2: a requant term's scales and groups are other records of the delta
            terms = r.get("terms") or []
            if not terms or terms[0]["codec"] != "requant":
                continue
            for key, kinds in (("scales", FLOATS), ("groups", {"I32", "I64"})):
                ref = terms[0]["params"].get(key)
                if ref is None:
                    continue
                o = by_name.get(ref)
                if o is not None and o.get("same_as") is not None:
                    o = by_name.get(o["same_as"])
                if o is None or o is r or o["dtype"] not in kinds or any(x["codec"] == "requant" for x in o["terms"]):
                    raise RefError("codec", f"{what}: {r['name']!r}: requant {key} {ref!r} is not a usable record")
        if keys != set(st.entries):
            stray = sorted(set(st.entries) - keys)[:5]
            raise RefError("format", f"{what}: tensors not named by any part: {stray}")
        # The manifest's tensor list and the records describe the same tensors.
        if set(by_name) != {t[0] for t in mem.tensors}:
            raise RefError("format", f"{what}: records and the manifest's tensors differ")
        for tn, shape, dtype in mem.tensors:
            r = by_name[tn]
            if r["shape"] != shape or r["dtype"] != dtype:
                raise RefError("format", f"{what}: {tn!r}: record and manifest disagree on shape/dtype")
        return st, [by_name[t[0]] for t in mem.tensors]

    # -- rebuild --------------------------------------------------------------------------------------

    def state_dict(self, name: str) -> dict[str, np.ndarray]:
        """Every tensor of member ``name``, rebuilt per section 5, in the member's manifest order.
        BF16 tensors are returned as ``np.uint16`` bit patterns."""
        st, records = self._open_delta(name)
        bb = self.backbone()  # hashed (section 9) before any backbone tensor is used
        by_name = {r["name"]: r for r in records}
        rebuilt = _Records(by_name, st, bb)
        return {r["name"]: rebuilt(r["name"]) for r in records}


class _Records:
    """Any record of one delta, rebuilt by name (a requant term's scales and groups, section 5.4)."""

    def __init__(self, by_name: dict[str, dict[str, Any]], st: SafetensorsFile, bb: SafetensorsFile) -> None:
        self.by_name, self.st, self.bb = by_name, st, bb

    def dtype_of(self, name: str) -> str:
        return str(self.by_name[name]["dtype"])

    def __call__(self, name: str) -> np.ndarray:
        r = self.by_name[name]
        src = self.by_name[r["same_as"]] if r.get("same_as") is not None else r  # tied weights (section 4.1)
        return _rebuild(src, self.st, self.bb, self)


def _part(p: Any, st: SafetensorsFile, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(p, dict) or not {"key", "dtype", "shape", "encoding"} <= set(p):
        raise RefError("codec", f"{what}: a part needs key, dtype, shape and encoding")
    key = p["key"]
    if not isinstance(key, str) or key == "":
        raise RefError("format", f"{what}: part key must be a non-empty string")
    if key in keys:
        raise RefError("codec", f"{what}: part key {key!r} used twice")
    keys.add(key)
    if key not in st.entries:
        raise RefError("format", f"{what}: part key {key!r} is not a tensor of the delta")
    dtype = _check_dtype(p["dtype"], "codec", f"{what}: part {key!r}")
    shape = _check_shape(p["shape"], "codec", f"{what}: part {key!r}")
    enc = p["encoding"]
    if not isinstance(enc, str) or enc not in ENCODINGS:
        raise RefError("codec", f"{what}: part {key!r}: unknown encoding {enc!r}")
    fdtype, fshape, _, _ = st.entries[key]
    if enc == "raw":
        if fdtype != dtype or fshape != shape:
            raise RefError("codec", f"{what}: raw part {key!r}: file tensor is {fdtype}{fshape}, not {dtype}{shape}")
    elif enc == "bitplanes":  # section 4.3: I8 values as b planes of bits, U8 [b, m, ceil(n/8)]
        m, n = _matrix_view(shape)
        if dtype != "I8":
            raise RefError("codec", f"{what}: bitplanes part {key!r} must have dtype I8, not {dtype}")
        if fdtype != "U8" or len(fshape) != 3 or fshape[1:] != [m, (n + 7) // 8] or not 2 <= fshape[0] <= 8:
            raise RefError("codec", f"{what}: bitplanes part {key!r}: file tensor is {fdtype}{fshape}")
    elif fdtype != "U8" or len(fshape) != 1:
        raise RefError("codec", f"{what}: {enc} part {key!r} must be a 1-D U8 tensor")
    return p


def _expect(p: dict[str, Any], dtypes: set[str] | str, shape: list[int], what: str) -> None:
    ok = p["dtype"] in dtypes if isinstance(dtypes, set) else p["dtype"] == dtypes
    if not ok or p["shape"] != shape:
        raise RefError("codec", f"{what}: part {p['key']!r} is {p['dtype']}{p['shape']}, expected {dtypes}{shape}")


def _int_param(params: dict[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    v = params.get(key)
    if not _is_int(v) or not lo <= v <= hi:
        raise RefError("codec", f"{what}: param {key}={v!r} outside [{lo}, {hi}]")
    return v


def _validate_record(r: Any, st: SafetensorsFile, keys: set[str], what: str) -> None:
    if not isinstance(r, dict) or not {"name", "shape", "dtype", "base"} <= set(r):
        raise RefError("codec", f"{what}: a record needs name, shape, dtype and base")
    name = _check_tensor_name(r["name"], "codec", what)
    what = f"{what}: {name!r}"
    shape = _check_shape(r["shape"], "codec", what)
    t = _check_dtype(r["dtype"], "codec", what)
    base = r["base"]
    if base is not None and not isinstance(base, str):
        raise RefError("codec", f"{what}: base must be a string or null")
    if not isinstance(r.get("error", {}), dict):
        raise RefError("codec", f"{what}: error must be an object")
    terms = r.setdefault("terms", [])
    if not isinstance(terms, list):
        raise RefError("codec", f"{what}: terms must be an array")
    if len(terms) > MAX_TERMS:
        raise RefError("limit", f"{what}: {len(terms)} terms > {MAX_TERMS}")
    residual = r.get("residual")
    m, n = _matrix_view(shape)
    codecs = []
    for k, term in enumerate(terms):
        tw = f"{what} term {k}"
        if not isinstance(term, dict) or "codec" not in term or "parts" not in term:
            raise RefError("codec", f"{tw}: a term needs codec and parts")
        codec = term["codec"]
        if not isinstance(codec, str) or codec not in CODECS:
            raise RefError("codec", f"{tw}: unknown codec {codec!r}")
        params = term.get("params", {})
        parts = term["parts"]
        if not isinstance(params, dict) or not isinstance(parts, dict):
            raise RefError("codec", f"{tw}: params and parts must be objects")
        roles = {
            "dense": {"values"},
            "lowrank": {"u", "v"},
            "sparse": {"indices", "values"},
            "quant": {"codes", "scales"},
            "rescale": {"scales"},
            "requant": {"correction"},
        }[codec]
        if set(parts) != roles:
            raise RefError("codec", f"{tw}: {codec} needs parts {sorted(roles)}, has {sorted(parts)}")
        ps = {role: _part(p, st, keys, tw) for role, p in parts.items()}
        if codec == "dense":
            _expect(ps["values"], t, shape, tw)
        elif codec == "lowrank":
            if len(shape) < 2:
                raise RefError("codec", f"{tw}: lowrank needs 2 or more dimensions")
            rank = _int_param(params, "rank", 1, min(m, n), tw)
            _expect(ps["u"], {"F16", "BF16", "F32"}, [m, rank], tw)
            _expect(ps["v"], {"F16", "BF16", "F32"}, [rank, n], tw)
        elif codec == "sparse":
            count = _int_param(params, "count", 0, m * n, tw)
            _expect(ps["indices"], "I64", [count], tw)
            _expect(ps["values"], {"F16", "BF16", "F32"}, [count], tw)
        elif codec == "rescale":
            _expect(ps["scales"], "F32", [m], tw)
        elif codec == "requant":  # section 4.2 (version 5)
            allowed = {"bits", "inputs", "group_size", "zero", "layout", "scales", "groups"}
            if not set(params) <= allowed:
                raise RefError("codec", f"{tw}: requant has unknown params {sorted(set(params) - allowed)}")
            b = _int_param(params, "bits", 1, 8, tw)
            n_in = _int_param(params, "inputs", 1, 1 << 40, tw)
            _int_param(params, "group_size", 1, n_in, tw)
            _int_param(params, "zero", 0, (1 << b) - 1, tw)
            layout = params.get("layout")
            if layout not in LAYOUTS:
                raise RefError("codec", f"{tw}: requant layout {layout!r}")
            if not isinstance(params.get("scales"), str) or not isinstance(params.get("groups", ""), str):
                raise RefError("codec", f"{tw}: requant scales/groups must be record names")
            if len(shape) != 2:
                raise RefError("codec", f"{tw}: a requant record is 2-D")
            rows = shape[1] if layout == "columns" else shape[0]
            w = -(-n_in * b // 32)
            want = {"rows": ("I32", [rows, w]), "columns": ("I32", [w, rows]), "codes": ("I8", [rows, n_in])}[layout]
            if (t, shape) != want:
                raise RefError("codec", f"{tw}: a requant record of layout {layout} must be {want}, not {t}{shape}")
            _expect(ps["correction"], "I8", [rows, n_in], tw)
        else:
            _int_param(params, "bits", 2, 8, tw)
            _expect(ps["codes"], "I8", [m, n], tw)
            _expect(ps["scales"], "F32", [m], tw)
        codecs.append(codec)
    if residual is not None:
        _expect(_part(residual, st, keys, f"{what} residual"), t, shape, f"{what} residual")
    # Rules of section 4.1.
    same_as = r.get("same_as")
    if same_as is not None:
        if not isinstance(same_as, str) or base is not None or codecs or residual is not None:
            raise RefError("codec", f"{what}: a same_as record has no base, terms or residual")
        return
    if base is None and codecs != ["dense"]:
        raise RefError("codec", f"{what}: a record without base needs exactly one dense term")
    if "dense" in codecs and (codecs != ["dense"] or base is not None):
        raise RefError("codec", f"{what}: a dense term must be the only term, with a null base")
    if "requant" in codecs and (codecs != ["requant"] or base is None):
        raise RefError("codec", f"{what}: a requant term is the only term, of a record with a base")
    if t not in FLOATS and any(c not in ("dense", "requant") for c in codecs):
        raise RefError("codec", f"{what}: integer/BOOL records may only use dense or requant")
    if "rescale" in codecs[1:] or (codecs[:1] == ["rescale"] and base is None):
        raise RefError("codec", f"{what}: a rescale term must be the first term, of a record with a base")
    if "lowrank" in codecs and residual is not None:
        raise RefError("codec", f"{what}: a lowrank record must not have a residual")


def _decode_part(p: dict[str, Any], st: SafetensorsFile) -> np.ndarray:
    """The decoded array of a part (section 4.3), in its own dtype (BF16 as uint16)."""
    dtype, shape, enc = p["dtype"], p["shape"], p["encoding"]
    if enc == "raw":
        return st.array(p["key"])
    if enc == "bitplanes":
        return _decode_bitplanes(p, st)
    size, np_dtype = DTYPES[dtype]
    count = _prod(shape)
    want = count * size
    frame = st.array(p["key"]).tobytes()
    declared = _frame_content_size(frame, p["key"])
    if declared is None:
        raise RefError("limit", f"part {p['key']!r}: zstd frame declares no content size")
    if declared != want:
        raise RefError("limit", f"part {p['key']!r}: frame declares {declared} bytes, the part needs {want}")
    try:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        content = dobj.decompress(frame)
        if not dobj.eof:
            raise RefError("codec", f"part {p['key']!r}: truncated zstd frame")
        if dobj.unused_data:
            raise RefError("codec", f"part {p['key']!r}: bytes after the zstd frame")
    except zstandard.ZstdError as e:
        raise RefError("codec", f"part {p['key']!r}: zstd: {e}") from None
    if len(content) != want:
        raise RefError("codec", f"part {p['key']!r}: decoded {len(content)} bytes, expected {want}")
    if enc == "zstd_planes" and size > 1:
        content = np.frombuffer(content, np.uint8).reshape(size, count).T.tobytes()
    return np.frombuffer(content, dtype=np_dtype, count=count).reshape(shape)


def _decode_bitplanes(p: dict[str, Any], st: SafetensorsFile) -> np.ndarray:
    """Section 4.3 ``bitplanes``: element j of row i is u - (2^(b-1) - 1), u = sum over k of bit (j mod 8)
    of planes[k, i, j div 8] times 2^k; padding bits must be 0 and u at most 2^b - 2."""
    planes = st.array(p["key"])
    b = planes.shape[0]
    m, n = _matrix_view(p["shape"])
    bits = np.unpackbits(planes, axis=2, bitorder="little").astype(np.int64)  # [b, m, 8 * ceil(n/8)]
    if bits[:, :, n:].any():
        raise RefError("codec", f"part {p['key']!r}: bitplanes padding bits must be 0")
    u = np.zeros((m, n), dtype=np.int64)
    for k in range(b):
        u += bits[k, :, :n] << k
    if (u > (1 << b) - 2).any():
        raise RefError("codec", f"part {p['key']!r}: a bitplanes value is out of range for {b} planes")
    return (u - ((1 << (b - 1)) - 1)).astype(np.int8).reshape(p["shape"])


def _frame_content_size(frame: bytes, key: str) -> int | None:
    """Frame_Content_Size from a zstd frame header (RFC 8878 3.1.1.1), or None if not declared."""
    if len(frame) < 5 or int.from_bytes(frame[:4], "little") != ZSTD_MAGIC:
        raise RefError("codec", f"part {key!r}: not a zstd frame")
    fhd = frame[4]
    fcs_flag = fhd >> 6
    single_segment = (fhd >> 5) & 1
    if (fhd >> 3) & 1:
        raise RefError("codec", f"part {key!r}: reserved bit set in zstd frame header")
    did_size = (0, 1, 2, 4)[fhd & 3]
    pos = 5 + (0 if single_segment else 1) + did_size
    if len(frame) < pos:
        raise RefError("codec", f"part {key!r}: truncated zstd frame header")
    if int.from_bytes(frame[pos - did_size : pos], "little"):
        raise RefError("codec", f"part {key!r}: zstd frame needs a dictionary (4.3: not allowed)")
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if fcs_size == 0:
        return None
    if len(frame) < pos + fcs_size:
        raise RefError("codec", f"part {key!r}: truncated zstd frame header")
    v = int.from_bytes(frame[pos : pos + fcs_size], "little")
    return v + 256 if fcs_size == 2 else v


def _rebuild(
    r: dict[str, Any], st: SafetensorsFile, bb: SafetensorsFile, records: _Records | None = None
) -> np.ndarray:
    t, shape, base = r["dtype"], list(r["shape"]), r["base"]
    what = f"tensor {r['name']!r}"
    b = bdtype = None
    if base is not None:
        if base not in bb.entries:
            raise RefError("codec", f"{what}: base {base!r} is not a backbone tensor")
        bdtype, bshape, _, _ = bb.entries[base]
        if r["terms"] and r["terms"][0]["codec"] == "requant":
            return _requant(r, st, bb, records, bdtype, bshape)
        if len(bshape) != len(shape):
            raise RefError("codec", f"{what}: base {base!r} has {len(bshape)} dimensions, not {len(shape)}")
        if (t in FLOATS) != (bdtype in FLOATS) or (t not in FLOATS and bdtype != t):
            raise RefError("codec", f"{what}: base {base!r} of dtype {bdtype} cannot predict {t}")
        b = bb.array(base)
    terms = r["terms"]
    np_t = DTYPES[t][1]

    if t not in FLOATS or (not terms and bdtype == t) or [x["codec"] for x in terms] == ["dense"]:
        # 5.2, and the "Y is B itself" case of 5.1: no arithmetic.
        if terms:  # exactly one dense term (4.1)
            y = _decode_part(terms[0]["parts"]["values"], st)
        else:
            assert b is not None
            y = b if list(b.shape) == shape else _padded_view(b, shape, np_t)
    else:
        c = np.dtype(np.float64) if t == "F64" else np.dtype(np.float32)
        if b is None:
            x = np.zeros(shape, dtype=c)
        else:
            bc = _cast_c(b, bdtype, c)
            x = bc if list(b.shape) == shape else _padded_view(bc, shape, c)
        m, n = _matrix_view(shape)
        with np.errstate(all="ignore"):
            if terms and terms[0]["codec"] == "rescale":  # section 5.1: X <- X / s, row by row, first
                s_ = _cast_c(_decode_part(terms[0]["parts"]["scales"], st), "F32", c)
                x = (x.reshape(m, n) / s_[:, None]).reshape(shape)
                terms = terms[1:]
            for term in terms:
                x = x + _term_value(term, st, shape, m, n, c)
            y = _round_t(x, t)
    y = np.ascontiguousarray(y, dtype=np_t).reshape(shape)

    if r.get("residual") is not None:
        res = _decode_part(r["residual"], st)
        yb = y.view(np.uint8) ^ np.ascontiguousarray(res).view(np.uint8)
        y = yb.view(np_t).reshape(shape)
    if t == "BOOL" and bool(np.any(np.ascontiguousarray(y).view(np.uint8) > 1)):
        raise RefError("codec", f"{what}: a BOOL result holds bytes other than 0 and 1")
    return y if y.flags.writeable else y.copy()


def _requant(
    r: dict[str, Any],
    st: SafetensorsFile,
    bb: SafetensorsFile,
    records: _Records | None,
    bdtype: str,
    bshape: list[int],
) -> np.ndarray:
    """Section 5.4: quantise the float base with the scales record, add the correction, pack."""
    what = f"tensor {r['name']!r}"
    assert records is not None, "a requant record is rebuilt with its delta's other records"
    p = r["terms"][0]["params"]
    b, n, g, z, layout = p["bits"], p["inputs"], p["group_size"], p["zero"], p["layout"]
    m = r["shape"][1] if layout == "columns" else r["shape"][0]
    if bdtype not in FLOATS or bshape != [m, n]:
        raise RefError("codec", f"{what}: a requant base must be floating point [{m}, {n}], not {bdtype}{bshape}")
    scales_rec = records(p["scales"])
    v = _cast_c(scales_rec, records.dtype_of(p["scales"]), np.dtype(np.float32)).reshape(-1)
    e = v.size
    if e != 1 and (e == 0 or e % m):
        raise RefError("codec", f"{what}: requant scales hold {e} values for {m} rows")
    groups_n = max(1, e // m)
    if e == 1:
        s = np.full((m, 1), v[0], dtype=np.float32)
    elif layout == "columns":
        s = v.reshape(groups_n, m).T
    else:
        s = v.reshape(m, groups_n)
    if "groups" in p:
        gi = records(p["groups"]).reshape(-1).astype(np.int64)
        if gi.size != n or (n and (gi.min() < 0 or gi.max() >= groups_n)):
            raise RefError("codec", f"{what}: requant groups out of range")
    elif groups_n == 1:
        gi = np.zeros(n, dtype=np.int64)
    elif groups_n == -(-n // g):
        gi = np.arange(n) // g
    else:
        raise RefError("codec", f"{what}: {groups_n} scale groups, but {n} inputs in groups of {g}")
    x = _cast_c(bb.array(r["base"]), bdtype, np.dtype(np.float32)).reshape(m, n)
    with np.errstate(all="ignore"):
        q = np.rint(x / s[:, gi]).astype(np.float32) + np.float32(z)  # rint: ties to even
    q = np.where(np.isnan(q), np.float32(z), q)
    u = np.clip(q, 0, (1 << b) - 1).astype(np.int64)
    u = u + _decode_part(r["terms"][0]["parts"]["correction"], st).astype(np.int64)
    if u.size and (u.min() < 0 or u.max() > (1 << b) - 1):
        raise RefError("codec", f"{what}: requant codes leave [0, {(1 << b) - 1}] after the correction")
    if layout == "codes":
        y = (u - (1 << (b - 1))).astype(np.int8)
    else:
        words = -(-n * b // 32)
        bits = ((u[:, :, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(m, n * b)
        stream = np.zeros((m, words * 32), dtype=np.uint8)
        stream[:, : n * b] = bits
        y = np.packbits(stream, axis=1, bitorder="little").view("<i4").reshape(m, words)
        if layout == "columns":
            y = np.ascontiguousarray(y.T)
    if r.get("residual") is not None:
        res = _decode_part(r["residual"], st)
        y = (np.ascontiguousarray(y).view(np.uint8) ^ np.ascontiguousarray(res).view(np.uint8)).view(y.dtype)
    return np.ascontiguousarray(y).reshape(r["shape"])


def _term_value(term: dict[str, Any], st: SafetensorsFile, shape: list[int], m: int, n: int, c: np.dtype) -> np.ndarray:
    codec, parts, params = term["codec"], term["parts"], term.get("params", {})

    def get(role: str) -> np.ndarray:
        p = parts[role]
        return _cast_c(_decode_part(p, st), p["dtype"], c)

    if codec == "dense":
        return get("values")
    if codec == "lowrank":
        return (get("u") @ get("v")).reshape(shape)
    if codec == "sparse":
        idx = _decode_part(parts["indices"], st)
        k = idx.shape[0]
        if k and (idx[0] < 0 or idx[-1] >= m * n or (k > 1 and not bool(np.all(idx[1:] > idx[:-1])))):
            raise RefError("codec", "sparse indices are not strictly increasing within [0, m*n)")
        out = np.zeros(m * n, dtype=c)
        out[idx] = get("values")
        return out.reshape(shape)
    if codec == "quant":
        bits = params["bits"]
        codes = _decode_part(parts["codes"], st)
        lim = 2 ** (bits - 1) - 1
        if codes.size and (int(codes.min()) < -lim or int(codes.max()) > lim):
            raise RefError("codec", f"quant codes outside [-{lim}, {lim}]")
        return (codes.astype(c) * get("scales")[:, None]).reshape(shape)
    raise RefError("codec", f"unknown codec {codec!r}")


def open_family(path: str | os.PathLike[str]) -> RefFamily:
    """Open the family directory ``path`` (manifest parsed and checked, file sizes checked)."""
    return RefFamily(path)
