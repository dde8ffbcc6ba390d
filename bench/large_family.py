"""The larger bench family: the fixture family's code (``fixtures/make_family.py``) with bigger dimensions
and fewer training steps, generated at bench time into ``bench/work/`` (git-ignored) and cached there,
keyed by its parameters.

    .venv/bin/python bench/large_family.py        # build (or reuse) it and print its directory

Seven members as in the fixture (base, full_ft, top_ft, lora, bf16, vocab_grown, unrelated); with the
default parameters each fp32 member is ~42 MB and the family ~275 MB side by side. Not a bench script of
its own: ``bench/run.py`` skips it; ``lossless.py`` and ``lossy_large.py`` call ``ensure()``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, ROOT

sys.path.insert(0, str(ROOT / "fixtures"))
import make_family
import tinylm

# Bump when the generating code changes in a way that changes the output (invalidates the cache).
GEN_VERSION = 1
# Training windows: 2 x 128 tokens per step (the fixture: 8 x 128), so that a step costs ~1/4 of the fixture's
# recipe at these dimensions and the family builds in minutes on 2 CPU cores.
PARAMS = {"d_model": 384, "n_layers": 6, "n_heads": 6, "d_ff": 1536, "steps_scale": 0.12, "seq": 128, "batch": 2}
WORK = BENCH / "work"


def key(params: dict[str, float] = PARAMS) -> str:
    p = params
    return f"large-v{GEN_VERSION}-d{p['d_model']}-l{p['n_layers']}-h{p['n_heads']}-ff{p['d_ff']}-s{p['steps_scale']:g}-w{p['seq']}x{p['batch']}"


def ensure(params: dict[str, float] = PARAMS, log: bool = True) -> Path:
    """The family's directory, generated first if not cached (atomically: a temporary name, then rename)."""
    out = WORK / key(params)
    done = out / "generated.json"
    if done.exists():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = WORK / (key(params) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = tinylm.TinyLMConfig(
        d_model=int(params["d_model"]),
        n_layers=int(params["n_layers"]),
        n_heads=int(params["n_heads"]),
        d_ff=int(params["d_ff"]),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    buf = io.StringIO()
    if log:
        print(f"[large_family] generating {out.name} (cached afterwards) ...", flush=True)
    with contextlib.redirect_stdout(sys.stdout if log else buf):
        make_family.build_family(
            tmp, cfg, float(params["steps_scale"]), seq=int(params["seq"]), batch=int(params["batch"])
        )
    seconds = time.perf_counter() - t0
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)
    (tmp / "generated.json").write_text(
        json.dumps({"params": params, "gen_version": GEN_VERSION, "seconds": round(seconds, 1)}, indent=1) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if log:
        print(f"[large_family] generated in {seconds:.0f} s: {out}", flush=True)
    return out


def generation_seconds(family: Path) -> float | None:
    try:
        return float(json.loads((family / "generated.json").read_text())["seconds"])
    except (OSError, KeyError, ValueError):
        return None


if __name__ == "__main__":
    print(ensure())
