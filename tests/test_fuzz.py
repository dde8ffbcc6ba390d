"""Fuzzing the readers: mutated copies of a valid family (bit flips, truncations, splices, structured edits
of safetensors headers, records and the manifest, swapped parts), read by the library and by the reference
reader (tests/reference_reader.py).

A mutation is applied to the delta, the manifest or the backbone, and the manifest's sizes and digests (and
the delta's backbone digest) are usually brought up to date, as a malicious author would, so that the
mutation reaches the parsers instead of stopping at the SHA-256 check. For every case:

* each reader either returns the member or raises its own error type (``WfactorError`` / ``RefError``),
  never another exception, and within a time limit (no hangs);
* the library's two rebuild paths (``state_dict`` and the streaming ``iter_tensors``) agree;
* the library and the reference reader agree: both refuse, or both rebuild bit-identical tensors (for
  records with a ``lowrank`` term, within the tolerance of spec section 5.3);
* no zstd frame is decoded with an output buffer other than the size the part declares, and the Python
  heap never grows by more than a small multiple of the family's size (no allocation beyond the declared
  outputs).

The quick slice (``make test``) runs a few hundred cases; ``make fuzz`` runs 10,000
(``WFACTOR_FUZZ_EXAMPLES``), derandomized, so that a failure reproduces.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT / "fixtures" / "invalid" / "valid"
VALID_PLANES = ROOT / "fixtures" / "invalid" / "valid_bitplanes"  # the control with bit-plane codes (v3)
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import reference_reader as rr  # noqa: E402
from conftest import zstd_spy_class  # noqa: E402

EXAMPLES = int(os.environ.get("WFACTOR_FUZZ_EXAMPLES", "250"))
CASE_SECONDS = 20  # one case reads a family of a few KB: anything near this is a hang
HEAP_LIMIT = 8 << 20  # Python heap growth allowed while reading a family of a few KB
MEMBER = "m"
FILES = {"delta": "deltas/m.safetensors", "manifest": "wfactor.json", "backbone": "backbone.safetensors"}
LOWRANK_RTOL = 1e-5
ORIGINALS = {base: {rel: (base / rel).read_bytes() for rel in FILES.values()} for base in (VALID, VALID_PLANES)}

INTERESTING: list[Any] = [
    0, 1, -1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 24, 127, 128, 255, 256, 1024, 1025, 1280, 1281,
    2**31, 2**32, 2**40, 2**40 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 1.0, 0.5, -0.0, 1e308,
    None, True, False, "", "w", "h", "head", "tied", "ids", "emb", "mask", "nope", "0#0.u", "0#0.v", "2#0.values",
    "F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "Q4", "raw", "zstd", "zstd_planes", "bitplanes", "1#0.codes",
    "dense", "lowrank", "sparse", "quant", "delta", "backbone", "1", "2", "01", "../x", "/abs", "a" * 1300,
    [], {}, [0], [1], [4, 6], [6, 4], [3, 4], [1] * 9, [2**20, 2**21], [-1], [0, 0], [0, 2**40],
]  # fmt: skip


# -- mutations --------------------------------------------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, data section) of a well-formed file; None when the header does not parse."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        return None
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return None
    return (header, data[8 + n :]) if isinstance(header, dict) else None


def join_safetensors(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + body


def json_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, (*prefix, i))


def edit_json(data: st.DataObject, doc: Any) -> Any:
    """One structural edit somewhere in a JSON document: replace, delete, duplicate, add or nudge a node."""
    paths = [p for p in json_paths(doc) if p]
    if not paths:
        return data.draw(st.sampled_from(INTERESTING))
    path = data.draw(st.sampled_from(paths), label="path")
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    node = parent[key]
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "add_key", "nudge"]), label="op")
    if op == "replace":
        parent[key] = copy.deepcopy(data.draw(st.sampled_from(INTERESTING), label="value"))
    elif op == "delete":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(node))
    elif op == "add_key" and isinstance(node, dict):
        name = data.draw(st.sampled_from(["x", "name", "base", "same_as", "residual", "params", "codec"]))
        node[name] = copy.deepcopy(data.draw(st.sampled_from(INTERESTING), label="value"))
    elif op == "nudge" and isinstance(node, int) and not isinstance(node, bool):
        parent[key] = node + data.draw(st.sampled_from([-2, -1, 1, 2, 8, -8]))
    elif op == "nudge" and isinstance(node, str):
        parent[key] = data.draw(st.sampled_from([node + "x", node[:-1], node.upper(), node * 2]))
    else:
        parent[key] = copy.deepcopy(data.draw(st.sampled_from(INTERESTING), label="value"))
    return doc


def part_refs(records: Any) -> list[dict[str, Any]]:
    """The Part objects of parsed records (for swapping keys)."""
    out = []
    for r in records if isinstance(records, list) else []:
        if not isinstance(r, dict):
            continue
        for t in r.get("terms") or []:
            if isinstance(t, dict) and isinstance(t.get("parts"), dict):
                out += [p for p in t["parts"].values() if isinstance(p, dict) and "key" in p]
        if isinstance(r.get("residual"), dict):
            out.append(r["residual"])
    return out


def mutate_safetensors(data: st.DataObject, raw: bytes, ops: list[str]) -> bytes:
    split = split_safetensors(raw)
    if split is None:
        ops = ["flip", "truncate", "splice"]
    op = data.draw(st.sampled_from(ops), label="file op")
    event(f"op: {op}")
    if op in ("flip", "truncate", "splice"):
        return mutate_bytes(data, raw, op)
    assert split is not None
    header, body = split
    if op == "data_flip":  # values, frames and block headers change; the header stays valid
        start = len(raw) - len(body)
        return raw[:start] + mutate_bytes(data, body, "flip") if body else raw
    meta = header.get("__metadata__")
    if op == "records" and isinstance(meta, dict) and isinstance(meta.get("wfactor.records"), str):
        records = json.loads(meta["wfactor.records"])
        meta["wfactor.records"] = json.dumps(edit_json(data, records), ensure_ascii=False)
    elif op == "swap_parts" and isinstance(meta, dict) and isinstance(meta.get("wfactor.records"), str):
        records = json.loads(meta["wfactor.records"])
        parts = part_refs(records)
        if len(parts) >= 2:
            i, j = data.draw(st.lists(st.integers(0, len(parts) - 1), min_size=2, max_size=2, unique=True))
            parts[i]["key"], parts[j]["key"] = parts[j]["key"], parts[i]["key"]
        meta["wfactor.records"] = json.dumps(records)
    elif op == "swap_offsets":
        names = sorted(k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
        if len(names) >= 2:
            a, b = data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True))
            header[a], header[b] = header[b], header[a]
    else:
        header = edit_json(data, header)
        if not isinstance(header, dict):
            return json.dumps(header).encode()
    return join_safetensors(header, body)


def mutate_bytes(data: st.DataObject, raw: bytes, op: str) -> bytes:
    if not raw:
        return raw
    buf = bytearray(raw)
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            pos = data.draw(st.integers(0, len(buf) - 1), label="pos")
            buf[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        return bytes(buf)
    if op == "truncate":
        return bytes(buf[: data.draw(st.integers(0, len(buf) - 1), label="cut")])
    pos = data.draw(st.integers(0, len(buf)), label="pos")
    if data.draw(st.booleans(), label="insert"):
        return bytes(buf[:pos]) + data.draw(st.binary(min_size=1, max_size=16)) + bytes(buf[pos:])
    return bytes(buf[:pos] + buf[pos + data.draw(st.integers(1, 16)) :])


def mutate_manifest(data: st.DataObject, raw: bytes) -> bytes:
    op = data.draw(st.sampled_from(["json", "json", "flip", "json", "truncate", "splice"]), label="manifest op")
    event(f"op: manifest {op}")
    if op != "json":
        return mutate_bytes(data, raw, op)
    doc = json.loads(raw)
    return json.dumps(edit_json(data, doc), ensure_ascii=False).encode("utf-8", "surrogatepass")


def rehash(fam: Path, old_backbone_sha: str) -> None:
    """Bring the manifest's FileRefs (and the delta's backbone digest) up to date with the files."""
    bb = (fam / FILES["backbone"]).read_bytes()
    bb_sha = hashlib.sha256(bb).hexdigest()
    delta_path = fam / FILES["delta"]
    delta = delta_path.read_bytes()
    if bb_sha != old_backbone_sha:  # same length: the header length stays valid
        delta = delta.replace(old_backbone_sha.encode(), bb_sha.encode())
        delta_path.write_bytes(delta)
    try:
        man = json.loads((fam / FILES["manifest"]).read_bytes())
        man["backbone"].update(sha256=bb_sha, size=len(bb))
        man["members"][0]["delta"].update(sha256=hashlib.sha256(delta).hexdigest(), size=len(delta))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return  # a mutated manifest: leave it as it is
    (fam / FILES["manifest"]).write_text(json.dumps(man, ensure_ascii=False), encoding="utf-8")


# -- the two readers --------------------------------------------------------------------------------------
class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"a read took more than {CASE_SECONDS} s")


def as_bytes(t: Any) -> bytes:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return bytes(t.numpy().tobytes())


def read_library(fam: Path) -> dict[str, Any]:
    """{"error": code} or {"tensors": {name: bytes}, "dtypes": ...}, through both rebuild paths."""
    import wfactor
    from wfactor.errors import WfactorError

    outcomes = []
    for path in ("state_dict", "iter_tensors"):
        try:
            with wfactor.open_family(fam) as f:
                items = f.state_dict(MEMBER).items() if path == "state_dict" else f.iter_tensors(MEMBER)
                outcomes.append({"tensors": {k: (str(v.dtype), tuple(v.shape), as_bytes(v)) for k, v in items}})
        except WfactorError as exc:
            assert "\n" not in str(exc), f"a multi-line error: {exc}"
            outcomes.append({"error": exc.code})
    a, b = outcomes
    assert ("error" in a) == ("error" in b), f"state_dict and iter_tensors disagree: {a} / {b}"
    if "tensors" in a:
        assert list(a["tensors"]) == list(b["tensors"])
    return a


def read_reference(fam: Path) -> dict[str, Any]:
    try:
        ref = rr.open_family(fam)
        tensors = ref.state_dict(MEMBER)
        records = {r["name"]: r for r in ref.records(MEMBER)}
    except rr.RefError as exc:
        return {"error": exc.code}
    return {"tensors": tensors, "records": records}


TORCH_TO_NP = {
    "torch.float64": "float64",
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "uint16",
    "torch.int64": "int64",
    "torch.int32": "int32",
    "torch.int16": "int16",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
    "torch.bool": "bool",
}


def compare(lib: dict[str, Any], ref: dict[str, Any]) -> None:
    if "error" in lib or "error" in ref:
        assert "error" in lib and "error" in ref, (
            f"one reader refuses, the other reads: library {_short(lib)}, reference {_short(ref)}"
        )
        return
    assert list(lib["tensors"]) == list(ref["tensors"])
    for name, (dtype, shape, raw) in lib["tensors"].items():
        theirs = ref["tensors"][name]
        assert TORCH_TO_NP[dtype] == str(theirs.dtype) and shape == theirs.shape, name
        rec = ref["records"][name]
        if rec.get("same_as") is not None:
            rec = ref["records"][rec["same_as"]]
        if any(isinstance(t, dict) and t.get("codec") == "lowrank" for t in rec.get("terms") or []):
            mine = np.frombuffer(raw, dtype=theirs.dtype).reshape(shape)
            x, y = _f64(mine, rec["dtype"]), _f64(theirs, rec["dtype"])
            assert np.array_equal(np.isnan(x), np.isnan(y)), name
            finite = np.isfinite(x) & np.isfinite(y)
            assert np.array_equal(x[~finite & ~np.isnan(x)], y[~finite & ~np.isnan(y)]), name
            tol = LOWRANK_RTOL * (np.linalg.norm(y[finite]) + 1e-30)
            if rec["dtype"] in ("F16", "BF16"):
                tol = max(tol, float(np.max(np.abs(y[finite]), initial=0.0)) * 2.0**-7)
            assert np.linalg.norm(x[finite] - y[finite]) <= tol, name
        else:
            assert raw == np.ascontiguousarray(theirs).tobytes(), f"{name}: the readers rebuild different bytes"


def _f64(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        a = (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    with np.errstate(all="ignore"):
        return a.astype(np.float64)


def _short(outcome: dict[str, Any]) -> str:
    return f"error {outcome['error']!r}" if "error" in outcome else f"{len(outcome['tensors'])} tensors"


# -- the test ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    import wfactor  # noqa: F401  (torch is imported here, not under tracemalloc in the first case)

    with tempfile.TemporaryDirectory(prefix="wfactor-fuzz-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def zstd_spy() -> Iterator[list[tuple[int, int]]]:
    """Records (declared content size, output limit) of every zstd decode the library runs."""
    import wfactor.format.parts as parts

    calls: list[tuple[int, int]] = []
    saved = parts.zstandard
    parts.zstandard = type(sys)("zstandard_spy")  # type: ignore[assignment]
    for name in dir(saved):
        if not name.startswith("__"):
            setattr(parts.zstandard, name, getattr(saved, name))
    parts.zstandard.ZstdDecompressor = zstd_spy_class(calls)  # type: ignore[attr-defined]
    try:
        yield calls
    finally:
        parts.zstandard = saved


@pytest.mark.parametrize("base", [VALID, VALID_PLANES], ids=["valid", "valid_bitplanes"])
def test_the_unmutated_family_reads_the_same_in_both_readers(workdir: Path, base: Path) -> None:
    fam = workdir / f"plain-{base.name}"
    shutil.copytree(base, fam)
    lib, ref = read_library(fam), read_reference(fam)
    assert "tensors" in lib and "tensors" in ref
    compare(lib, ref)


def test_the_slices_share_the_examples() -> None:
    """The slices below share ``EXAMPLES`` cases: a fixed split keeps the structural edits, which reach the
    record and codec checks, from being crowded out by byte-level noise."""
    assert abs(sum(share for _, _, share in SLICES.values()) - 1.0) < 1e-9
    assert sum(max(1, round(EXAMPLES * share)) for _, _, share in SLICES.values()) >= EXAMPLES


SLICES: dict[str, tuple[str, list[str], float]] = {
    "delta_records": ("delta", ["records"], 0.25),
    "delta_parts": ("delta", ["swap_parts", "data_flip", "header", "swap_offsets"], 0.20),
    "delta_bytes": ("delta", ["flip", "truncate", "splice"], 0.10),
    "backbone": ("backbone", ["data_flip", "header", "swap_offsets", "flip", "truncate", "splice"], 0.15),
    "manifest": ("manifest", [], 0.15),
    # the bit-plane control's delta (format v3): records, parts and the planes' bytes
    "planes": ("delta", ["records", "swap_parts", "data_flip", "header", "flip"], 0.15),
}
BASES = {"planes": VALID_PLANES}  # the family a slice mutates; the plain control otherwise


def _fuzz(slice_name: str) -> Any:
    target, ops, share = SLICES[slice_name]

    @settings(
        max_examples=max(1, round(EXAMPLES * share)),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def test(data: st.DataObject, workdir: Path, zstd_spy: list[Any]) -> None:
        run_case(data, workdir, zstd_spy, target, ops, BASES.get(slice_name, VALID))

    test.__name__ = test.__qualname__ = f"test_fuzz_{slice_name}"
    return test


def run_case(
    data: st.DataObject, workdir: Path, zstd_spy: list[Any], target: str, ops: list[str], base: Path = VALID
) -> None:
    fam = workdir / f"fam-{base.name}"
    if not fam.exists():
        shutil.copytree(base, fam)
    for rel in FILES.values():  # back to the valid family (what a case writes is one of these)
        (fam / rel).write_bytes(ORIGINALS[base][rel])
    path = fam / FILES[target]
    raw = path.read_bytes()
    old_bb_sha = hashlib.sha256((fam / FILES["backbone"]).read_bytes()).hexdigest()
    if target == "manifest":
        new = mutate_manifest(data, raw)
    else:
        new = mutate_safetensors(data, raw, ops)
    path.write_bytes(new)
    if target != "manifest" and data.draw(st.sampled_from([True] * 9 + [False]), label="rehash"):
        rehash(fam, old_bb_sha)

    zstd_spy.clear()
    family_bytes = sum((fam / rel).stat().st_size for rel in FILES.values())
    measure = data.draw(st.integers(0, 7), label="measure the heap") == 0  # tracemalloc triples the time
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    if measure:
        tracemalloc.start()
    try:
        lib = read_library(fam)
        heap = tracemalloc.get_traced_memory()[1] if measure else 0
    finally:
        if measure:
            tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert heap <= HEAP_LIMIT + 64 * family_bytes, f"the library's heap peaked at {heap} bytes"
    for declared, limit in zstd_spy:
        if limit < 0:  # decompressobj, used for empty parts only
            assert declared == 0 and -limit <= 64, (declared, limit)
        else:
            assert declared == limit, f"a zstd frame was decoded into {limit} bytes, it declares {declared}"
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        ref = read_reference(fam)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    compare(lib, ref)
    event(f"{target}: " + (f"refused ({lib['error']})" if "error" in lib else "read"))


test_fuzz_delta_records = _fuzz("delta_records")
test_fuzz_delta_parts = _fuzz("delta_parts")
test_fuzz_delta_bytes = _fuzz("delta_bytes")
test_fuzz_backbone = _fuzz("backbone")
test_fuzz_manifest = _fuzz("manifest")
test_fuzz_planes = _fuzz("planes")
