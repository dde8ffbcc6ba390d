"""Verified-file stamps: a file whose SHA-256 was checked once is not hashed again while it is unchanged.

Hashing is the only part of loading that cannot go faster than one core (SHA-256 runs at ~1.5 GB/s here;
a 14 GB backbone is ~10 s of hashing before any byte reaches a GPU). So, like git's index, a successful
check leaves a **stamp**: the file's (device, inode, size, mtime_ns, ctime_ns) recorded under its digest.
A later check of the same digest that finds a file with the same stamp trusts it without reading it.

Why this is safe enough for every load: any write to a file, any rename over it, any copy or restore changes
its ctime (which user code cannot set back) or its inode; a stamp is only recorded when the file did not
change while it was hashed (fstat before and after) and its last change is at least ``SETTLE_NS`` old (a
write within the same timestamp tick as the stamp could otherwise keep the ctime: git's "racy" case).
What it does not cover: a disk that silently returns other bytes for an unchanged inode (bit rot below the
filesystem). ``wfactor verify`` and ``Family.verify`` always hash every byte, and ``WFACTOR_VERIFY=always``
turns stamps off for loads too.

Stamps live in ``$WFACTOR_CACHE/verified`` (default ``$XDG_CACHE_HOME/wfactor`` or ``~/.cache/wfactor``), one
small JSON file per digest. A cache that cannot be read or written is ignored: loads then hash, as without.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import IntegrityError

CACHE_ENV = "WFACTOR_CACHE"
VERIFY_ENV = "WFACTOR_VERIFY"
SETTLE_NS = 1_000_000_000
MAX_STAMPS = 16  # per digest: copies of one file in several places, newest kept

Stamp = tuple[int, int, int, int, int]

_lock = threading.Lock()
_memo: dict[str, set[Stamp]] = {}


def enabled() -> bool:
    return os.environ.get(VERIFY_ENV, "").strip().lower() not in ("always", "full")


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV]))
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(os.path.expanduser(xdg)) if xdg else Path.home() / ".cache") / "wfactor"


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _path(sha256: str) -> Path:
    return cache_dir() / "verified" / sha256


def _load(sha256: str) -> set[Stamp]:
    try:
        raw = json.loads(_path(sha256).read_text())
        return {tuple(int(x) for x in s) for s in raw if isinstance(s, list) and len(s) == 5}  # type: ignore[misc]
    except (OSError, ValueError, TypeError):
        return set()


def trusted(st: os.stat_result, sha256: str) -> bool:
    """Whether a stamp says the file ``st`` (an fstat of the open file) has digest ``sha256``."""
    if not enabled():
        return False
    key = stamp_of(st)
    with _lock:
        if key in _memo.get(sha256, ()):
            return True
        found = _load(sha256)
        _memo[sha256] = found
        return key in found


def remember(before: os.stat_result, after: os.stat_result, sha256: str) -> bool:
    """Record that the file stamped ``before`` hashed to ``sha256``, if it did not change while it was read
    (``after``, an fstat when the hash was done) and settled before the hash began. True if recorded."""
    if not enabled() or stamp_of(before) != stamp_of(after):
        return False
    if time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) < SETTLE_NS:
        return False
    key = stamp_of(before)
    with _lock:
        stamps = _load(sha256) | {key}
        keep = sorted(stamps, key=lambda s: (s[4], s), reverse=True)[:MAX_STAMPS]
        _memo[sha256] = set(keep)
        path = _path(sha256)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps([list(s) for s in sorted(keep)]))
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
    return True


def forget_memo() -> None:
    """Drop the in-process memo (the files stay): the next check reads the cache again."""
    with _lock:
        _memo.clear()


READ_CHUNK = 8 << 20


def read_exact(fh: Any, view: memoryview, hasher: Any = None, path: str = "file", offset: int = 0) -> None:
    """Fill ``view`` from ``fh``'s current position with large sequential reads. ``hasher`` (if given) is fed
    the same bytes in order; chunk k is hashed on a second thread while chunk k+1 is read (both release the
    GIL), so a file that is checked costs max(read, hash), not their sum. ``offset``: where ``view`` starts in
    the file, for the message when the file ends too early (error ``integrity``)."""
    total, pos = len(view), 0
    pending: Future[None] | None = None
    pool = ThreadPoolExecutor(1) if hasher is not None and total > READ_CHUNK else None
    try:
        while pos < total:
            n = fh.readinto(view[pos : min(total, pos + READ_CHUNK)])
            if not n:
                raise IntegrityError(f"{path}: ended after {offset + pos} bytes, expected {offset + total}")
            if hasher is not None:
                if pool is None:
                    hasher.update(view[pos : pos + n])
                else:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(hasher.update, view[pos : pos + n])
            pos += n
        if pending is not None:
            pending.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def hash_open_file(fh: Any, chunk: int = READ_CHUNK) -> str:
    """SHA-256 of the rest of the open file ``fh``; reading chunk k+1 overlaps hashing chunk k (two buffers)."""
    h = hashlib.sha256()
    try:
        left = max(0, os.fstat(fh.fileno()).st_size - fh.tell())
    except (OSError, AttributeError, ValueError):
        left = chunk
    size = max(1, min(chunk, left))
    bufs = [bytearray(size), bytearray(size)]
    pending: Future[None] | None = None
    with ThreadPoolExecutor(1) as pool:
        k = 0
        while True:
            view = memoryview(bufs[k % 2])
            n = fh.readinto(view)
            if pending is not None:
                pending.result()  # chunk k - 1 hashed: its buffer is free for chunk k + 1
            if not n:
                break
            pending = pool.submit(h.update, view[:n])
            k += 1
    return h.hexdigest()


def open_file_matches(fh: Any, sha256: str, use_stamps: bool = True) -> str:
    """The SHA-256 of the open file ``fh`` (from its start): ``sha256`` itself when a stamp vouches for it
    (nothing read), else hashed (and a stamp recorded when it matches). The caller compares the result with
    what it expects, then may read the same open file: what it reads is what was checked (the same inode)."""
    before = os.fstat(fh.fileno())
    if use_stamps and trusted(before, sha256):
        return sha256
    fh.seek(0)
    got = hash_open_file(fh)
    if got == sha256:  # a full check (verify) leaves a stamp too
        remember(before, os.fstat(fh.fileno()), sha256)
    return got


def file_matches(path: Path, sha256: str, use_stamps: bool = True) -> str:
    """:func:`open_file_matches` on the file at ``path``."""
    with open(path, "rb") as fh:
        return open_file_matches(fh, sha256, use_stamps)
