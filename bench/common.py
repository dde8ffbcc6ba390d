"""Shared helpers for the bench scripts: paths, the fixture family, output-fidelity evaluation, machine
information and the results files that ``bench/run.py`` assembles into ``bench/RESULTS.md``.

Every bench script writes ``bench/results/<name>.md`` (one or more ``##`` sections, ready to paste) and
``bench/results/<name>.json`` (the raw figures); ``run.py`` concatenates the ``.md`` files in order.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS_DIR = BENCH / "results"
FAMILY = ROOT / "fixtures" / "family"
MEMBERS = ["full_ft", "top_ft", "lora", "bf16", "vocab_grown", "unrelated"]
UNRELATED = "unrelated"
RELATED = [m for m in MEMBERS if m != UNRELATED]
MODEL_FILE = "model.safetensors"

# One torch thread unless told otherwise: the fixture models are tiny, and on a small machine shared with
# other jobs, torch's thread pool waiting on busy cores made a forward pass ~100x slower (6.8 s vs 0.07 s).
THREADS_ENV = "WFACTOR_BENCH_THREADS"
torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))

sys.path.insert(0, str(ROOT / "fixtures"))
import tinylm


def raw_bytes(family: Path = FAMILY) -> int:
    """The models side by side: the base plus every member's original checkpoint file."""
    return sum((family / m / MODEL_FILE).stat().st_size for m in ["base", *MEMBERS])


def member_config(name: str, family: Path = FAMILY) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((family / name / "config.json").read_text())
    return cfg


def family_label(family: Path) -> str:
    """How a family directory is named in the results: relative to the repository where it lies inside it."""
    try:
        return str(family.resolve().relative_to(ROOT))
    except ValueError:
        return str(family)


# -- output fidelity ----------------------------------------------------------------------------------
class Evaluator:
    """Worst logit cosine over ``tinylm.eval_texts()`` of a rebuilt state dict vs the original member.

    The same quantity as ``tinylm.output_cosines`` (per text: cosine of the logits over the real, non-pad
    positions, the first min(vocab) columns, float64), computed faster: the originals' logits are computed
    once, and each text is run at its own length instead of padded to 128 (causal attention with right
    padding: the real positions' logits do not depend on the pads). ``self_check`` compares it with
    ``tinylm.output_cosines`` on one pair; the difference is float noise (~1e-10).
    """

    def __init__(self, names: Sequence[str] = (*MEMBERS, "base"), family: Path = FAMILY) -> None:
        self.family = family
        self.texts = tinylm.eval_texts()
        self.ids, self.mask = tinylm.encode(self.texts, max_len=128, return_mask=True)
        self.lengths = [int(n) for n in self.mask.sum(1)]
        self.configs = {n: member_config(n, family) for n in names}
        self.ref: dict[str, list[torch.Tensor]] = {}
        for n in names:
            self.ref[n] = self._logits(tinylm.load_model(family / n))

    @torch.inference_mode()
    def _logits(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return [model(self.ids[i : i + 1, :L])[0].double() for i, L in enumerate(self.lengths)]

    def _cosines(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
        v = min(a[0].shape[-1], b[0].shape[-1])
        out = []
        for x, y in zip(a, b):
            x, y = x[:, :v], y[:, :v]
            if torch.equal(x, y):  # identical logits: exactly 1, not 1 - rounding noise
                out.append(1.0)
                continue
            out.append(float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-300)))
        return out

    def cosines(self, name: str, state_dict: Mapping[str, torch.Tensor]) -> list[float]:
        model = tinylm.model_from_state_dict(self.configs[name], state_dict)
        return self._cosines(self.ref[name], self._logits(model))

    def worst(self, name: str, state_dict: Mapping[str, torch.Tensor]) -> float:
        return min(self.cosines(name, state_dict))

    def worst_between(self, a: str, b: str) -> float:
        """Worst cosine between two original checkpoints (e.g. the base vs a member)."""
        return min(self._cosines(self.ref[a], self.ref[b]))

    def self_check(self, a: str = "base", b: str = "full_ft") -> float:
        """Max |difference| from ``tinylm.output_cosines`` on one pair of originals."""
        ref = tinylm.output_cosines(tinylm.load_model(self.family / a), tinylm.load_model(self.family / b))
        mine = self._cosines(self.ref[a], self.ref[b])
        return max(abs(p - q) for p, q in zip(ref, mine))


# -- machine and provenance ---------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine_info() -> dict[str, Any]:
    import wfactor

    dirty = _git("status", "--porcelain", "--", "wfactor")
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "load_avg": load,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wfactor": wfactor.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "wfactor_tree": "uncommitted changes in wfactor/" if dirty and dirty != "?" else "clean",
    }


def machine_line(info: Mapping[str, Any]) -> str:
    return (
        f"{info['date_utc']}; {info['cpu_count']} CPUs ({info['machine']}, {info['platform']}), "
        f"Python {info['python']}, torch {info['torch']}, wfactor {info['wfactor']} at {info['git_commit']} "
        f"({info['wfactor_tree']}); load average {info['load_avg']}"
    )


# -- subprocesses: wall time and peak anonymous memory ------------------------------------------------
@dataclass
class Measured:
    seconds: float
    peak_rss_anon: int  # bytes; the largest RssAnon seen in /proc/<pid>/status (sampled), 0 if unreadable
    returncode: int
    stdout: str
    stderr: str


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def single_thread_env() -> dict[str, str]:
    """The environment for a measured subprocess: torch's thread pool sized like the bench's own
    (``WFACTOR_BENCH_THREADS``, default 1); on a busy machine a pool of idle-spinning threads made the CLI
    ~10x slower than the same call in-process."""
    n = os.environ.get(THREADS_ENV, "1")
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def run_measured(
    cmd: Sequence[str], interval: float = 0.01, cwd: Path = ROOT, env: Mapping[str, str] | None = None
) -> Measured:
    """Run ``cmd``; its wall time and peak RssAnon, sampled every ``interval`` seconds while it runs.
    ``env`` defaults to ``single_thread_env()``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, stdout=out, stderr=err, env=dict(env) if env is not None else single_thread_env()
        )
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _rss_anon(proc.pid))
            time.sleep(interval)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Measured(
            seconds, peak, proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- formatting and results files ---------------------------------------------------------------------
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one letter per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def fmt_cos(c: float) -> str:
    """Six decimals; a cosine that would print as 1.000000 but is not exactly 1 shows its distance from 1."""
    if c < 0.9999995 or c >= 1.0:
        return f"{c:.6f}"
    return f"1-{1 - c:.0e}"


def write_results(name: str, markdown: str, data: Any) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = RESULTS_DIR / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    return md


def storage_bytes(modules: Sequence[Any]) -> int:
    """Bytes of the distinct tensor storages of ``modules``' parameters and buffers (shared ones counted once)."""
    seen: dict[int, int] = {}
    for mod in modules:
        for t in list(mod.parameters()) + list(mod.buffers()):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
