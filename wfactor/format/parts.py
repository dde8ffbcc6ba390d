"""Stored parts: how a codec's arrays are kept in a delta file (spec/FORMAT.md section 4.3).

A part is described by ``{"key", "dtype", "shape", "encoding"}``. ``raw`` stores the array itself;
``zstd`` stores one zstd frame of its little-endian bytes; ``zstd_planes`` stores one zstd frame of its
bytes regrouped into byte planes (byte j of every element, for j = 0 .. itemsize-1), which lets zstd find
the structure of floating-point data (exponents compress, low mantissa bytes do not).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from ..errors import CodecError, LimitError
from . import bitplanes
from .constants import DTYPES, PART_ENCODINGS
from .safetensors_io import SafetensorsFile, check_shape

# Level 1, not zstd's default 3: on residual byte planes (what lossless families are made of) it gives the same
# size within 0.3% (often smaller) at about twice the speed, and compression is most of lossless factoring.
ZSTD_LEVEL = 1


@dataclass(frozen=True)
class PartSpec:
    key: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "dtype": self.dtype, "shape": list(self.shape), "encoding": self.encoding}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> PartSpec:
        if not isinstance(obj, dict):
            raise CodecError(f"{where}: a part must be an object with key, dtype, shape, encoding")
        key, dtype, enc = obj.get("key"), obj.get("dtype"), obj.get("encoding")
        if not isinstance(key, str):
            raise CodecError(f"{where}: part key must be a string")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CodecError(f"{where}: part dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if not isinstance(enc, str) or enc not in PART_ENCODINGS:
            raise CodecError(f"{where}: part encoding {enc!r} is not one of {sorted(PART_ENCODINGS)}")
        return cls(key, dtype, check_shape(obj.get("shape"), where, CodecError), enc)


def from_planes(raw: bytes, size: int) -> bytes:
    if size == 1:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(size, -1).T.tobytes()


def storage_array(arr: np.ndarray, dtype: str) -> np.ndarray:
    want = DTYPES[dtype][0]
    if arr.dtype != want:
        raise AssertionError(f"array of {arr.dtype} stored as {dtype}")
    return np.ascontiguousarray(arr)


def encode_part(
    key: str, arr: np.ndarray, dtype: str, encoding: str, level: int = ZSTD_LEVEL
) -> tuple[PartSpec, np.ndarray]:
    """(spec, stored array) for one part. The stored array is what goes into the safetensors file."""
    arr = storage_array(arr, dtype)
    spec = PartSpec(key, dtype, tuple(arr.shape), encoding)
    if encoding == "raw":
        return spec, arr
    if encoding == "bitplanes":
        bits = bitplanes.bits_needed(arr) if dtype == "I8" else None
        if bits is None:  # not an I8 part, or it holds -128: no plane count can hold it
            return encode_part(key, arr, dtype, "zstd", level)
        return spec, bitplanes.pack(arr, bits)
    frame = compress_streaming(arr, DTYPES[dtype][1] if encoding == "zstd_planes" else 1, level)
    if len(frame) >= arr.nbytes:  # incompressible (or tiny): storing it raw is smaller and faster to read
        return PartSpec(key, dtype, tuple(arr.shape), "raw"), arr if arr.base is None else arr.copy()
    return spec, np.frombuffer(frame, dtype=np.uint8)


COMPRESS_CHUNK = 4 << 20
# up to this size a part is compressed in one call (its byte planes made in one copy); beyond, in chunks
WHOLE_MAX = 256 << 20
_COMPRESSORS = threading.local()  # one zstd context per thread and level, reused (a context is not thread-safe)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    got: dict[int, zstandard.ZstdCompressor] | None = getattr(_COMPRESSORS, "by_level", None)
    if got is None:
        got = _COMPRESSORS.by_level = {}
    if level not in got:
        got[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return got[level]


def compress_streaming(arr: np.ndarray, planes: int, level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame (its content size declared) of ``arr``'s bytes, or of its byte planes when ``planes`` > 1
    (byte 0 of every element, then byte 1, ...).

    Up to ``WHOLE_MAX`` bytes, one call over the array (or one transposing copy of it, the planes
    contiguous): zstd compresses from the buffer in place, without copying it into its window. Beyond, the
    bytes are fed in chunks of ``COMPRESS_CHUNK`` bytes (plane by plane), so that no copy of the whole
    array is ever made: memory stays bounded whatever the tensor's size. The two ways end the frame's last
    block differently: which one a part took follows from its size alone, so the bytes stay deterministic."""
    flat = arr.reshape(-1).view(np.uint8)
    if flat.size <= WHOLE_MAX:
        data = flat if planes <= 1 else np.ascontiguousarray(flat.reshape(-1, planes).T).reshape(-1)
        return _compressor(level).compress(data.data)
    cobj = _compressor(level).compressobj(size=flat.size)
    out: list[bytes] = []
    if planes <= 1:
        for i in range(0, flat.size, COMPRESS_CHUNK):
            out.append(cobj.compress(flat[i : i + COMPRESS_CHUNK].tobytes()))
    else:
        grid = flat.reshape(-1, planes)
        rows = max(1, COMPRESS_CHUNK // planes)
        for p in range(planes):
            for i in range(0, grid.shape[0], rows):
                out.append(cobj.compress(grid[i : i + rows, p].tobytes()))
    out.append(cobj.flush())
    return b"".join(out)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_UNKNOWN_SIZE = (1 << 64) - 1


def decode_zstd_frame(frame: bytes | memoryview, expected: int, where: str) -> bytes:
    """Decode exactly one zstd frame of exactly ``expected`` bytes (spec 4.3).

    The frame's declared content size is checked against ``expected`` before anything is decoded, and the
    output is one buffer of exactly ``expected`` bytes that zstd may not overrun: whatever the frame holds,
    decoding it allocates no more than the part needs (no decompression bombs)."""
    if frame[:4] != ZSTD_MAGIC:
        raise CodecError(f"{where}: not a zstd frame (no zstd magic number; skippable frames are not allowed)")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{where}: not a zstd frame ({exc})") from None
    declared = params.content_size
    if declared != expected:
        what = "no decoded size" if declared == ZSTD_UNKNOWN_SIZE else f"{declared} decoded bytes"
        raise LimitError(f"{where}: zstd frame declares {what}, the part needs {expected}; refusing to decode")
    if params.dict_id:
        raise CodecError(f"{where}: zstd frame needs dictionary {params.dict_id}; dictionaries are not allowed")
    try:
        if expected == 0:  # decompress() returns early for an empty frame: check the frame's end here
            dobj = zstandard.ZstdDecompressor().decompressobj(write_size=64)
            out = dobj.decompress(frame)
            ok = dobj.eof and not dobj.unused_data and not out
        else:
            out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected, allow_extra_data=False)
            ok = len(out) == expected
    except zstandard.ZstdError as exc:
        raise CodecError(f"{where}: corrupt zstd frame, truncated or followed by trailing bytes ({exc})") from None
    if not ok:
        raise CodecError(f"{where}: zstd frame is truncated, has trailing bytes, or decodes to the wrong size")
    return out


def read_part_array(spec: PartSpec, stored: np.ndarray, where: str) -> np.ndarray:
    """Decode a part from its stored array (what the safetensors file holds under ``spec.key``)."""
    if spec.encoding == "raw":
        return stored.reshape(spec.shape).copy()
    if spec.encoding == "bitplanes":
        planes = check_planes(spec, stored, where)
        return bitplanes.unpack(planes, bitplanes.matrix_view(spec.shape)[1]).reshape(spec.shape)
    raw = decode_zstd_frame(stored.data.cast("B"), spec.nbytes, f"{where}: part {spec.key!r}")
    if spec.encoding == "zstd_planes":
        raw = from_planes(raw, DTYPES[spec.dtype][1])
    return np.frombuffer(raw, dtype=DTYPES[spec.dtype][0]).reshape(spec.shape).copy()


def read_part(f: SafetensorsFile, spec: PartSpec, where: str) -> np.ndarray:
    """Read and decode one part into a writable numpy array of ``spec.dtype`` storage and ``spec.shape``."""
    if spec.key not in f.tensors:
        raise CodecError(f"{where}: part {spec.key!r} is not in the file")
    info = f.tensors[spec.key]
    if spec.encoding == "raw":
        if info.dtype != spec.dtype or info.shape != spec.shape:
            raise CodecError(
                f"{where}: part {spec.key!r} is stored as {list(info.shape)} x {info.dtype}, "
                f"the record says {list(spec.shape)} x {spec.dtype}"
            )
    elif spec.encoding == "bitplanes":
        if info.dtype != "U8" or len(info.shape) != 3:
            raise CodecError(
                f"{where}: bitplanes part {spec.key!r} must be stored as a 3-D U8 tensor [b, m, ceil(n/8)]"
            )
    elif info.dtype != "U8" or len(info.shape) != 1:
        raise CodecError(f"{where}: compressed part {spec.key!r} must be stored as a 1-D U8 tensor")
    else:  # a zstd frame: decoded straight from the file's mapping, no copy of the frame
        err: BaseException
        with f.view(spec.key) as frame:
            try:
                return read_part_array(spec, np.frombuffer(frame, dtype=np.uint8), where)
            except BaseException as exc:
                # raised without its traceback and context: their frames hold views of the mapping, which
                # must be gone before the view is released (and the file closed)
                err = exc.with_traceback(None)
                err.__context__ = err.__cause__ = None
        raise err
    return read_part_array(spec, f.numpy(spec.key), where)


def check_planes(spec: PartSpec, stored: np.ndarray, where: str) -> np.ndarray:
    """A ``bitplanes`` part's stored planes, checked against the part (spec 4.3): an I8 part, U8 planes of
    shape [b, m, ceil(n/8)] with 2 <= b <= 8 for its matrix view (m, n), padding bits 0, no value outside
    +-(2^(b-1) - 1). Error ``codec``."""
    at = f"{where}: part {spec.key!r}"
    if spec.dtype != "I8":
        raise CodecError(f"{at}: the bitplanes encoding holds I8 parts only, found {spec.dtype}")
    m, n = bitplanes.matrix_view(spec.shape)
    if stored.ndim != 3 or stored.dtype != np.uint8:
        raise CodecError(f"{at}: bitplanes are stored as a 3-D U8 tensor [b, {m}, {(n + 7) // 8}]")
    b = int(stored.shape[0])
    if not bitplanes.MIN_PLANES <= b <= bitplanes.MAX_PLANES or tuple(stored.shape[1:]) != (m, (n + 7) // 8):
        raise CodecError(
            f"{at}: bitplanes of shape {list(stored.shape)}, expected [b, {m}, {(n + 7) // 8}] with b in "
            f"{bitplanes.MIN_PLANES}..{bitplanes.MAX_PLANES}"
        )
    bitplanes.check(stored, n, at)
    return stored


def read_planes(f: SafetensorsFile, spec: PartSpec, where: str) -> np.ndarray:
    """A ``bitplanes`` part's planes as stored (a private copy, checked), without unpacking them. A copy, not
    a mapping of the file: what a server holds must not change, or fault, if the file is later rewritten."""
    if spec.key not in f.tensors:
        raise CodecError(f"{where}: part {spec.key!r} is not in the file")
    return check_planes(spec, f.numpy(spec.key), where)


DECODE_THREADS = min(8, os.cpu_count() or 1)
PARALLEL_MIN_BYTES = 1 << 20  # decoded bytes below which a file's parts decode on the calling thread


class PartReader:
    """Reads and decodes parts of one file on a few threads (zstd and numpy release the GIL), submitted in the
    order given, while the caller takes them with :meth:`get`: a caller that takes them in that order works on
    part k while parts k+1... decode. A part's decoding raises from ``get`` (prefixed with ``where[key]``);
    results do not depend on the number of threads. Use as a context manager: leaving it cancels what has not
    started and waits for the rest."""

    def __init__(
        self, f: SafetensorsFile, specs: list[PartSpec], where: dict[str, str], threads: int | None = None
    ) -> None:
        self._f, self._where = f, where
        self._specs = {s.key: s for s in specs}
        n = DECODE_THREADS if threads is None else threads
        worth = len(specs) > 1 and sum(s.nbytes for s in specs) >= PARALLEL_MIN_BYTES  # else threads cost more
        self._pool = ThreadPoolExecutor(n) if n > 1 and worth else None
        self._futures: dict[str, Future[np.ndarray]] = {}
        if self._pool is not None:
            if f.size:
                f.ensure_mapped()  # the file's one mapping, made before the threads share it
            for s in specs:
                self._futures[s.key] = self._pool.submit(read_part, f, s, where[s.key])

    def get(self, key: str) -> np.ndarray:
        """Part ``key`` decoded (each part once: a second get of the same key decodes it again)."""
        fut = self._futures.pop(key, None)
        if fut is not None:
            return fut.result()
        return read_part(self._f, self._specs[key], self._where[key])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures.clear()

    def __enter__(self) -> PartReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_parts(f: SafetensorsFile, specs: list[PartSpec], where: dict[str, str]) -> dict[str, np.ndarray]:
    """Read and decode several parts of one file, largest first on a few threads; {key: array}. ``where[key]``
    prefixes error messages. The first error (in ``specs`` order) is raised."""
    with PartReader(f, sorted(specs, key=lambda s: -s.nbytes), where) as reader:
        return {s.key: reader.get(s.key) for s in specs}
