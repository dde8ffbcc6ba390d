"""One measured point of the comparison (a planner budget or a fixed-codec setting) and the keys that the
comparisons sort points by."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common import RELATED


@dataclass
class Point:
    method: str
    setting: str
    backbone: int
    member_bytes: dict[str, int]  # delta payload bytes (stored parts), every member incl. unrelated
    cos: dict[str, float]  # worst cosine per member (related; the planner also has unrelated)
    disk: int | None = None  # family bytes on disk (backbone + delta files), planner only
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family_bytes(self) -> int:
        return self.backbone + sum(self.member_bytes.values())

    @property
    def related_bytes(self) -> int:
        return sum(self.member_bytes[m] for m in RELATED)

    @property
    def worst(self) -> float:
        return min(self.cos[m] for m in RELATED)

    @property
    def label(self) -> str:
        return f"{self.method} {self.setting}"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(family_bytes=self.family_bytes, related_bytes=self.related_bytes, worst=self.worst)
        return d


def e_of(p: Point) -> float:
    """The per-tensor budget E of a planner point labelled ``E=...``."""
    return float(p.setting.split("=")[1])


def fam_key(p: Point) -> int:
    return p.family_bytes


def rel_key(p: Point) -> int:
    return p.related_bytes
