"""Components of a pipeline member (spec/FORMAT.md section 3.3): the manifest side, without torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, NotFoundError
from .paths import check_relpath

COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SEP = "/"


@dataclass
class Component:
    """One component checkpoint of a pipeline member: its name (the tensor namespace), the relative POSIX
    path its weights are written back to, and how many tensors it has."""

    name: str
    file: str
    tensors: int = 0
    files: list[Path] = field(default_factory=list)  # source shards (input side only)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "tensors": self.tensors}


def components_from_json(obj: Any, where: str) -> list[Component]:
    """Parse a manifest member's ``components`` (absent -> []). Raises FormatError when malformed."""
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise FormatError(f"{where}: components must be a list")
    out: list[Component] = []
    for i, c in enumerate(obj):
        w = f"{where}: components[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not COMPONENT_RE.match(c["name"]):
            raise FormatError(f"{w}: needs a name matching {COMPONENT_RE.pattern}")
        n = c.get("tensors", 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise FormatError(f"{w}: tensors must be a non-negative integer")
        path = check_relpath(c.get("file"), w)
        if not path.endswith(".safetensors"):
            raise FormatError(f"{w}: file {path!r} must end in .safetensors")
        if any(o.name == c["name"] for o in out) or any(o.file == path for o in out):
            raise FormatError(f"{w}: component {c['name']!r} or its file {path!r} appears twice")
        out.append(Component(c["name"], path, n))
    return out


def split_name(tensor: str) -> tuple[str, str]:
    """``unet/conv_in.weight`` -> (``unet``, ``conv_in.weight``)."""
    comp, _, local = tensor.partition(SEP)
    return comp, local


def component_of(entry: Any, component: str, where: str) -> str:
    """Check ``component`` names a component of the manifest member ``entry``; returns its tensor prefix."""
    names = [c.name for c in getattr(entry, "components", [])]
    if component not in names:
        have = ", ".join(names) if names else "none: it is not a pipeline member"
        raise NotFoundError(f"{where}: member {entry.name!r} has no component {component!r} (components: {have})")
    return component + SEP
