"""Crash-safe writes: every file and directory of a family appears complete or not at all.

The protocol (spec/FORMAT.md section 9.1):

- a **file** is written under a temporary name beside its final name (``.<name>.tmp-<pid>``), flushed and
  fsynced, then renamed over the final name (``os.replace``, atomic on POSIX), and the directory is fsynced;
- a **new family** is written into a hidden work directory beside the target (``.<name>.tmp-<pid>``), its
  manifest last, and the finished directory is renamed to the target name (atomic while the target does
  not exist);
- an **existing family** (``factor --force``) is swapped with the finished one in one atomic
  ``renameat2(RENAME_EXCHANGE)`` call (Linux >= 3.15); the old family then sits in the work directory and
  is deleted. Where the exchange is not available, the old family is first renamed to
  ``.<name>.old-<pid>``, then the new one to the target; a crash between the two renames leaves no target
  but the complete old family under the ``.old-`` name, and :func:`recover` (run by every ``factor``
  before it starts) renames it back;
- a command that changes a family in place (adding or removing a member) writes every new file under a
  name the current manifest does not reference, then replaces ``wfactor.json`` last with
  :func:`atomic_file`; files no longer referenced are deleted only after that. A reader only follows the
  manifest, so it sees the old family or the new one, never a mixture.

Work directories and trash of a process that no longer runs are removed by :func:`recover`; they are
hidden (leading ``.``) and hold no manifest at their top level, so they are never mistaken for a family.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "wfactor.json"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden temporary name beside ``path`` used by this process: ``.<name>.<kind>-<pid>``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename it over ``path``.
    If the block raises, the temporary file is removed and ``path`` is untouched."""
    final = Path(path)
    tmp = temp_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def staged_files() -> Iterator[list[tuple[Path, Path]]]:
    """Collect (temporary, final) path pairs while files are written under temporary names; when the block
    ends normally each is renamed into place, when it raises every temporary is deleted."""
    pairs: list[tuple[Path, Path]] = []
    try:
        yield pairs
    except BaseException:
        for t, _ in pairs:
            t.unlink(missing_ok=True)
        raise
    for t, final in pairs:
        os.replace(t, final)


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist). False if unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: Path, target: Path, use_exchange: bool = True) -> None:
    """Put the complete directory ``new`` at ``target``; an existing ``target`` stays whole until then.

    Afterwards ``new`` no longer exists (it is renamed, or it held the old target and is deleted)."""
    if not target.exists():
        os.replace(new, target)
    elif use_exchange and exchange(new, target):
        fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # now the old family
    else:
        trash = temp_name(target, "old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(target, trash)
        os.replace(new, target)
        fsync_dir(target.parent)
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(target.parent)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: Path) -> list[Path]:
    """Tidy what a killed writer of ``target`` left beside it; returns the paths removed or restored.

    A ``.<name>.old-<pid>`` trash directory of a dead process that holds a manifest, while ``target`` does
    not exist, is the previous family of an interrupted replacement: it is renamed back to ``target``. Every
    other ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` entry of a dead process is removed. Entries of
    running processes are left alone."""
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(r"\." + re.escape(target.name) + r"\.(tmp|old)-([0-9]+)")
    found = []
    for entry in sorted(parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m and not _alive(int(m.group(2))):
            found.append((m.group(1), entry))
    touched = []
    for kind, entry in found:
        if kind == "old" and not target.exists() and (entry / MANIFEST).is_file():
            os.replace(entry, target)
            fsync_dir(parent)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        touched.append(entry)
    return touched
