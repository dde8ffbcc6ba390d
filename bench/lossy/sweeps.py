"""The two sweeps, each point evaluated on every member: the planner over the setup's budgets (per-tensor E,
lossless, family-wide byte targets) and the fixed codecs over the setup's settings (plus the "base alone"
reference and the variant that shares the base's rows for the grown vocabulary)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import MODEL_FILE, RELATED, UNRELATED, Evaluator
from safetensors.torch import load_file

import wfactor
from lossy.fixed_codecs import enc_none, encode_member, exact_store, prepare
from lossy.planner import budget_fields, run_planner
from lossy.points import Point
from lossy.setup import TARGET_ENV, Setup


@dataclass
class PlannerSweep:
    planner: list[Point]  # one per E in setup.e_sweep
    lossless: Point
    target_points: list[Point]  # family-wide byte targets (none where wfactor.Budget has no such field)
    target_note: str


@dataclass
class FixedSweep:
    reference: Point  # "base alone": no delta for the related members
    fixed: list[Point]  # one per setting; vocab_grown's grown tensors stored dense
    fixed_view: list[Point]  # variant: grown-vocabulary tensors use the base's rows, as the planner does
    unrelated_bytes: int  # the unrelated member stored exactly, by every fixed baseline


def planner_sweep(ev: Evaluator, setup: Setup, raw: int) -> PlannerSweep:
    planner: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="wfactor-bench-") as td:
        tmp = Path(td)
        for e in setup.e_sweep:
            p = run_planner(ev, tmp, f"E={e:g}", wfactor.Budget(max_rel_error=e))
            planner.append(p)
            print(
                f"  planner {p.setting:<8} family {p.family_bytes:>9,}  worst {p.worst:.6f}  ({p.extra['factor_s']} s)",
                flush=True,
            )
        lossless = run_planner(ev, tmp, "lossless", wfactor.Budget(lossless=True))
        print(f"  planner lossless family {lossless.family_bytes:>9,}  worst {lossless.worst:.6f}", flush=True)
        target_points, target_note = target_sweep(ev, tmp, setup, planner, raw)
    return PlannerSweep(planner, lossless, target_points, target_note)


def target_sizes(matched: list[Point], between: int) -> list[tuple[int, str]]:
    """The byte targets: each matched per-tensor budget's on-disk bytes, and ``between`` geometric steps
    between consecutive sizes; each with the setting it matches."""
    sizes = sorted({ref.disk for ref in matched if ref.disk is not None})
    wanted: list[tuple[int, str]] = []
    for i, size in enumerate(sizes):
        ref = next(r for r in matched if r.disk == size)
        wanted.append((size, ref.setting))
        if i + 1 < len(sizes) and between > 0:
            for k in range(1, between + 1):
                frac = k / (between + 1)
                wanted.append((round(size ** (1 - frac) * sizes[i + 1] ** frac), f"between {ref.setting} and the next"))
    return wanted


def target_sweep(ev: Evaluator, tmp: Path, setup: Setup, planner: list[Point], raw: int) -> tuple[list[Point], str]:
    """The family-wide byte budget at the sizes of the per-tensor budgets in ``setup.target_at_e`` (only
    where ``wfactor.Budget`` has a ``target_bytes`` or ``target_ratio`` field)."""
    fields = budget_fields()
    target_points: list[Point] = []
    target_note = "`wfactor.Budget` has no `target_bytes`/`target_ratio` field in this tree: no byte-budget sweep."
    tfield = "target_bytes" if "target_bytes" in fields else ("target_ratio" if "target_ratio" in fields else None)
    if tfield is None:
        return target_points, target_note
    matched = [p for p in planner if p.setting in {f"E={e:g}" for e in setup.target_at_e}]
    target_note = (
        f"`wfactor.Budget.{tfield}` set to the on-disk family bytes of the per-tensor budget at "
        + (", ".join(p.setting for p in matched) or "(none)")
        + f" (the environment variable {TARGET_ENV} lists the E values to match)."
    )
    wanted = target_sizes(matched, setup.target_between)
    if setup.target_between > 0:
        target_note += (
            f" Also {setup.target_between} target(s) at geometric steps between consecutive sizes "
            "(WFACTOR_BENCH_TARGETS_BETWEEN), for a denser curve."
        )
    for disk, setting in wanted:
        val: float | int = disk if tfield == "target_bytes" else disk / raw
        label = f"target={disk:,}"
        t0 = time.perf_counter()
        try:
            p = run_planner(ev, tmp, label, wfactor.Budget(**{tfield: val}))
        except wfactor.WfactorError as exc:
            target_note += f" {label}: refused ({exc})."
            print(f"  planner {label}: {exc}", flush=True)
            continue
        p.extra.update(target_disk=disk, matches=setting, seconds=round(time.perf_counter() - t0, 1))
        target_points.append(p)
        print(
            f"  planner {p.setting} family {p.family_bytes:,}  disk {p.disk:,}  worst {p.worst:.6f}  ({p.extra['factor_s']} s)",
            flush=True,
        )
    return target_points, target_note


def fixed_sweep(ev: Evaluator, setup: Setup, backbone: int) -> FixedSweep:
    family = setup.family
    base_sd = load_file(str(family / "base" / MODEL_FILE))
    items = {m: prepare(m, base_sd, family) for m in RELATED}
    unrel_sd = load_file(str(family / UNRELATED / MODEL_FILE))
    unrelated_bytes = sum(exact_store(k, t, base_sd.get(k))[0] for k, t in unrel_sd.items())
    ref_cos: dict[str, float] = {}
    for m in RELATED:
        _nb, sd = encode_member(m, items[m], enc_none, grown="view")
        ref_cos[m] = ev.worst(m, sd)
    reference = Point(
        "base alone", "no deltas", backbone, {**{m: 0 for m in RELATED}, UNRELATED: unrelated_bytes}, ref_cos
    )
    fixed: list[Point] = []
    fixed_view: list[Point] = []  # variant: grown-vocabulary tensors use the base's rows, as the planner does
    for method, setting, enc in setup.fixed():
        mb: dict[str, int] = {UNRELATED: unrelated_bytes}
        cos: dict[str, float] = {}
        for m in RELATED:
            mb[m], sd = encode_member(m, items[m], enc, grown="dense")
            cos[m] = ev.worst(m, sd)
        pt = Point(method, setting, backbone, mb, cos)
        fixed.append(pt)
        vb, vsd = encode_member("vocab_grown", items["vocab_grown"], enc, grown="view")
        fixed_view.append(
            Point(
                method,
                setting,
                backbone,
                {**mb, "vocab_grown": vb},
                {**cos, "vocab_grown": ev.worst("vocab_grown", vsd)},
            )
        )
        print(f"  {pt.label:<24} family {pt.family_bytes:>9,}  worst {pt.worst:.6f}", flush=True)
    return FixedSweep(reference, fixed, fixed_view, unrelated_bytes)
