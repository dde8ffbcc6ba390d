"""CLI start-up: how long `wfactor --help` and `wfactor inspect <family>` take from launch to exit, side by side
in one run with `python -c pass` (the interpreter alone) and `python -c "import torch"` (for reference).

Each command runs in a fresh process (``subprocess.run``, wall clock from launch to exit, output discarded),
``RUNS`` times, round-robin after one untimed warm-up round (so that every command finds its files in the page
cache and the machine's noise falls on all of them alike); the figure is the median. `wfactor inspect` reads a
family factored first from the fixture (`full_ft` and `lora` over `fixtures/family/base`) into
bench/work/startup/ (git-ignored). The goal: `wfactor --help` and `wfactor inspect` start in <= 0.5 s on this
machine. Writes bench/results/startup.{md,json}.

    .venv/bin/python bench/startup.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT, machine_info, machine_line, md_table, write_results

NAME = "startup"
WORK = BENCH / "work" / "startup"
RUNS_ENV = "WFACTOR_BENCH_STARTUP_RUNS"
RUNS = max(15, int(os.environ.get(RUNS_ENV, "21")))  # timed runs per command, at least 15
GOAL_S = 0.5
PASS, HELP, INSPECT, TORCH = "python -c pass", "wfactor --help", "wfactor inspect", 'python -c "import torch"'


def wfactor_exe() -> str:
    """The ``wfactor`` console script of this interpreter's environment (else the one on PATH)."""
    exe = Path(sys.executable).parent / "wfactor"
    found = str(exe) if exe.exists() else shutil.which("wfactor")
    if found is None:
        raise SystemExit("error: no `wfactor` command next to this Python or on PATH (pip install -e .)")
    return found


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def factor_family(exe: str) -> Path:
    """Factor the fixture's full_ft and lora over its base into bench/work/startup/family (anew each run)."""
    out = WORK / "family"
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    fixture = Path("fixtures") / "family"
    cmd = [exe, "factor", f"full_ft={fixture / 'full_ft'}", f"lora={fixture / 'lora'}"]
    cmd += ["--base", str(fixture / "base"), "-o", rel(out), "-q"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {r.returncode}:\n{r.stderr}")
    return out


def time_once(argv: list[str]) -> float:
    """Seconds from launch to exit of one fresh process; its output discarded, a failure an error."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: {argv} exited {r.returncode}:\n{r.stderr.decode(errors='replace')}")
    return seconds


def imports_torch(argv: list[str]) -> bool:
    """Whether the command imports torch at all (one untimed run under ``python -X importtime``)."""
    script = argv[1:] if argv[0] == sys.executable else argv  # the console script is a Python script
    r = subprocess.run(
        [sys.executable, "-X", "importtime", *script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in r.stderr.splitlines())


def main() -> int:
    t_start = time.perf_counter()
    info = machine_info()
    print(f"[{NAME}] {machine_line(info)}", flush=True)
    exe = wfactor_exe()
    family = factor_family(exe)
    commands = {
        PASS: [sys.executable, "-c", "pass"],
        HELP: [exe, "--help"],
        INSPECT: [exe, "inspect", rel(family)],
        TORCH: [sys.executable, "-c", "import torch"],
    }
    for argv in commands.values():  # warm-up round, not timed
        time_once(argv)
    samples: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(RUNS):
        for k, argv in commands.items():
            samples[k].append(time_once(argv))
    med = {k: statistics.median(v) for k, v in samples.items()}
    torch_used = {k: imports_torch(argv) for k, argv in commands.items()}
    met = {k: med[k] <= GOAL_S for k in (HELP, INSPECT)}
    seconds = time.perf_counter() - t_start

    def ms(s: float) -> str:
        return f"{s * 1e3:.0f} ms"

    def shown(k: str) -> str:
        return f"`{k} {rel(family)}`" if k == INSPECT else f"`{k}`"

    rows = [
        [
            shown(k),
            f"**{ms(med[k])}**",
            ms(min(v)),
            ms(max(v)),
            "" if k == PASS else f"+{ms(med[k] - med[PASS])}",
            "yes" if torch_used[k] else "no",
        ]
        for k, v in samples.items()
    ]
    verdict = "met" if all(met.values()) else "MISSED"
    md = "\n".join(
        [
            "## CLI start-up",
            "",
            f"Measured {machine_line(info)}; one run of `bench/startup.py`, {seconds:.0f} s.",
            "",
            "Each command runs in a fresh process (`subprocess.run` from the bench, wall clock from launch to exit, "
            f"output discarded), {RUNS} times (`{RUNS_ENV}`), round-robin after one untimed warm-up round, so every "
            "command finds its files in the page cache and the machine's noise falls on all of them alike. The "
            "figure is the median, with the fastest and slowest runs beside it. `wfactor inspect` reads a family "
            "factored for this bench from the fixture (`full_ft` and `lora` over `fixtures/family/base`, into "
            f"`{rel(family)}`). Imports torch: whether the command imports torch at all (one more run under "
            "`python -X importtime`).",
            "",
            md_table(
                ["command", "median", "fastest", "slowest", "over `python -c pass`", "imports torch"],
                rows,
                "lrrrrl",
            ),
            "",
            f"**Goal: `wfactor --help` and `wfactor inspect` start in <= {GOAL_S} s on this machine: {verdict}** "
            f"(`wfactor --help` {ms(med[HELP])}, {ms(med[HELP] - med[PASS])} more than `python -c pass` at "
            f"{ms(med[PASS])}; `wfactor inspect` {ms(med[INSPECT])}; importing torch alone takes {ms(med[TORCH])}).",
            "",
        ]
    )
    data: dict[str, Any] = {
        "machine": info,
        "runs": RUNS,
        "goal_s": GOAL_S,
        "family": rel(family),
        "commands": {
            k: {
                "argv": [rel(Path(a)) if a.startswith(str(ROOT)) else a for a in commands[k]],
                "median_ms": round(med[k] * 1e3, 1),
                "min_ms": round(min(v) * 1e3, 1),
                "max_ms": round(max(v) * 1e3, 1),
                "samples_ms": [round(s * 1e3, 1) for s in v],
                "imports_torch": torch_used[k],
            }
            for k, v in samples.items()
        },
        "help_minus_pass_ms": round((med[HELP] - med[PASS]) * 1e3, 1),
        "inspect_minus_pass_ms": round((med[INSPECT] - med[PASS]) * 1e3, 1),
        "goal_met": {HELP: met[HELP], INSPECT: met[INSPECT]},
        "seconds": round(seconds, 1),
    }
    path = write_results(NAME, md, data)
    print(md)
    print(f"[{NAME}] wrote {path} in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
