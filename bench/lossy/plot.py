"""The size vs worst cosine figure of a run, bench/<name>.png (through ``bench/plots.py``)."""

from __future__ import annotations

import plots
from common import family_label

from lossy.points import Point
from lossy.setup import Setup


def plot(setup: Setup, planner: list[Point], fixed: list[Point]) -> str | None:
    """Size vs worst cosine, one curve per method (x: the related members' delta bytes); bench/<name>.png."""
    curves: dict[str, list[tuple[float, float]]] = {
        "wfactor planner, per-tensor budget E": [
            (p.related_bytes, p.worst) for p in planner if p.setting.startswith("E=")
        ],
        "wfactor planner, family byte target": [
            (p.related_bytes, p.worst) for p in planner if p.setting.startswith("target=")
        ],
    }
    for p in fixed:
        curves.setdefault(p.method, []).append((p.related_bytes, p.worst))
    return plots.size_vs_cosine(
        curves,
        f"{setup.name}.png",
        xlabel="bytes of the five related members' deltas (MB)",
        title=f"{setup.label} family ({family_label(setup.family)}): delta bytes vs worst logit cosine",
    )
