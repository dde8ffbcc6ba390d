"""Fast, shared loading: one backbone per (backbone digest, device) in the process, reference-counted, and a
byte-bounded LRU of decoded deltas.

A backbone is read with large sequential reads. On a CUDA device the reads go into the process's two pinned
host buffers (``STAGING``, allocated once and reused by every load) and are copied to the device
asynchronously, so reading chunk k+1 overlaps copying chunk k; the SHA-256 is computed on the same bytes as
they pass (one read of the file, not two; on a second thread). Tensors are then views into one flat device
buffer. Decoded delta parts go to a device the same way (``to_device``): nothing is copied to a device from
pageable memory one tensor at a time.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .format import stamps
from .format.safetensors_io import SafetensorsFile
from .tensors import TORCH_DTYPES, from_storage

CHUNK_BYTES = 64 << 20


class Staging:
    """The process's two pinned host buffers (``CHUNK_BYTES`` each) through which every host-to-device copy
    goes: allocated on first use and reused by every load after (pinning memory costs more than copying
    through it, so a load that pinned its own buffers would pay that each time). Filling one buffer overlaps
    the asynchronous copy out of the other, on a side stream per device. One user at a time (``lock``)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._bufs: list[torch.Tensor] | None = None
        self._last: list[Any] = [None, None]  # the event of the copy that last read each buffer
        self._streams: dict[str, Any] = {}
        self._next = 0

    def buffer(self) -> tuple[int, torch.Tensor]:
        """(index, buffer): the next buffer, once the copy that last read it is done. Hold ``lock``."""
        if self._bufs is None:
            self._bufs = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        k = self._next
        self._next ^= 1
        if self._last[k] is not None:
            self._last[k].synchronize()
            self._last[k] = None
        return k, self._bufs[k]

    def send(self, k: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy ``src`` (a slice of buffer ``k``) to ``dst`` on the device's side stream, asynchronously; the
        device's current stream waits for it before running anything queued after. Hold ``lock``."""
        key = str(dst.device)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = torch.cuda.Stream(device=dst.device)
        stream.wait_stream(torch.cuda.current_stream(dst.device))  # dst was allocated on the current stream
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        self._last[k] = ev
        torch.cuda.current_stream(dst.device).wait_event(ev)

    def synchronize(self) -> None:
        for k, ev in enumerate(self._last):
            if ev is not None:
                ev.synchronize()
                self._last[k] = None


STAGING = Staging()


def to_device(arr: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    """A host storage array (``wfactor.tensors.from_storage``) as a tensor on ``device``. On a CUDA device
    through the pinned staging buffers (no per-tensor copy from pageable memory; the host returns while the
    copy runs, and the device's current stream waits for it); on CPU the array itself (no copy)."""
    host = from_storage(arr, dtype)
    if device.type != "cuda":
        return host.to(device)
    flat = host.reshape(-1).view(torch.uint8) if host.numel() else host.reshape(-1)
    out = torch.empty(flat.numel(), dtype=flat.dtype, device=device)
    with STAGING.lock:
        pos = 0
        while pos < flat.numel():
            k, buf = STAGING.buffer()
            n = min(CHUNK_BYTES, flat.numel() - pos)
            buf[:n].copy_(flat[pos : pos + n])
            STAGING.send(k, buf[:n], out[pos : pos + n])
            pos += n
    return out.view(host.dtype).reshape(host.shape) if host.numel() else out.reshape(host.shape).to(host.dtype)


def read_flat(
    fh: io.BufferedReader,
    start: int,
    length: int,
    device: torch.device,
    hasher: hashlib._Hash | None = None,
    path: str = "file",
) -> torch.Tensor:
    """Bytes [start, start + length) of the open file ``fh`` (``path``, for messages) as one uint8 tensor on
    ``device``. ``hasher`` (if given) is fed the whole file, header included, in order. On a CUDA device the
    bytes are read into the pinned staging buffers and copied to the device while the next chunk is read."""
    out = torch.empty(length, dtype=torch.uint8, device=device)
    fh.seek(0)
    if hasher is not None:
        hasher.update(fh.read(start))
    else:
        fh.seek(start)
    if device.type == "cpu":  # straight into the tensor, hashed on a second thread as it is read
        stamps.read_exact(fh, out.numpy().data.cast("B"), hasher, path, start)
    else:
        with STAGING.lock:
            pos = 0
            while pos < length:
                k, buf = STAGING.buffer()
                want = min(CHUNK_BYTES, length - pos)
                view = buf.numpy().data.cast("B")[:want]
                stamps.read_exact(fh, view, hasher, path, start + pos)
                STAGING.send(k, buf[:want], out[pos : pos + want])
                pos += want
            STAGING.synchronize()
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
