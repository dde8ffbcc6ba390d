"""`make bench`: run every bench script in order, then assemble bench/RESULTS.md from their sections.

    .venv/bin/python bench/run.py                 # all scripts
    .venv/bin/python bench/run.py planner_vs_fixed  # only these (RESULTS.md keeps the others' last results)
    .venv/bin/python bench/run.py --assemble        # run nothing: rebuild RESULTS.md from bench/results/

A bench script is any ``bench/*.py`` other than this file and the helpers in ``NOT_SCRIPTS``; ``ORDER`` fixes the order of
the known ones, and new scripts run after them in name order. Each script runs in its own process and
writes ``bench/results/<name>.md`` (its sections) and ``.json`` (its raw figures); this file concatenates
the ``.md`` files, in order, under a header with the machine's details. A script that fails is reported in
RESULTS.md and makes this command exit 1.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, RESULTS_DIR, machine_info, machine_line

ORDER = ["lossless", "planner_vs_fixed", "lossy_large", "load", "pipelines", "towers", "quantized", "scale", "memory", "startup"]
NOT_SCRIPTS = {"run", "common", "plots", "large_family"}  # helpers, not scripts


def scripts() -> list[str]:
    found = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_SCRIPTS and not p.stem.startswith("_"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def main(argv: list[str]) -> int:
    all_names = scripts()
    chosen = [] if argv == ["--assemble"] else (argv or all_names)
    unknown = [n for n in chosen if n not in all_names]
    if unknown:
        print(f"error: unknown bench script(s) {unknown}; known: {all_names}", file=sys.stderr)
        return 2
    failed: dict[str, str] = {}
    timings: dict[str, float] = {}
    for name in chosen:
        print(f"== bench/{name}.py", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(BENCH / f"{name}.py")], cwd=BENCH.parent, check=False).returncode
        timings[name] = time.perf_counter() - t0
        if rc != 0:
            failed[name] = f"exit status {rc}"
    info = machine_info()
    parts = [
        "# Benchmark results",
        "",
        (
            "Written by `make bench` (`bench/run.py`) from the sections in `bench/results/`; do not edit by "
            "hand, rerun it. Each section says when and where it was measured."
        ),
        "",
        (
            f"Last run: {machine_line(info)}; {info['torch_threads']} torch thread(s) "
            "(`WFACTOR_BENCH_THREADS`, default 1)."
        ),
        "",
    ]
    if timings:
        parts += ["Scripts run: " + ", ".join(f"`{n}` ({timings[n]:.0f} s)" for n in chosen), ""]
    for name in all_names:
        md = RESULTS_DIR / f"{name}.md"
        if name in failed:
            parts += [f"## {name}", "", f"**FAILED** in the last run ({failed[name]}); see its output.", ""]
        elif md.exists():
            parts += [md.read_text().rstrip(), ""]
        else:
            parts += [f"## {name}", "", "Not run yet.", ""]
    (BENCH / "RESULTS.md").write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {BENCH / 'RESULTS.md'}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
