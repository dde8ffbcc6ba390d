"""A validating safetensors reader and a streaming writer, independent of torch.

Everything wfactor reads from a family goes through :class:`SafetensorsFile`, so the limits of
spec/FORMAT.md section 7 are enforced in one place, before anything is allocated.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import LimitError, NotFoundError, NotSafetensorsError, UnsupportedDtypeError, WfactorError
from .constants import (
    DTYPES,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_NUMEL,
    MAX_SAFETENSORS_HEADER,
    MAX_TENSORS,
    SAFETENSORS_ONLY_DTYPES,
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def loads_strict(text: str | bytes) -> Any:
    """json.loads that rejects duplicate keys and NaN/Infinity (spec 3, 7: RFC 8259 JSON only).

    Every failure, deep nesting included, is a ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def check_shape(shape: Any, where: str, bad: type[WfactorError] = NotSafetensorsError) -> tuple[int, ...]:
    """A shape: a list of non-negative integers (else ``bad``), at most 8 of them whose product is at most
    2^40 (else ``limit``). Checked before anything of that shape is allocated."""
    if not isinstance(shape, list):
        raise bad(f"{where}: shape must be a list of non-negative integers, found {shape!r:.80}")
    if len(shape) > MAX_NDIM:
        raise LimitError(f"{where}: shape must have at most {MAX_NDIM} dimensions, found {len(shape)}")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise bad(f"{where}: dimensions must be non-negative integers, found {shape!r:.80}")
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_NUMEL:
            raise LimitError(f"{where}: {shape} has more than {MAX_NUMEL} elements (limit)")
    return tuple(shape)


def check_name(
    name: Any, where: str, limit: int = MAX_NAME_BYTES, bad: type[WfactorError] = NotSafetensorsError
) -> str:
    """A tensor name: a string (else ``bad``) of 1..``limit`` UTF-8 bytes (else ``limit``)."""
    if not isinstance(name, str):
        raise bad(f"{where}: a tensor name must be a string, found {name!r:.80}")
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (JSON "\\ud800") is not UTF-8
        raise bad(f"{where}: tensor name {name!r:.80} is not valid UTF-8") from None
    if not 1 <= n <= limit:
        raise LimitError(f"{where}: tensor names are 1..{limit} UTF-8 bytes, found {n}: {name!r:.80}")
    return name


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike[str], opened: BinaryIO | None = None) -> None:
        """``opened``: the file already open (e.g. just checked against its digest), at offset 0; it is owned
        from here on (closed with this object). Else ``path`` is opened."""
        self.path = Path(path)
        if opened is not None:
            self._fh: BinaryIO = opened
        else:
            try:
                self._fh = open(self.path, "rb")
            except FileNotFoundError:
                raise NotFoundError(f"{self.path}: no such file") from None
            except IsADirectoryError:
                raise NotSafetensorsError(f"{self.path}: is a directory, expected a .safetensors file") from None
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise
        self._mm: mmap.mmap | None = None

    def _parse(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(8)
        if len(head) < 8:
            raise NotSafetensorsError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER:
            raise NotSafetensorsError(
                f"{self.path}: not a safetensors file, or its header declares {n} bytes "
                f"(limit {MAX_SAFETENSORS_HEADER})"
            )
        if 8 + n > size:
            raise NotSafetensorsError(f"{self.path}: header length {n} runs past the end of the file ({size} bytes)")
        raw = self._fh.read(n)
        try:
            header = loads_strict(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise NotSafetensorsError(
                f"{self.path}: not a safetensors file (header is not valid JSON: {exc})"
            ) from None
        if not isinstance(header, dict):
            raise NotSafetensorsError(f"{self.path}: safetensors header must be a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise NotSafetensorsError(f"{self.path}: __metadata__ must map strings to strings")
        if len(header) > MAX_TENSORS:
            raise LimitError(f"{self.path}: {len(header)} tensors (limit {MAX_TENSORS})")
        self.data_start = 8 + n
        data_len = size - self.data_start
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            check_name(name, str(self.path), MAX_KEY_BYTES)
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
                raise NotSafetensorsError(f"{where}: entry must hold dtype, shape and data_offsets")
            dtype = entry.get("dtype")
            if isinstance(dtype, str) and dtype in SAFETENSORS_ONLY_DTYPES:
                raise UnsupportedDtypeError(
                    f"{where}: dtype {dtype} is valid safetensors but this version of wfactor reads only "
                    f"{', '.join(sorted(DTYPES))}; convert the tensor (e.g. to BF16) or upgrade wfactor",
                    path=str(self.path), tensor=name, expected=" | ".join(sorted(DTYPES)), found=dtype,
                )
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise NotSafetensorsError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
            shape = check_shape(entry.get("shape"), where)
            offs = entry.get("data_offsets")
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            ):
                raise NotSafetensorsError(f"{where}: data_offsets must be two integers")
            begin, end = offs
            info = TensorInfo(name, dtype, shape, begin, end)
            if not 0 <= begin <= end <= data_len or end - begin != info.numel * DTYPES[dtype][1]:
                raise NotSafetensorsError(
                    f"{where}: data_offsets {offs} do not fit its shape {list(shape)} x {dtype} "
                    f"inside the {data_len}-byte data section"
                )
            infos[name] = info
        pos = 0
        for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
            if info.begin != pos:
                raise NotSafetensorsError(
                    f"{self.path}: tensor data must be contiguous and non-overlapping; "
                    f"{info.name!r} starts at {info.begin}, expected {pos}"
                )
            pos = info.end
        if pos != data_len:
            raise NotSafetensorsError(f"{self.path}: {data_len - pos} bytes after the last tensor (must be none)")
        self.metadata: dict[str, str] = meta
        self.tensors: dict[str, TensorInfo] = infos
        self.size = size

    # -- reading ---------------------------------------------------------------------------------------
    def reopen(self) -> io.BufferedReader:
        """A new file object on the very file that was parsed (a duplicate descriptor: the same inode even if
        the path was replaced since), for sequential reads of the whole file."""
        return os.fdopen(os.dup(self._fh.fileno()), "rb")

    def ensure_mapped(self) -> None:
        """Make the file's one mapping now (before threads share the file)."""
        self._map()

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None  # type: ignore[assignment]
        assert self._mm is not None
        return self._mm

    def prefetch(self) -> None:
        """Ask the kernel to start reading the whole file into the page cache now, in large requests (a file
        about to be read whole: its parts then come from memory, not one page fault at a time)."""
        if self.size and hasattr(mmap, "MADV_WILLNEED"):
            with contextlib.suppress(OSError):
                self._map().madvise(mmap.MADV_WILLNEED)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor named {name!r}") from None

    def read_bytes(self, name: str) -> bytes:
        """A private copy of one tensor's bytes."""
        info = self.info(name)
        if info.nbytes == 0:
            return b""
        mm = self._map()
        return mm[self.data_start + info.begin : self.data_start + info.end]

    @contextlib.contextmanager
    def view(self, name: str) -> Iterator[memoryview]:
        """One tensor's bytes as a read-only view of the file's mapping, no copy; valid inside the ``with``."""
        info = self.info(name)
        if info.nbytes == 0:
            yield memoryview(b"")
            return
        mv = memoryview(self._map())[self.data_start + info.begin : self.data_start + info.end]
        try:
            yield mv
        finally:
            mv.release()

    def numpy(self, name: str) -> np.ndarray:
        """A writable copy of one tensor as numpy (BF16 comes back as uint16 bit patterns)."""
        info = self.info(name)
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=DTYPES[info.dtype][0])
        view = memoryview(self._map())[self.data_start + info.begin : self.data_start + info.end]
        try:
            mapped = np.frombuffer(view, dtype=DTYPES[info.dtype][0])
            arr = mapped.copy()  # one copy, straight from the mapped pages
            del mapped
        finally:
            view.release()
        return arr.reshape(info.shape)

    def mapped(self, name: str) -> np.ndarray:
        """One tensor as a writable numpy array over a private copy-on-write mapping of the file: no copy is
        made; its pages are the file's (page cache, not anonymous memory) until something writes to them,
        and a write never reaches the file. Falls back to ``numpy()`` (a copy) when the tensor's offset is not
        aligned to its item size. The mapping lives as long as the array."""
        info = self.info(name)
        dt = np.dtype(DTYPES[info.dtype][0])
        start = self.data_start + info.begin
        if info.nbytes == 0 or start % dt.itemsize:
            return self.numpy(name)
        # a mapping of its own per call, so that what one caller writes no other array sees
        lead = start % mmap.ALLOCATIONGRANULARITY
        cow = mmap.mmap(self._fh.fileno(), lead + info.nbytes, access=mmap.ACCESS_COPY, offset=start - lead)
        return np.frombuffer(cow, dtype=dt, count=info.nbytes // dt.itemsize, offset=lead).reshape(info.shape)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writing -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def layout(entries: Iterable[Entry]) -> list[Entry]:
    """The order tensors are laid out in: larger items first (keeps every tensor aligned), then by name."""
    return sorted(entries, key=lambda e: (-DTYPES[e.dtype][1], e.name))


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


_WRITTEN: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}  # path -> (its stat identity, SHA-256)


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def note_written(path: Path, fh: Any, digest: str) -> None:
    """Remember the SHA-256 of a file this process just wrote, keyed by its stat identity (device, inode,
    size, mtime, ctime: any later write, rename or copy changes it), so that the manifest entry for it
    (:meth:`wfactor.format.manifest.FileRef.of`) need not read it again."""
    _WRITTEN[str(Path(path).resolve())] = (_identity(os.fstat(fh.fileno())), digest)


def written_digest(path: Path) -> str | None:
    """The SHA-256 :func:`note_written` recorded for ``path``, if the file is still exactly that file."""
    got = _WRITTEN.get(str(Path(path).resolve()))
    if got is None:
        return None
    try:
        same = _identity(os.stat(path)) == got[0]
    except OSError:
        return None
    return got[1] if same else None


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(2) with SYNC_FILE_RANGE_WRITE (start writing a range back, do not wait), or None
    where libc has no such call."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    sync_file_range_write = 2

    def start(fd: int, offset: int, nbytes: int) -> None:
        call(fd, offset, nbytes, sync_file_range_write)  # advisory: a failure only leaves it to the fsync

    return start


_START_WRITEBACK = _load_sync_file_range()
WRITEBACK_EVERY = 32 << 20


class HashingWriter:
    """A file being written whose SHA-256 is computed from the bytes written (no second read of the file):
    chunk k is hashed on a second thread while chunk k+1 is written (both release the GIL).

    Every WRITEBACK_EVERY bytes, the kernel is asked to start writing what was written so far back to disk
    (Linux: sync_file_range, no wait), so that the fsync that makes the file durable before it is renamed
    waits for the last few MB only, not for the whole file: the disk works while the next tensors are planned."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.hasher = hashlib.sha256()
        self.size = 0
        self._pool = ThreadPoolExecutor(1)
        self._pending: Future[None] | None = None
        self._flushed = 0  # bytes handed to the kernel for writeback

    def write(self, data: bytes | memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
        self.fh.write(data)
        self.size += len(data)
        self._pending = self._pool.submit(self.hasher.update, data)
        if _START_WRITEBACK is not None and self.size - self._flushed >= WRITEBACK_EVERY:
            self.fh.flush()
            _START_WRITEBACK(self.fh.fileno(), self._flushed, self.size - self._flushed)
            self._flushed = self.size

    def hexdigest(self) -> str:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self._pool.shutdown(wait=True)
        return self.hasher.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def write_streaming(
    path: Path,
    entries: list[Entry],
    produce: Callable[[Entry], bytes | memoryview],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """Write a safetensors file whose shapes are known up front, asking ``produce`` for one tensor at a time;
    returns the file's SHA-256 (hashed as it is written)."""
    ordered = layout(entries)
    with open(path, "wb") as fh:
        out = HashingWriter(fh)
        try:
            out.write(header_bytes(ordered, metadata))
            for e in ordered:
                data = produce(e)
                if len(data) != e.nbytes:
                    raise AssertionError(f"{e.name}: produced {len(data)} bytes, expected {e.nbytes}")
                out.write(data)
                if on_bytes:
                    on_bytes(len(data))
            digest = out.hexdigest()
        finally:
            out.close()
        fh.flush()
        os.fsync(fh.fileno())
        note_written(path, fh, digest)
    return digest


class SpoolWriter:
    """Collects tensors whose shapes are not known up front in a spool file, then writes the final file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spool = tempfile.TemporaryFile(dir=path.parent)
        self._where: dict[str, tuple[Entry, int]] = {}
        self._pos = 0

    def add(self, name: str, dtype: str, shape: tuple[int, ...], data: bytes | memoryview) -> None:
        if name in self._where:
            raise AssertionError(f"duplicate tensor {name!r}")
        entry = Entry(name, dtype, tuple(shape))
        if len(data) != entry.nbytes:
            raise AssertionError(f"{name}: {len(data)} bytes for {shape} x {dtype}")
        self._spool.write(data)
        self._where[name] = (entry, self._pos)
        self._pos += len(data)

    def __iter__(self) -> Iterator[Entry]:
        return (e for e, _ in self._where.values())

    def finish(self, metadata: dict[str, str] | None) -> str:
        """Write the final file (header, then the spooled tensors in layout order); returns its SHA-256."""
        ordered = layout(e for e, _ in self._where.values())
        self._spool.flush()
        with open(self.path, "wb") as fh:
            out = HashingWriter(fh)
            try:
                out.write(header_bytes(ordered, metadata))
                for e in ordered:
                    self._spool.seek(self._where[e.name][1])
                    remaining = e.nbytes
                    while remaining:
                        chunk = self._spool.read(min(remaining, 8 << 20))
                        out.write(chunk)
                        remaining -= len(chunk)
                digest = out.hexdigest()
            finally:
                out.close()
            fh.flush()
            os.fsync(fh.fileno())
            note_written(self.path, fh, digest)
        self._spool.close()
        return digest

    def abort(self) -> None:
        self._spool.close()
