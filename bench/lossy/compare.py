"""The comparisons: for a fixed setting, the cheapest planner point at equal or better worst cosine (the
issue 3 acceptance read literally), and issue 7's lossy goal (at most half the bytes of the best fixed-codec
peer at worst cosine >= 0.999)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import UNRELATED, fmt_cos

import wfactor
from lossy.points import Point, fam_key, rel_key
from lossy.setup import Run

QUALITY = 0.999  # acceptance 1 threshold
SMALLER = 0.30  # acceptance 2: at least 30% smaller, i.e. planner bytes <= 0.7 x fixed bytes
# Issue 7's lossy goal: at equal worst-case cosine >= 0.999, at most half the bytes of the best fixed-codec peer.
ISSUE7_QUALITY = 0.999
ISSUE7_RATIO = 0.5


def cheapest(points: list[Point], min_cos: float, key: Callable[[Point], int]) -> Point | None:
    ok = [p for p in points if p.worst >= min_cos]
    return min(ok, key=key) if ok else None


def literal_rows(planner: list[Point], fixed: list[Point], key: Callable[[Point], int]) -> list[dict[str, Any]]:
    rows = []
    for f in fixed:
        p = cheapest(planner, f.worst, key)
        ratio = key(p) / key(f) if p is not None else math.inf
        rows.append({"fixed": f, "planner": p, "ratio": ratio, "ok": ratio <= 1 - SMALLER})
    return rows


def ratio_str(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def pareto(points: list[Point], key: Callable[[Point], int]) -> list[Point]:
    """Points no other point beats on both bytes (<=) and worst cosine (>=, one of them strictly)."""
    return [
        f
        for f in points
        if not any(key(g) <= key(f) and g.worst >= f.worst and (key(g) < key(f) or g.worst > f.worst) for g in points)
    ]


def issue7_lossy(candidates: list[Point], fixed: list[Point]) -> tuple[list[str], dict[str, Any]]:
    """Issue 7's lossy goal, two readings, on related-delta bytes and on family bytes:
    (a) at the 0.999 level: the cheapest planner point with worst cosine >= 0.999 vs the cheapest fixed setting
        with worst cosine >= 0.999; (b) along the fixed codecs' best curve (their Pareto front at >= 0.999):
        for each point, the cheapest planner point at equal or better cosine. Goal: ratio <= 0.5."""
    ok_fixed = [f for f in fixed if f.worst >= ISSUE7_QUALITY]
    out: dict[str, Any] = {"fixed_settings_at_0999": len(ok_fixed)}
    if not ok_fixed:
        return ["- **Issue 7, lossy: not measurable**: no fixed setting reaches worst cosine 0.999."], out
    lines = []
    for key, what in ((rel_key, "related-delta bytes"), (fam_key, "family bytes")):
        best_f = min(ok_fixed, key=key)
        best_p = cheapest(candidates, ISSUE7_QUALITY, key)
        ratio_a = key(best_p) / key(best_f) if best_p is not None and key(best_f) else math.inf
        front = sorted(pareto(ok_fixed, key), key=key)
        rows = literal_rows(candidates, front, key)
        worst = max(rows, key=lambda r: r["ratio"])
        met_a, met_b = ratio_a <= ISSUE7_RATIO, worst["ratio"] <= ISSUE7_RATIO
        front_desc = ", ".join(r["fixed"].label + " " + ratio_str(r["ratio"]) for r in rows)
        out[what] = {
            "at_0999": {
                "met": met_a,
                "ratio": ratio_a,
                "fixed": best_f.label,
                "planner": best_p.label if best_p else None,
            },
            "along_front": {
                "met": met_b,
                "ratio": worst["ratio"],
                "hardest": worst["fixed"].label,
                "front": [f.label for f in front],
            },
        }
        lines.append(
            f"- **Issue 7, lossy, {what}: at most half the bytes of the best fixed-codec peer at equal worst "
            f"cosine >= {ISSUE7_QUALITY}. At the {ISSUE7_QUALITY} level: {'met' if met_a else 'MISSED'}** "
            f"({best_p.label if best_p else 'no planner point'}, {key(best_p) if best_p else 0:,} bytes, worst "
            f"{fmt_cos(best_p.worst) if best_p else ''}, vs {best_f.label}, {key(best_f):,} bytes, worst "
            f"{fmt_cos(best_f.worst)}: {ratio_str(ratio_a)}). **Along the fixed codecs' best curve above "
            f"{ISSUE7_QUALITY}: {'met' if met_b else 'MISSED'}** ({sum(r['ratio'] <= ISSUE7_RATIO for r in rows)} "
            f"of its {len(rows)} points beaten 2:1: {front_desc}; "
            f"hardest {worst['fixed'].label}, worst {fmt_cos(worst['fixed'].worst)})."
        )
    return lines, out


@dataclass
class Compared:
    """A run's comparisons, on which the verdict and the report rest."""

    default: Point  # the planner at wfactor's default budget
    candidates: list[Point]  # every planner point: the E sweep, the byte targets, lossless
    lit: list[dict[str, Any]]  # each fixed setting vs the cheapest planner point at >= its cosine (family bytes)
    lit_rel: list[dict[str, Any]]  # the same on the related members' delta bytes
    lit_view: list[dict[str, Any]]  # family bytes, fixed codecs sharing the base's rows for the grown vocabulary
    worst_lit: dict[str, Any]
    worst_rel: dict[str, Any]
    worst_view: dict[str, Any]
    goal1: bool  # acceptance 1: the default budget keeps worst cosine >= QUALITY
    goal2: bool  # acceptance 2: every fixed setting beaten by >= SMALLER on family bytes
    floor: int  # bytes no codec choice can remove: the backbone and the unrelated member (stored whole by everyone)
    unreachable: list[Point]  # fixed settings whose family bytes x (1 - SMALLER) are below the floor


def compare_run(run: Run) -> Compared:
    planner, lossless, fixed = run.planner, run.lossless, run.fixed
    default = next(p for p in planner if p.setting == f"E={wfactor.DEFAULT_MAX_REL_ERROR:g}")
    candidates = planner + run.target_points + [lossless]
    lit = literal_rows(candidates, fixed, fam_key)
    lit_rel = literal_rows(candidates, fixed, rel_key)
    lit_view = literal_rows(candidates, run.fixed_view, fam_key)
    worst_lit = max(lit, key=lambda r: r["ratio"])
    worst_rel = max(lit_rel, key=lambda r: r["ratio"])
    worst_view = max(lit_view, key=lambda r: r["ratio"])
    goal1 = default.worst >= QUALITY
    goal2 = all(r["ok"] for r in lit)
    floor = min(p.backbone + p.member_bytes[UNRELATED] for p in candidates)
    unreachable = [f for f in fixed if (1 - SMALLER) * f.family_bytes < floor]
    return Compared(
        default, candidates, lit, lit_rel, lit_view, worst_lit, worst_rel, worst_view, goal1, goal2, floor, unreachable
    )


def verdict_figures(c: Compared) -> dict[str, Any]:
    """The verdict as the JSON records it (``issue7_lossy`` is added by the report)."""
    default, lit, lit_rel, lit_view = c.default, c.lit, c.lit_rel, c.lit_view
    goal1, goal2, worst_lit, worst_rel, worst_view = c.goal1, c.goal2, c.worst_lit, c.worst_rel, c.worst_view
    floor, unreachable = c.floor, c.unreachable
    return {
        "quality_met": goal1,
        "default_worst": default.worst,
        "smaller_met": goal2,
        "smaller_beaten": sum(r["ok"] for r in lit),
        "fixed_settings": len(lit),
        "worst_literal_ratio": worst_lit["ratio"],
        "worst_literal_setting": worst_lit["fixed"].label,
        "related_only_met": all(r["ok"] for r in lit_rel),
        "related_only_beaten": sum(r["ok"] for r in lit_rel),
        "worst_related_ratio": worst_rel["ratio"],
        "worst_related_setting": worst_rel["fixed"].label,
        "grown_view_met": all(r["ok"] for r in lit_view),
        "worst_grown_view_ratio": worst_view["ratio"],
        "floor_bytes": floor,
        "fixed_below_floor": len(unreachable),
    }
