"""The markdown of a run, section by section in the order written (the sections' text lives here, in
``report_compare`` and in ``report_default``); also adds the verdict figures to the JSON data."""

from __future__ import annotations

from typing import Any

from common import RELATED, family_label, fmt_cos, machine_line, md_table

import wfactor
from lossy import report_compare, report_default
from lossy.compare import QUALITY, Compared, compare_run, issue7_lossy, ratio_str, verdict_figures
from lossy.points import Point
from lossy.setup import Run

POINT_HEAD = ["method", "setting", "family bytes", "ratio to raw", "related deltas", *RELATED, "worst"]


def point_row(p: Point, raw: int) -> list[str]:
    return [
        p.method,
        p.setting,
        f"{p.family_bytes:,}",
        f"{p.family_bytes / raw:.3f}",
        f"{p.related_bytes:,}",
        *[fmt_cos(p.cos[m]) for m in RELATED],
        f"**{fmt_cos(p.worst)}**",
    ]


def render(run: Run, data: dict[str, Any]) -> str:
    """The run's ``##`` sections; ``data`` (the JSON) gains ``verdict`` and ``at_threshold``."""
    cmp = compare_run(run)
    data["verdict"] = verdict_figures(cmp)
    out: list[str] = []
    out += header_and_verdict(run, cmp, data)
    out += all_points(run)
    out += byte_budget(run)
    out += report_compare.literal(cmp)
    out += report_compare.at_threshold(run, cmp, data)
    out += report_compare.member_wins(run)
    out += report_compare.default_choices(run, cmp)
    out += report_default.default_budget(run, cmp)
    return "\n".join(out)


def header_and_verdict(run: Run, cmp: Compared, data: dict[str, Any]) -> list[str]:
    """The section's heading, how it was measured, and the verdict (adds ``issue7_lossy`` to ``data["verdict"]``)."""
    out: list[str] = []
    w = out.append
    setup, raw, fixed = run.setup, run.raw, run.fixed
    default, candidates, lit, lit_rel = cmp.default, cmp.candidates, cmp.lit, cmp.lit_rel
    worst_lit, worst_rel, worst_view = cmp.worst_lit, cmp.worst_rel, cmp.worst_view
    goal1, goal2, floor, unreachable = cmp.goal1, cmp.goal2, cmp.floor, cmp.unreachable
    w(f"## {setup.title}")
    w("")
    w(f"Measured {machine_line(run.info)}; one run of `{setup.script}`, {run.seconds:.0f} s.")
    w("")
    w(
        f"Family: `{family_label(setup.family)}` (base + full_ft, top_ft, lora, bf16, vocab_grown, unrelated; "
        f"{raw:,} bytes side by side). **Quality**: worst logit cosine over the 32 `tinylm.eval_texts()` of "
        "each rebuilt related member vs its original; the family's quality is the minimum over the five "
        "related members. **Family bytes**: the backbone file plus every member's delta payload (the stored, "
        "compressed part bytes: a delta file's data section; the planner's delta files on disk also carry a "
        "JSON header, reported separately below, which a fixed-codec family written by wfactor would carry "
        "too). **Related deltas**: the five related members' payloads. The evaluation's fast path (reference "
        f"logits cached, no padding) matches `tinylm.output_cosines` to {run.check:.0e}. Cosines that round to "
        "1.000000 without being exactly 1 are shown as 1-x."
    )
    w("")
    w("### Verdict")
    w("")
    w(
        f"- **Quality at the default budget (E = {wfactor.DEFAULT_MAX_REL_ERROR:g}): "
        f"{'met' if goal1 else 'MISSED'}.** Worst related-member cosine {fmt_cos(default.worst)} "
        f"({', '.join(f'{m} {fmt_cos(default.cos[m])}' for m in RELATED)}); goal >= {QUALITY}."
    )
    w(
        f"- **At least 30% smaller than any single fixed codec at equal or better worst cosine, family bytes as the "
        f"acceptance states it: {'met' if goal2 else 'MISSED'}.** {sum(r['ok'] for r in lit)} of {len(lit)} fixed "
        f"settings are beaten by >= 30%. The hardest is {worst_lit['fixed'].label} ({worst_lit['fixed'].family_bytes:,} "
        f"bytes, worst cosine {fmt_cos(worst_lit['fixed'].worst)}); the cheapest planner point at equal or better "
        f"cosine, {worst_lit['planner'].label if worst_lit['planner'] else 'none'}, is {ratio_str(worst_lit['ratio'])} "
        f"of its size. On this family the goal is out of reach on family bytes whatever the planner does: the "
        f"backbone and the unrelated member, which every method stores whole, already take {floor:,} bytes, more "
        f"than 70% of the family bytes of {len(unreachable)} of the {len(fixed)} fixed settings."
    )
    w(
        f"- **The same comparison on the five related members' delta bytes only** (the part a codec choice can "
        f"change): {'met' if data['verdict']['related_only_met'] else 'MISSED'}; {data['verdict']['related_only_beaten']} "
        f"of {len(lit_rel)} fixed settings beaten by >= 30%. Hardest: {worst_rel['fixed'].label}, against which the "
        f"planner's best point ({worst_rel['planner'].label if worst_rel['planner'] else 'none'}) is "
        f"{ratio_str(worst_rel['ratio'])} of its related-delta bytes."
    )
    w(
        f"- Variant: if the fixed codecs also shared the base's rows for the grown vocabulary (as the planner does) "
        f"instead of storing vocab_grown's embed_tokens/lm_head dense: "
        f"{'met' if data['verdict']['grown_view_met'] else 'missed'} on family bytes; hardest "
        f"{worst_view['fixed'].label}, ratio {ratio_str(worst_view['ratio'])}."
    )
    i7_lines, data["verdict"]["issue7_lossy"] = issue7_lossy(candidates, fixed)
    for line in i7_lines:
        w(line)
    w("")
    return out


def all_points(run: Run) -> list[str]:
    """The "All points" section: every planner point, the base alone and every fixed setting, with the figure."""
    out: list[str] = []
    w = out.append
    raw, planner, lossless, fixed = run.raw, run.planner, run.lossless, run.fixed
    w("### All points")
    w("")
    w(
        "Planner: `wfactor.factor(..., budget=Budget(max_rel_error=E))`, each tensor's error <= E x its drift "
        "||W - B||; rebuilt with `open_family(...).state_dict(member)`. Fixed codecs: applied to the delta "
        "W - cast(base) (float32) of every tensor that differs from the base, encoded with `wfactor.codecs.*` "
        "and `wfactor.plan.assemble`, rebuilt with `wfactor.plan.rebuild_planned`; identical tensors are free; "
        "vocab_grown's embed_tokens/lm_head (shape differs from the base) are stored dense; 1-D tensors (biases, "
        "norms) use the same codec, except for low rank, which does not apply to them: they are stored 8-bit "
        "quantised in the low-rank rows. Every fixed baseline stores the unrelated member exactly "
        f"({run.unrelated_bytes:,} bytes: per tensor the cheaper of dense and base + XOR residual). "
        "BitDelta-style: packed sign bits + one float32 scale (mean |delta|) per tensor, no distillation; "
        "bytes counted as numel/8 + 4 per tensor, rebuilt by the bench. DARE-style: a seeded random share of "
        'the entries kept and rescaled by 1/keep, stored with the sparse codec. "base alone" stores no delta '
        "for the related members (a reference, not a codec)."
    )
    w("")
    rows = [point_row(p, raw) for p in planner]
    rows.append(point_row(lossless, raw))
    rows += [point_row(p, raw) for p in run.target_points]
    rows.append(point_row(run.reference, raw))
    rows += [point_row(p, raw) for p in fixed]
    w(md_table(POINT_HEAD, rows, "ll" + "r" * (len(POINT_HEAD) - 2)))
    w("")
    if run.plot:
        w(f"![related-delta bytes vs worst cosine]({run.plot})")
        w("")
    return out


def byte_budget(run: Run) -> list[str]:
    """The "Family-wide byte budget" section: the byte-target runs against the per-tensor budgets at their sizes."""
    out: list[str] = []
    w = out.append
    planner = run.planner
    w("### Family-wide byte budget")
    w("")
    w(run.target_note)
    w("")
    if run.target_points:
        rows = []
        for p in run.target_points:
            ref = next((q for q in planner if q.setting == p.extra["matches"]), None)
            rows.append(
                [
                    f"{p.extra['target_disk']:,}",
                    f"{p.disk:,}",
                    f"{p.family_bytes:,}",
                    fmt_cos(p.worst),
                    ref.setting if ref is not None else p.extra["matches"],
                    f"{ref.family_bytes:,}" if ref is not None else "",
                    fmt_cos(ref.worst) if ref is not None else "",
                    f"{p.extra['seconds']:.0f} s",
                ]
            )
        w(
            md_table(
                [
                    "target bytes",
                    "on disk",
                    "family bytes",
                    "worst",
                    "per-tensor budget at that size",
                    "its family bytes",
                    "its worst",
                    "time",
                ],
                rows,
                "rrrrlrrr",
            )
        )
        w("")
    return out
