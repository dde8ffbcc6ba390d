"""Peak memory of the factoring pipeline and of materialise (issue 5, item 7): they stream.

A synthetic family is generated (seeded, deterministic) in bench/work/memory/ (git-ignored, removed after
the run unless --keep): a base of fp32 tensors, the largest 4096 x 4096 (64 MiB), and three members: a
merged rank-8 LoRA on half the matrices, a full fine-tune (small noise on every tensor) and a partial
fine-tune (the last quarter of the layers). It is generated at two sizes with the same largest tensor, a
half-size family and a full one of more than 2 GB in total, and `wfactor factor` then `wfactor
materialize` run in a subprocess while /proc/<pid>/status RssAnon is sampled every 20 ms. Streaming means
the peak does not grow with the model: it must stay under 3 x the largest tensor + 256 MiB at both sizes.

    .venv/bin/python bench/memory.py            # both sizes, writes bench/results/memory.{md,json}
    .venv/bin/python bench/memory.py --small    # a quick run with 1024 x 1024 tensors (< 2 GB)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, THREADS_ENV, fmt_bytes, machine_info, machine_line, md_table, run_measured, write_results

from wfactor.format.safetensors_io import Entry, write_streaming
from wfactor.tensors import to_storage

WORK = BENCH / "work" / "memory"
MEMBERS = ["lora", "full_ft", "partial_ft"]
MIB = 1 << 20
SLACK = 256 * MIB
INTERVAL = 0.02


def specs(layers: int, dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """Per layer: a dim x dim matrix (the largest tensor), a dim/4 x dim matrix and a bias."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        out += [
            (f"layers.{i}.attn.weight", (dim, dim)),
            (f"layers.{i}.mlp.weight", (dim // 4, dim)),
            (f"layers.{i}.mlp.bias", (dim,)),
        ]
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tensor(model: str, name: str, shape: tuple[int, ...], layer: int, layers: int) -> torch.Tensor:
    """One tensor of one model, generated on its own (nothing else of the model is in memory)."""
    seed = zlib.crc32(name.encode())
    base = torch.randn(shape, generator=_gen(seed)) * 0.02
    if model == "base":
        return base
    if model == "lora":
        if len(shape) < 2 or layer % 2:
            return base
        a = torch.randn(shape[0], 8, generator=_gen(seed + 1))
        b = torch.randn(8, shape[1], generator=_gen(seed + 2))
        return base + (a @ b) * 1e-3
    if model == "full_ft":
        return base + 1e-3 * torch.randn(shape, generator=_gen(seed + 3))
    if model == "partial_ft":
        if layer < layers * 3 // 4:
            return base
        return base + 2e-3 * torch.randn(shape, generator=_gen(seed + 4))
    raise AssertionError(model)


def generate(root: Path, layers: int, dim: int) -> int:
    """Write base + members under ``root`` (skipped when already there); returns their total bytes."""
    marker = root / f"done-{layers}x{dim}"
    todo = specs(layers, dim)
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        for model in ["base", *MEMBERS]:
            (root / model).mkdir(parents=True)
            entries = [Entry(n, "F32", s) for n, s in todo]
            layer_of = {n: int(n.split(".")[1]) for n, _ in todo}

            def produce(e: Entry, model: str = model, layer_of: dict[str, int] = layer_of) -> bytes:
                return to_storage(tensor(model, e.name, e.shape, layer_of[e.name], layers)).tobytes()

            write_streaming(root / model / "model.safetensors", entries, produce, {"format": "pt"})
        marker.touch()
    return sum((root / m / "model.safetensors").stat().st_size for m in ["base", *MEMBERS])


def measure(label: str, layers: int, dim: int) -> dict[str, object]:
    root = WORK / label
    total = generate(root, layers, dim)
    largest = dim * dim * 4
    bound = 3 * largest + SLACK
    fam = root / "family"
    py = sys.executable
    cmd = [py, "-m", "wfactor", "factor", *[f"{m}={root / m}" for m in MEMBERS]]
    fac = run_measured([*cmd, "--base", str(root / "base"), "-o", str(fam), "--force", "-q"], INTERVAL)
    if fac.returncode != 0:
        raise SystemExit(f"factor failed: {fac.stderr[-2000:]}")
    out = root / "rebuilt"
    shutil.rmtree(out, ignore_errors=True)
    mat = run_measured([py, "-m", "wfactor", "materialize", str(fam), "full_ft", "-o", str(out)], INTERVAL)
    if mat.returncode != 0:
        raise SystemExit(f"materialize failed: {mat.stderr[-2000:]}")
    fam_bytes = sum(p.stat().st_size for p in fam.rglob("*") if p.is_file())
    member_bytes = (out / "model.safetensors").stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    return {
        "label": label,
        "layers": layers,
        "dim": dim,
        "input_bytes": total,
        "family_bytes": fam_bytes,
        "largest_tensor_bytes": largest,
        "bound_bytes": bound,
        "factor_seconds": fac.seconds,
        "factor_peak_rss_anon": fac.peak_rss_anon,
        "factor_mb_per_s": total / MIB / fac.seconds,
        "factor_ok": 0 < fac.peak_rss_anon <= bound,
        "materialize_seconds": mat.seconds,
        "materialize_peak_rss_anon": mat.peak_rss_anon,
        "materialize_mb_per_s": member_bytes / MIB / mat.seconds,
        "materialize_ok": 0 < mat.peak_rss_anon <= bound,
    }


def report(runs: list[dict[str, object]], dim: int) -> str:
    info = machine_info()
    rows = []
    for r in runs:
        for what in ("factor", "materialize"):
            peak = int(r[f"{what}_peak_rss_anon"])  # type: ignore[call-overload]
            rows.append(
                [
                    f"{what} ({r['label']}, {r['layers']} layers)",
                    fmt_bytes(int(r["input_bytes"])),  # type: ignore[call-overload]
                    fmt_bytes(int(r["largest_tensor_bytes"])),  # type: ignore[call-overload]
                    fmt_bytes(peak),
                    fmt_bytes(int(r["bound_bytes"])),  # type: ignore[call-overload]
                    f"{peak / int(r['largest_tensor_bytes']):.1f}",  # type: ignore[call-overload]
                    "pass" if r[f"{what}_ok"] else "FAIL",
                    f"{float(r[f'{what}_seconds']):.0f} s",  # type: ignore[arg-type]
                    f"{float(r[f'{what}_mb_per_s']):.1f}",  # type: ignore[arg-type]
                ]
            )
    table = md_table(
        [
            "run",
            "input (base + 3 members)",
            "largest tensor",
            "peak RssAnon",
            "bound",
            "peak / largest",
            "verdict",
            "time",
            "MB/s",
        ],
        rows,
    )
    ok = all(r["factor_ok"] and r["materialize_ok"] for r in runs)
    peaks = [int(r["factor_peak_rss_anon"]) for r in runs]  # type: ignore[call-overload]
    return "\n".join(
        [
            "## Memory: factor and materialise stream",
            "",
            f"Measured {info['date_utc']} ({machine_line(info)}), `bench/memory.py`.",
            "",
            "A generated fp32 family (seeded; base + merged rank-8 LoRA + full fine-tune + partial fine-tune; "
            f"per layer a {dim} x {dim} matrix, a {dim // 4} x {dim} matrix and a bias) at two sizes with the same "
            "largest tensor. `wfactor factor --base` and `wfactor materialize` run as subprocesses; peak "
            f"anonymous memory is the largest RssAnon of /proc/<pid>/status, sampled every {INTERVAL * 1000:.0f} "
            "ms. Bound: 3 x the largest tensor + 256 MiB (Python, torch and zstd included). MB/s: input bytes "
            "(factor) or the rebuilt member's bytes (materialise) per second of wall time.",
            "",
            table,
            "",
            (
                f"Verdict: **{'pass' if ok else 'FAIL'}**. Doubling the model changed the factoring peak from "
                f"{fmt_bytes(peaks[0])} to {fmt_bytes(peaks[-1])}: "
                + (
                    "memory follows the largest tensor, not the model."
                    if peaks[-1] <= 1.1 * peaks[0]
                    else "the peak grows with the model: something holds more than one tensor at a time."
                )
            ),
            "",
        ]
        + (
            [
                f"This is the quick run (`bench/memory.py --small`, {dim} x {dim} tensors, under 2 GB): the "
                "fixed cost of Python and torch (about 170 MB of RssAnon) dominates it. The run over 2 GB is "
                "`bench/memory.py` without options.",
                "",
            ]
            if dim < 4096
            else []
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1024 x 1024 tensors (a quick run; recorded as such)")
    ap.add_argument("--keep", action="store_true", help="keep bench/work/memory after the run")
    args = ap.parse_args()
    dim = 1024 if args.small else 4096
    # the subprocesses get the bench's torch thread count (common.py: a busy machine makes torch's pool slow)
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get(THREADS_ENV, "1"))
    try:
        runs = [measure("half", 4, dim), measure("full", 8, dim)]
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    md = report(runs, dim)
    print(md)
    write_results("memory", md, {"runs": runs, "machine": machine_info()})
    return 0 if all(r["factor_ok"] and r["materialize_ok"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
