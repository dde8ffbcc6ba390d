"""What to run on which family (``Setup``; its defaults are the fixture family's full sweep) and what one
run collected (``Run``), which the report renders."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import FAMILY

from lossy.fixed_codecs import Encoder, enc_bitdelta, enc_dare, enc_lowrank, enc_quant, enc_sparse
from lossy.points import Point

NAME = "planner_vs_fixed"
E_SWEEP = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
# Family-wide byte budget (only if wfactor.Budget has target_bytes / target_ratio): one run per E listed,
# with the target set to that per-tensor budget's on-disk family bytes, so the two modes meet at equal size.
TARGET_ENV = "WFACTOR_BENCH_TARGET_AT_E"
TARGET_AT_E = [
    float(x)
    for x in os.environ.get(TARGET_ENV, "0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.3,0.5,0.7,1.0").split(",")
    if x.strip()
]


def fixed_settings() -> list[tuple[str, str, Encoder]]:
    """The fixture family's fixed-codec sweep."""
    s: list[tuple[str, str, Encoder]] = []
    s += [("quant", f"{k}-bit", enc_quant(k)) for k in range(2, 9)]
    s += [("lowrank", f"rank {r}", enc_lowrank(r)) for r in (1, 2, 4, 8, 16, 32)]
    s += [("sparse", f"top {d:.0%}", enc_sparse(d)) for d in (0.01, 0.05, 0.10, 0.25)]
    s += [("bitdelta", "sign + 1 scale", enc_bitdelta)]
    s += [("dare", f"keep {p:.0%}", enc_dare(p)) for p in (0.1, 0.3, 0.5)]
    return s


@dataclass
class Setup:
    """What to run on which family; the defaults are the fixture family's full sweep."""

    family: Path = FAMILY
    label: str = "fixture"
    name: str = NAME
    title: str = "Planner vs single fixed codecs (issue 3 acceptance)"
    script: str = "bench/planner_vs_fixed.py"
    e_sweep: list[float] = field(default_factory=lambda: list(E_SWEEP))
    target_at_e: list[float] = field(default_factory=lambda: list(TARGET_AT_E))
    # byte targets also at this many geometric steps between consecutive matched sizes (a denser curve)
    target_between: int = int(os.environ.get("WFACTOR_BENCH_TARGETS_BETWEEN", "2"))
    fixed: Callable[[], list[tuple[str, str, Encoder]]] = fixed_settings


@dataclass
class Run:
    setup: Setup
    info: dict[str, Any]
    raw: int
    base_cos: dict[str, float]
    check: float
    planner: list[Point]
    lossless: Point
    target_points: list[Point]
    target_note: str
    reference: Point
    fixed: list[Point]
    fixed_view: list[Point]
    unrelated_bytes: int
    seconds: float = 0.0
    plot: str | None = None
