"""Issue 3's acceptance, measured side by side in one run on the fixture family:

1. at the default budget every related member keeps outputs at worst logit cosine >= 0.999;
2. the planned family is at least 30% smaller than the same family factored with any single fixed codec
   at equal or better worst-case cosine.

The planner is run through ``wfactor.factor`` over a sweep of budgets and rebuilt through
``wfactor.open_family``. Each fixed codec is applied to every member tensor that differs from the base,
encoded with wfactor's own codec modules and ``wfactor.plan.assemble`` and rebuilt with
``wfactor.plan.rebuild_planned`` (the reader's code path), so bytes are counted the same way: the stored,
compressed part bytes. Writes bench/results/planner_vs_fixed.{md,json} and bench/planner_vs_fixed.png.

    .venv/bin/python bench/planner_vs_fixed.py

This file is the run, in order; the machinery is in ``bench/lossy/`` (see its ``__init__``) and takes any
family of the fixture's shape through ``Setup`` (``bench/lossy_large.py`` runs it on the larger bench family
with fewer settings).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEMBERS, Evaluator, machine_info, machine_line, raw_bytes, write_results
from lossy.plot import plot
from lossy.report import render
from lossy.setup import Run, Setup
from lossy.sweeps import fixed_sweep, planner_sweep


def main(setup: Setup | None = None) -> int:
    setup = setup or Setup()
    family = setup.family
    t_start = time.perf_counter()
    torch.manual_seed(0)
    info = machine_info()
    print(f"[{setup.name}] {machine_line(info)}", flush=True)

    # the evaluation: reference logits of every original, checked against tinylm.output_cosines
    ev = Evaluator(family=family)
    check = ev.self_check()
    assert check < 1e-8, f"fast cosine differs from tinylm.output_cosines by {check}"
    raw = raw_bytes(family)
    base_cos = {m: ev.worst_between("base", m) for m in MEMBERS}

    # the planner: per-tensor budgets E, lossless, family-wide byte targets
    ps = planner_sweep(ev, setup, raw)
    t_planner = time.perf_counter() - t_start

    # the fixed codecs, on the same backbone (and "base alone" for reference)
    fs = fixed_sweep(ev, setup, ps.planner[0].backbone)

    run = Run(
        setup,
        info,
        raw,
        base_cos,
        check,
        ps.planner,
        ps.lossless,
        ps.target_points,
        ps.target_note,
        fs.reference,
        fs.fixed,
        fs.fixed_view,
        fs.unrelated_bytes,
    )
    run.plot = plot(setup, ps.planner + ps.target_points, fs.fixed)
    run.seconds = time.perf_counter() - t_start

    # the results: bench/results/<name>.json (raw figures; render adds the verdict) and .md (the sections)
    data: dict[str, Any] = {
        "machine": info,
        "raw_bytes": raw,
        "base_vs_member_cos": base_cos,
        "cosine_self_check_max_abs_diff": check,
        "seconds": {"planner": round(t_planner, 1), "total": round(run.seconds, 1)},
        "planner": [p.to_json() for p in ps.planner],
        "planner_lossless": ps.lossless.to_json(),
        "planner_target": [p.to_json() for p in ps.target_points],
        "reference_base_alone": fs.reference.to_json(),
        "fixed": [p.to_json() for p in fs.fixed],
        "fixed_grown_view": [p.to_json() for p in fs.fixed_view],
        "unrelated_exact_bytes": fs.unrelated_bytes,
    }
    md = render(run, data)
    path = write_results(setup.name, md, data)
    print(md)
    print(f"[{setup.name}] wrote {path} in {run.seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
