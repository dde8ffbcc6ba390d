"""The comparison tables of a run's first section: each fixed setting vs the planner, the cheapest point
of each method at the quality threshold, the fixed settings that beat the planner on single members, and the
planner's choices at the default budget."""

from __future__ import annotations

import math
from typing import Any

from common import MEMBERS, RELATED, fmt_cos, md_table

import wfactor
from lossy.compare import QUALITY, Compared, cheapest, ratio_str
from lossy.points import Point, fam_key, rel_key
from lossy.setup import Run


def literal(cmp: Compared) -> list[str]:
    """The "Each fixed setting vs the cheapest planner point at equal or better worst cosine" section."""
    out: list[str] = []
    w = out.append
    lit, lit_rel = cmp.lit, cmp.lit_rel
    w("### Each fixed setting vs the cheapest planner point at equal or better worst cosine")
    w("")
    w(
        "The acceptance read literally: for each fixed setting (worst cosine c_f, family bytes b_f), the "
        "cheapest planner point (E sweep, byte-budget runs, lossless) with worst cosine >= c_f. Goal: planner / "
        "fixed <= 0.70. The last column repeats the comparison on the related members' delta bytes only."
    )
    w("")
    rows = []
    for r, rr in zip(lit, lit_rel):
        f, p = r["fixed"], r["planner"]
        rows.append(
            [
                f.label,
                fmt_cos(f.worst),
                f"{f.family_bytes:,}",
                p.label if p else "none",
                fmt_cos(p.worst) if p else "",
                f"{p.family_bytes:,}" if p else "",
                ratio_str(r["ratio"]),
                "yes" if r["ok"] else "**no**",
                ratio_str(rr["ratio"]) + ("" if rr["ok"] else " (no)"),
            ]
        )
    w(
        md_table(
            [
                "fixed setting",
                "c_f",
                "b_f",
                "planner point",
                "its cosine",
                "its bytes",
                "ratio",
                "<= 0.70",
                "ratio, related deltas",
            ],
            rows,
            "lrrlrrrlr",
        )
    )
    w("")
    return out


def at_threshold(run: Run, cmp: Compared, data: dict[str, Any]) -> list[str]:
    """Also adds ``at_threshold`` to ``data``."""
    out: list[str] = []
    w = out.append
    setup, fixed, candidates = run.setup, run.fixed, cmp.candidates
    w(f"### At the {QUALITY} threshold")
    w("")
    w(
        f"The cheapest setting of each method whose worst related-member cosine is >= {QUALITY}, and the cheapest planner point's size relative to it."
    )
    w("")
    best_p = cheapest(candidates, QUALITY, fam_key)
    best_p_rel = cheapest(candidates, QUALITY, rel_key)
    rows = []
    by_method: dict[str, list[Point]] = {}
    for p in fixed:
        by_method.setdefault(p.method, []).append(p)
    thresh: dict[str, Any] = {}
    for meth, pts in [("planner", candidates), *by_method.items()]:
        c = cheapest(pts, QUALITY, fam_key)
        if c is None:
            top = max(pts, key=lambda p: p.worst)
            rows.append([meth, f"none (best: {top.setting}, {fmt_cos(top.worst)})", "", "", "", "", ""])
            thresh[meth] = None
            continue
        ratio = best_p.family_bytes / c.family_bytes if best_p else math.inf
        ratio_rel = best_p_rel.related_bytes / c.related_bytes if best_p_rel and c.related_bytes else math.inf
        thresh[meth] = {
            "setting": c.setting,
            "family_bytes": c.family_bytes,
            "related_bytes": c.related_bytes,
            "worst": c.worst,
            "planner_ratio": ratio,
            "planner_ratio_related": ratio_rel,
        }
        rows.append(
            [
                meth,
                c.setting,
                f"{c.family_bytes:,}",
                f"{c.related_bytes:,}",
                fmt_cos(c.worst),
                ratio_str(ratio),
                ratio_str(ratio_rel),
            ]
        )
    data["at_threshold"] = thresh
    w(
        md_table(
            [
                "method",
                f"cheapest setting >= {QUALITY}",
                "family bytes",
                "related deltas",
                "worst",
                "planner / it (family)",
                "planner / it (related)",
            ],
            rows,
            "llrrrrr",
        )
    )
    w("")
    w(
        f'For scale: storing no delta at all ("base alone") gives worst cosine {fmt_cos(run.reference.worst)} '
        f"({', '.join(f'{m} {fmt_cos(run.reference.cos[m])}' for m in RELATED)}): the {setup.label} family's members sit close to "
        f"their base, so {QUALITY} asks each delta to remove only part of a small divergence."
    )
    w("")
    return out


def member_wins(run: Run) -> list[str]:
    """The "Where a fixed codec beats the planner, member by member" section."""
    out: list[str] = []
    w = out.append
    planner, fixed = run.planner, run.fixed
    w("### Where a fixed codec beats the planner, member by member")
    w("")
    w(
        "For each related member and planner budget E: the cheapest fixed setting whose cosine on that member is "
        ">= the planner's and whose delta for that member is smaller (vocab_grown: either treatment of the "
        "grown tensors). Only rows where such a setting exists."
    )
    w("")
    rows = []
    for p in planner:
        for m in RELATED:
            pool = [(f, f.member_bytes[m], f.cos[m], "") for f in fixed]
            if m == "vocab_grown":
                pool += [(f, f.member_bytes[m], f.cos[m], " (grown rows shared)") for f in run.fixed_view]
            wins = [x for x in pool if x[2] >= p.cos[m] and x[1] < p.member_bytes[m]]
            if not wins:
                continue
            f, b, c, tag = min(wins, key=lambda x: x[1])
            rows.append(
                [
                    p.setting,
                    m,
                    f"{p.member_bytes[m]:,}",
                    fmt_cos(p.cos[m]),
                    f.label + tag,
                    f"{b:,}",
                    fmt_cos(c),
                    f"{p.member_bytes[m] / b:.2f}",
                ]
            )
    if rows:
        w(
            md_table(
                [
                    "planner",
                    "member",
                    "planner bytes",
                    "planner cos",
                    "cheaper fixed setting",
                    "its bytes",
                    "its cos",
                    "planner / fixed",
                ],
                rows,
                "llrrlrrr",
            )
        )
    else:
        w(
            "None: at every budget and for every member, each fixed setting that matches the planner's cosine costs more."
        )
    w("")
    return out


def default_choices(run: Run, cmp: Compared) -> list[str]:
    """The "The planner's choices at the default budget" section: codecs, recipes and header bytes per member."""
    out: list[str] = []
    w = out.append
    raw, default = run.raw, cmp.default
    w(f"### The planner's choices at the default budget (E = {wfactor.DEFAULT_MAX_REL_ERROR:g})")
    w("")
    codecs = default.extra.get("codecs", {})
    rows = []
    for m in MEMBERS:
        c = codecs.get(m, {})
        desc = ", ".join(f"{k} {v[0]} ({v[1]:,} B)" for k, v in sorted(c.items(), key=lambda kv: (-kv[1][1], kv[0])))
        opts = default.extra.get("options", {}).get(m, {})
        recipes = ", ".join(f"{k} x{n}" for k, n in sorted(opts.items(), key=lambda kv: (-kv[1], kv[0])))
        hb = default.extra.get("header_bytes", {}).get(m)
        rows.append([m, f"{default.member_bytes[m]:,}", f"{hb:,}" if hb is not None else "", desc, recipes])
    w(
        md_table(
            [
                "member",
                "delta payload",
                "file header",
                "codec: tensors (bytes)",
                "recipes (q = quant bits, r = rank)",
            ],
            rows,
            "lrrll",
        )
    )
    w("")
    assert default.disk is not None
    hdr = default.disk - default.family_bytes
    w(
        f"On disk the default-budget family is {default.disk:,} bytes ({default.disk / raw:.3f} of raw); the delta "
        f"files' JSON headers (records) add {hdr:,} bytes to the payload counted above, "
        f"{hdr / default.related_bytes:.0%} of the related members' delta payload."
    )
    w("")
    return out
