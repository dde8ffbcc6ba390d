"""Paths inside a family directory (spec/FORMAT.md section 3.2)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from ..errors import FormatError


def check_relpath(p: Any, where: str) -> str:
    """Manifest paths are relative POSIX paths inside the family: no absolute paths, no '..', no '\\'."""
    if not isinstance(p, str) or not p or "\\" in p or "\x00" in p:
        raise FormatError(f"{where}: path must be a non-empty relative POSIX path, found {p!r}")
    pp = PurePosixPath(p)
    if pp.is_absolute() or any(part in ("..", ".", "") for part in p.split("/")):
        raise FormatError(f"{where}: path {p!r} must stay inside the family directory")
    return p
