"""Fast, shared loading: one backbone per (backbone digest, device) in the process, reference-counted, and a
byte-bounded LRU of decoded deltas.

A backbone is read with large sequential reads. On a CUDA device the reads go into two reusable pinned host
buffers and are copied to the device asynchronously, so reading chunk k+1 overlaps copying chunk k; the
SHA-256 is computed on the same bytes as they pass (one read of the file, not two). Tensors are then views
into one flat device buffer: no per-tensor `.to(device)` from pageable memory-mapped pages.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import IntegrityError
from .format.safetensors_io import SafetensorsFile
from .tensors import TORCH_DTYPES

CHUNK_BYTES = 64 << 20


def read_flat(
    fh: io.BufferedReader,
    start: int,
    length: int,
    device: torch.device,
    hasher: hashlib._Hash | None = None,
    path: str = "file",
) -> torch.Tensor:
    """Bytes [start, start + length) of the open file ``fh`` (``path``, for messages) as one uint8 tensor on
    ``device``. ``hasher`` (if given) is fed the whole file, header included, in order."""
    out = torch.empty(length, dtype=torch.uint8, device=device)
    fh.seek(0)
    if hasher is not None:
        hasher.update(fh.read(start))
    else:
        fh.seek(start)
    if device.type == "cpu":
        view = out.numpy().data.cast("B")
        pos = 0
        while pos < length:
            n = fh.readinto(view[pos : min(length, pos + CHUNK_BYTES)])
            if not n:
                raise IntegrityError(f"{path}: ended after {start + pos} bytes, expected {start + length}")
            if hasher is not None:
                hasher.update(view[pos : pos + n])
            pos += n
    else:
        bufs = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        stream = torch.cuda.Stream(device=device)
        pos, k = 0, 0
        while pos < length:
            buf, ev = bufs[k % 2], events[k % 2]
            ev.synchronize()  # the copy that last used this buffer is done
            want = min(CHUNK_BYTES, length - pos)
            n = fh.readinto(buf.numpy().data.cast("B")[:want])
            if n != want:
                raise IntegrityError(f"{path}: ended after {start + pos + n} bytes, expected {start + length}")
            if hasher is not None:
                hasher.update(buf.numpy().data.cast("B")[:n])
            with torch.cuda.stream(stream):
                out[pos : pos + n].copy_(buf[:n], non_blocking=True)
                ev.record(stream)
            pos += n
            k += 1
        stream.synchronize()
    if hasher is not None:
        hasher.update(fh.read())  # nothing follows the data section in a valid file; hash it anyway
    return out


def tensors_from_flat(f: SafetensorsFile, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of every tensor of ``f`` into its data section ``flat`` (no copies where aligned)."""
    out = {}
    for name, info in f.tensors.items():
        raw = flat[info.begin : info.end]
        dtype = TORCH_DTYPES[info.dtype]
        size = torch.empty((), dtype=dtype).element_size()
        if raw.data_ptr() % size:  # misaligned (not written by wfactor): copy into an aligned tensor
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(info.shape)
    return out


@dataclass
class _Entry:
    tensors: dict[str, torch.Tensor]
    nbytes: int
    refs: int = 0


class BackboneRegistry:
    """Process-wide: a backbone is loaded once per (sha256, device), whichever Family object asks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}

    def acquire(
        self, sha256: str, device: torch.device, load: Callable[[], tuple[dict[str, torch.Tensor], int]]
    ) -> dict[str, torch.Tensor]:
        key = (sha256, str(device))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                tensors, nbytes = load()
                entry = self._entries[key] = _Entry(tensors, nbytes)
            entry.refs += 1
            return entry.tensors

    def release(self, sha256: str, device: torch.device) -> None:
        key = (sha256, str(device))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs <= 0:
                del self._entries[key]

    def refs(self, sha256: str, device: torch.device | str) -> int:
        """How many Family objects hold the backbone on ``device`` (0: not resident)."""
        with self._lock:
            entry = self._entries.get((sha256, str(torch.device(device))))
            return entry.refs if entry is not None else 0

    def resident(self) -> dict[tuple[str, str], int]:
        """(sha256, device) -> bytes, for every backbone held."""
        with self._lock:
            return {k: e.nbytes for k, e in self._entries.items()}


BACKBONES = BackboneRegistry()


@dataclass
class DeltaCache:
    """Decoded delta parts per (member, device), least recently used first out, bounded in bytes."""

    max_bytes: int = 1 << 30
    _items: OrderedDict[tuple[str, str], tuple[dict[str, torch.Tensor], int]] = field(default_factory=OrderedDict)
    used: int = 0

    def get(self, member: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        key = (member, str(device))
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, member: str, device: torch.device, parts: dict[str, torch.Tensor]) -> None:
        key = (member, str(device))
        nbytes = sum(t.numel() * t.element_size() for t in parts.values())
        if key in self._items:
            self.used -= self._items.pop(key)[1]
        if nbytes > self.max_bytes:
            return  # larger than the whole cache: not kept
        while self._items and self.used + nbytes > self.max_bytes:
            _k, (_p, n) = self._items.popitem(last=False)
            self.used -= n
        self._items[key] = (parts, nbytes)
        self.used += nbytes

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()
        self.used = 0
