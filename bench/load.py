"""Load times and memory of the loader (issue 4), side by side in one run.

A synthetic family is generated at bench time (never committed) in bench/work/load/: a base of 16 fp32
matrices of 1024 x 1024 (64 MiB) and four members (a merged rank-8 LoRA on half the matrices, a full
fine-tune with 1% noise, a top-quarter fine-tune, a bf16 copy of the full fine-tune), factored at the
default budget. For each member k we time making it ready on the device:
  (a) its full checkpoint with safetensors.torch.load_file(device=...);
  (b) cold: a new Family, backbone + delta;
  (c) with the backbone resident: only the delta;
  (d) factored (``wfactor.torch.attach`` on a module built on the meta device), backbone resident: low-rank
      and k-bit deltas stay factored over the shared backbone tensors, nothing of a weight's size is built.
Memory after N = 1..4 members, each mode against N full checkpoints: bytes of distinct tensor storages on
CPU; torch.cuda.memory_allocated on a GPU. Timings are the median of 9 runs, once with the files in the
page cache (the loader, not the disk) and once read from the disk, the page cache dropped before every run
(root only; WFACTOR_BENCH_DROP_CACHES=0 skips it).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, fmt_bytes, machine_info, machine_line, md_table, write_results

import wfactor
import wfactor.torch as wt
from wfactor.format import stamps
from wfactor.loader import BACKBONES

WORK = BENCH / "work" / "load"
N_MATS, DIM, REPEATS = 16, 1024, 9
MEMBERS = ["lora", "full_ft", "top_ft", "bf16"]


def make_family() -> Path:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(DIM, DIM, generator=g) * 0.02 for i in range(N_MATS)}
    models = {"base": base}
    lora = dict(base)
    for i in range(0, N_MATS, 2):
        k = f"layers.{i}.weight"
        lora[k] = base[k] + (torch.randn(DIM, 8, generator=g) @ torch.randn(8, DIM, generator=g)) * 1e-3
    full = {k: v + 2e-4 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    top = dict(base)
    for i in range(3 * N_MATS // 4, N_MATS):
        k = f"layers.{i}.weight"
        top[k] = base[k] + 5e-4 * torch.randn(DIM, DIM, generator=g)
    models.update(lora=lora, full_ft=full, top_ft=top, bf16={k: v.to(torch.bfloat16) for k, v in full.items()})
    shutil.rmtree(WORK, ignore_errors=True)
    for name, sd in models.items():
        (WORK / name).mkdir(parents=True)
        save_file(sd, str(WORK / name / "model.safetensors"))
    wfactor.factor([f"{m}={WORK / m}" for m in MEMBERS], base=str(WORK / "base"), out=WORK / "family")
    # the same members with k-bit codes stored as bit planes (`factor --fast-load`, a version-3 family)
    wfactor.factor(
        [f"{m}={WORK / m}" for m in MEMBERS], base=str(WORK / "base"), out=WORK / "family_fast", fast_load=True
    )
    return WORK / "family"


class Stack(nn.Module):
    """The synthetic members as a module: layers.i is a bias-free Linear(DIM, DIM)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM, bias=False) for _ in range(N_MATS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(member: str) -> nn.Module:
    with torch.device("meta"):
        m = Stack()
    return m.to(torch.bfloat16) if member == "bf16" else m


def module_tensors(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in list(mod.named_parameters(remove_duplicate=False)) + list(mod.named_buffers())}


def timed(fn, before=None) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of ``fn`` over REPEATS runs; ``before`` (untimed) runs before each."""
    times = []
    for _ in range(REPEATS):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


DROP_ENV = "WFACTOR_BENCH_DROP_CACHES"


def drop_caches() -> bool:
    """Evict every file from the page cache (Linux, root only), so the next reads come from the disk.
    False where that is not permitted or turned off (WFACTOR_BENCH_DROP_CACHES=0)."""
    if os.environ.get(DROP_ENV, "1") == "0":
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def member_times(m: str, fam_dir: Path, device: torch.device, disk: bool) -> dict[str, float]:
    """(a), (b), (c), (d) for member ``m`` (and (b0), (c') with the files in the page cache); ``disk``:
    the page cache is dropped before every run, so each reads its files from the disk."""
    before = drop_caches if disk else None
    full_path = WORK / m / "model.safetensors"
    out: dict[str, float] = {}

    def full() -> None:
        # on CPU load_file maps the file lazily; touching every element makes the tensors really resident
        for t in load_file(str(full_path), device=str(device)).values():
            t.float().sum() if t.dtype == torch.bfloat16 else t.sum()

    out["a"] = timed(full, before)

    def cold() -> None:
        f = wfactor.open_family(fam_dir)
        f.backbone(device)
        f.state_dict(m, device)
        f.close()

    out["b"] = timed(cold, before)
    if not disk:
        os.environ[stamps.VERIFY_ENV] = "always"  # the first load ever: the backbone hashed as it is read
        out["b0"] = timed(cold)
        del os.environ[stamps.VERIFY_ENV]

    holder = wfactor.open_family(fam_dir)  # the serving process: family open, backbone resident
    holder.backbone(device)

    def warm() -> None:
        holder.delta_cache.clear()  # nothing of this member decoded yet: its delta is read and decoded
        holder.state_dict(m, device)

    out["c"] = timed(warm, before)
    if not disk:
        out["c2"] = timed(lambda: holder.state_dict(m, device))  # a second call: the delta from the LRU
        # the floor of (c): new memory for the tensors (c) writes (those not the backbone's own), filled once
        bb = holder.backbone(device)
        rebuilt = [
            (t.numel(), t.dtype)
            for k, t in holder.state_dict(m, device).items()
            if k not in bb or t.data_ptr() != bb[k].data_ptr()
        ]
        out["f"] = timed(lambda: [torch.empty(n, dtype=dt, device=device).fill_(0) for n, dt in rebuilt])
    modules = [build(m) for _ in range(REPEATS)]  # built from the config beforehand, as for (a)'s model
    out["d"] = timed(lambda: wt.attach(modules.pop(), holder, m, device), before)
    fast = wfactor.open_family(fam_dir.parent / "family_fast")  # same backbone digest: the resident one
    modules = [build(m) for _ in range(REPEATS)]
    out["d_fast"] = timed(lambda: wt.attach(modules.pop(), fast, m, device), before)
    fast.close()
    holder.close()
    return out


def storage_bytes(sds: list[dict[str, torch.Tensor]]) -> int:
    seen: dict[int, int] = {}
    for sd in sds:
        for t in sd.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def forward_times(fam_dir: Path, device: torch.device) -> dict[str, float]:
    """Forward time of full_ft as a plain module, factored with packed codes, and factored with int8 codes."""
    out = {}
    with wfactor.open_family(fam_dir) as fam:
        plain = Stack().to(device)
        plain.load_state_dict(fam.state_dict("full_ft", device))
        x = torch.randn(4, DIM, device=device)
        variants = {
            "plain (materialised)": plain,
            "factored, packed codes": wt.attach(build("full_ft"), fam, "full_ft", device),
            "factored, int8 codes": wt.attach(build("full_ft"), fam, "full_ft", device, packed=False),
        }
        with torch.no_grad():
            for k, mod in variants.items():
                mod(x)
                out[k] = timed(lambda mod=mod: mod(x))
    return out


def link_speeds(device: torch.device) -> str:
    """Host-to-device GB/s of a 256 MiB copy from pinned and from pageable memory, measured in this run."""
    n = 256 << 20
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    speeds = {}
    for kind, src in (
        ("pinned", torch.empty(n, dtype=torch.uint8, pin_memory=True)),
        ("pageable", torch.empty(n, dtype=torch.uint8)),
    ):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t = timed(lambda src=src: dst.copy_(src, non_blocking=True))
        speeds[kind] = n / t / 1e9
    return (
        f"Host-to-device in this run: {speeds['pinned']:.1f} GB/s from pinned memory (the copy ceiling), "
        f"{speeds['pageable']:.1f} GB/s from pageable memory."
    )


LABELS = {
    "a": ("(a)", "(a) full checkpoint ms"),
    "b0": ("(b0)", "(b0) first load, hashing ms"),
    "b": ("(b)", "(b) backbone + delta, cold ms"),
    "c": ("(c)", "(c) delta only, backbone resident ms"),
    "c2": ("(c')", "(c') delta cached ms"),
    "f": ("(f)", "(f) new memory for (c)'s tensors alone ms"),
    "d": ("(d)", "(d) factored attach ms"),
    "d_fast": ("(d')", "(d') attach, --fast-load ms"),
}
CACHE_KEYS = ("a", "b0", "b", "c", "c2", "f", "d", "d_fast")  # files in the page cache
DISK_KEYS = ("a", "b", "c", "d", "d_fast")  # read from the disk
RATIO_KEYS = ("b", "c", "d", "d_fast")


def time_head(keys: tuple[str, ...], ratios: tuple[str, ...] = RATIO_KEYS) -> list[str]:
    return ["member"] + [LABELS[k][1] for k in keys] + [f"{LABELS[k][0]}/(a)" for k in ratios]


def fast_delta(member: str) -> int:
    with wfactor.open_family(WORK / "family_fast") as f:
        return f.member(member).delta.size


def main() -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fam_dir = make_family()
    # the files must be older than a stamp's settling time before `verify` may stamp them (stamps.py)
    time.sleep(stamps.SETTLE_NS / 1e9 + 0.2)
    for d in (fam_dir, WORK / "family_fast"):
        with wfactor.open_family(d) as fam_v:
            assert fam_v.verify().ok  # hashes every file and leaves stamps, as `wfactor verify` in CI would
    fam0 = wfactor.open_family(fam_dir)
    bb_bytes = fam0.manifest.backbone.size
    rows, disk_rows = [], []
    can_drop = drop_caches()
    for m in MEMBERS:
        t = member_times(m, fam_dir, device, disk=False)
        delta = fam0.member(m).delta.size
        full_size = (WORK / m / "model.safetensors").stat().st_size
        rows.append(
            [m]
            + [f"{t[k] * 1e3:.1f}" for k in CACHE_KEYS]
            + [f"{t[k] / t['a']:.2f}" for k in (*RATIO_KEYS, "f")]
            + [fmt_bytes(full_size), fmt_bytes(bb_bytes + delta), fmt_bytes(delta), fmt_bytes(fast_delta(m))]
        )
        print("  " + m + " (page cache): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()), flush=True)
        if can_drop:
            t = member_times(m, fam_dir, device, disk=True)
            disk_rows.append(
                [m] + [f"{t[k] * 1e3:.1f}" for k in DISK_KEYS] + [f"{t[k] / t['a']:.2f}" for k in RATIO_KEYS]
            )
            print("  " + m + " (from disk): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()), flush=True)
    assert not BACKBONES.resident(), "a bench Family leaked its backbone reference"

    mem_rows = []
    fam = wfactor.open_family(fam_dir)
    bb = fam.backbone(device)
    sds: list[dict[str, torch.Tensor]] = [bb]
    fulls: list[dict[str, torch.Tensor]] = []
    mods: list[dict[str, torch.Tensor]] = [bb]
    mods_int8: list[dict[str, torch.Tensor]] = [bb]
    probe = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1))
    agree = []
    for n, m in enumerate(MEMBERS, start=1):
        sds.append(fam.state_dict(m, device))
        fulls.append(load_file(str(WORK / m / "model.safetensors"), device=str(device)))
        module = wt.attach(build(m), fam, m, device)
        mods.append(module_tensors(module))
        mods_int8.append(module_tensors(wt.attach(build(m), fam, m, device, packed=False)))
        ref = Stack().to(device)
        ref.load_state_dict({k: v.float() for k, v in sds[-1].items()})
        with torch.no_grad():
            x = probe.to(device)
            got, want = module(x.to(torch.bfloat16) if m == "bf16" else x).float(), ref(x)
        agree.append(f"{m} {float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)):.6f}")
        deltas = sum(fam.member(x).delta.size for x in MEMBERS[:n])
        budget = bb_bytes + deltas
        mem_rows.append(
            [
                n,
                fmt_bytes(storage_bytes(fulls)),
                fmt_bytes(storage_bytes(sds)),
                f"{storage_bytes(sds) / storage_bytes(fulls):.2f}",
                fmt_bytes(storage_bytes(mods)),
                fmt_bytes(budget),
                f"{storage_bytes(mods) / budget:.2f}",
                f"{storage_bytes(mods_int8) / budget:.2f}",
            ]
        )
    fam.close()
    fwd = forward_times(fam_dir, device)
    link = link_speeds(device) if device.type == "cuda" else ""
    info = machine_info()
    md = [
        "## Loading members (issue 4)",
        "",
        f"Measured {machine_line(info)}; one run of `bench/load.py`; device `{device}`. "
        + ("No GPU was available: CPU figures only." if device.type == "cpu" else link),
        "",
        f"Synthetic family: base {N_MATS} x fp32 {DIM}x{DIM} ({fmt_bytes(bb_bytes)}), members {', '.join(MEMBERS)}, "
        f"default budget. Median of {REPEATS} runs, files in the page cache, one torch thread. "
        "(a) `load_file(device=...)` and, on CPU, a touch of every element (on CPU `load_file` maps the file "
        "lazily: an untouched load costs ~1 ms and moves nothing yet). (b0) the first load of a family ever: "
        "a new Family reads the backbone and hashes it as it is read, then rebuilds the member. (b) the same, "
        "cold, for a family verified before (`wfactor verify` left stamps, `wfactor/format/stamps.py`): no "
        "re-hashing. (c) the serving case: the family open and its backbone resident, the member not yet "
        "decoded: its delta is read, checked and decoded (parts on several threads) and the member rebuilt "
        "(`state_dict`). (c') a second `state_dict` of the same member: its parts come from the byte-bounded "
        "LRU. (d) `wfactor.torch.attach` on a module built beforehand on the meta device, backbone resident: "
        "low-rank and k-bit deltas stay factored. (d') the same on the family written with `factor --fast-load`: "
        "k-bit codes stored as bit planes, which attach keeps as they are (no decoding). "
        "(f) is not a load: new memory for the tensors (c) writes "
        "(those not the backbone's own), allocated and filled once: the floor under (c) on this machine. "
        "Goals (issue 4): (c) <= 0.3 x (a), (b) <= 1.2 x (a). First, "
        "the files in the page cache (what a loader costs once the bytes are in memory):",
        "",
        md_table(
            time_head(CACHE_KEYS, (*RATIO_KEYS, "f")) + ["bytes moved (a)", "bytes moved (b)", "bytes moved (c)", "delta, --fast-load"],
            rows,
        ),
        "",
        (
            "Files on the disk: the page cache is dropped (`/proc/sys/vm/drop_caches`) before every run, so "
            "each run reads its files from the disk, as when a server starts or brings back a member nobody "
            "used for a while; this is where moving only delta bytes pays. Same modes; the backbone of (c) "
            "and (d) stays resident in memory."
            if disk_rows
            else f"Files on the disk: not measured (dropping the page cache needs root; `{DROP_ENV}=0` turns it off)."
        ),
        "",
        md_table(time_head(DISK_KEYS), disk_rows) if disk_rows else "",
        "",
        "Memory after loading N members, distinct tensor storages counted once. Materialised: `state_dict`, "
        "identical tensors are the backbone's own. Factored: `wfactor.torch.attach` (low-rank factors, k-bit "
        "codes packed in b bit planes, row scales, over the shared backbone tensors); the last column keeps "
        "the codes as int8 (`attach(..., packed=False)`). Goal (issue 4): factored <= 1.10 x (backbone + the "
        "N delta files).",
        "",
        md_table(
            [
                "N",
                "N full checkpoints",
                "backbone + N rebuilt members",
                "ratio",
                "factored: backbone + N attached",
                "backbone + N delta files",
                "factored / (backbone + deltas)",
                "same, codes as int8",
            ],
            mem_rows,
        ),
        "",
        "Factored modules agree with the materialised members (output cosine on a random probe): "
        + ", ".join(agree)
        + ".",
        "",
        f"What factoring costs per forward (batch of 4 rows through the 16 layers, median of {REPEATS}): "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in fwd.items())
        + ".",
        "",
    ]
    write_results(
        "load", "\n".join(md), {"rows": rows, "disk_rows": disk_rows, "memory": mem_rows, "device": str(device)}
    )
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
