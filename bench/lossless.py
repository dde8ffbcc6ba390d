"""Issue 7, items 2 and 4: lossless storage against the peers, and wfactor's speed and memory, side by side
in one run on two families (the committed fixture family and the larger one from ``large_family.py``).

Methods, each over the same seven checkpoint files (base + six members), bytes as a ratio to those files:

- **zstd -3 per file**: every model.safetensors compressed whole (``zstandard``, level 3, one thread).
- **ZipNN per tensor**: ``zipnn.ZipNN(input_format="torch", threads=1)``, ``compress()`` on a copy of each
  tensor (ZipNN 0.5.4's compress scrambles the tensor it is given), plus each file's safetensors header
  (names, shapes) that a per-tensor store needs too. Every blob is decompressed and compared bit for bit.
- **tensor dedup**: tensors identical (sha256 of dtype, shape and bytes) across the family stored once,
  zstd -3 per tensor, plus the headers.
- **dedup + XOR byte planes + zstd** (ZipLLM/BitX style): dedup as above; every other member tensor with
  a base tensor of the same name, shape and dtype is XORed with it; the result (or the tensor itself, for
  the base and tensors without such a partner) is split into byte planes, each zstd -3; plus the headers.
- **wfactor factor --lossless**: the CLI, the whole family directory on disk.

Speed: MB/s of raw input for each, one thread, files in the page cache; wfactor's CLI time is reported
with and without its start-up (``wfactor --version``). Memory: peak RssAnon of the CLI process (sampled).

    .venv/bin/python bench/lossless.py            # both families
    WFACTOR_BENCH_FAMILIES=fixture .venv/bin/python bench/lossless.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import large_family
import plots
from common import (
    FAMILY,
    MEMBERS,
    MODEL_FILE,
    ROOT,
    dir_bytes,
    family_label,
    machine_info,
    machine_line,
    md_table,
    raw_bytes,
    run_measured,
    write_results,
)

NAME = "lossless"
WFACTOR = str(Path(sys.executable).with_name("wfactor"))
ALL = ["base", *MEMBERS]
GOAL_BYTES = 0.90  # wfactor <= 0.9 x the best lossless peer
GOAL_TIME = 1.5  # factor --lossless <= 1.5 x zstd -3 over the same bytes
# The default-budget factor on the large family is off unless asked (a few minutes more; `lossy_large.py`
# times the planner on that family per budget). The lossless factor is measured.
LARGE_DEFAULT = os.environ.get("WFACTOR_BENCH_LARGE_DEFAULT", "0") == "1"

NP_DTYPES = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "F64": np.uint64, "I64": np.uint64}
TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


# -- reading safetensors files tensor by tensor ---------------------------------------------------------
def header(path: Path) -> tuple[int, dict[str, Any]]:
    """(bytes before the data section, the header's tensor entries)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return 8 + n, h


def tensors(path: Path) -> Iterator[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, shape, raw bytes) of each tensor, in file order, read one at a time."""
    start, h = header(path)
    with open(path, "rb") as f:
        for name, e in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = e["data_offsets"]
            f.seek(start + a)
            yield name, e["dtype"], tuple(e["shape"]), f.read(b - a)


def read_tensor(path: Path, name: str) -> tuple[str, tuple[int, ...], bytes] | None:
    start, h = header(path)
    e = h.get(name)
    if e is None:
        return None
    a, b = e["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + a)
        return e["dtype"], tuple(e["shape"]), f.read(b - a)


def digest(dtype: str, shape: tuple[int, ...], data: bytes) -> bytes:
    return hashlib.sha256(f"{dtype}{shape}".encode() + data).digest()


def planes(data: bytes, itemsize: int) -> list[bytes]:
    if itemsize == 1 or len(data) % itemsize:
        return [data]
    a = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize)
    return [a[:, j].tobytes() for j in range(itemsize)]


def xor(a: bytes, b: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)).tobytes()


# -- the methods -------------------------------------------------------------------------------------------
def m_zstd(family: Path) -> dict[str, Any]:
    cz, dz = zstandard.ZstdCompressor(level=3, threads=0), zstandard.ZstdDecompressor()
    total, seconds = 0, 0.0
    for m in ALL:
        t0 = time.perf_counter()
        data = (family / m / MODEL_FILE).read_bytes()
        c = cz.compress(data)
        seconds += time.perf_counter() - t0
        assert dz.decompress(c) == data
        total += len(c)
    return {"bytes": total, "seconds": seconds}


def m_zipnn(family: Path) -> dict[str, Any]:
    try:
        import zipnn  # noqa: F401
        from zipnn import ZipNN
    except ImportError as exc:
        return {"error": f"zipnn not installed ({exc}); `make bench` installs it with the bench extra"}
    z = ZipNN(input_format="torch", threads=1)
    total, seconds, mutated, count = 0, 0.0, 0, 0
    for m in ALL:
        path = family / m / MODEL_FILE
        total += header(path)[0]
        for _name, dtype, shape, data in tensors(path):
            t = torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[dtype]).reshape(shape)
            t0 = time.perf_counter()
            copy = t.clone()
            blob = z.compress(copy)
            seconds += time.perf_counter() - t0
            count += 1
            if not torch.equal(copy.view(torch.uint8) if copy.dim() else copy, t.view(torch.uint8) if t.dim() else t):
                mutated += 1
            back = z.decompress(blob)
            assert back.dtype == t.dtype and tuple(back.shape) == shape, (m, _name)
            assert torch.equal(back.contiguous().view(torch.uint8), t.view(torch.uint8)), (m, _name)
            total += len(blob)
    version = getattr(sys.modules["zipnn"], "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("zipnn")
    return {"bytes": total, "seconds": seconds, "version": version, "inputs_scrambled": [mutated, count]}


def m_dedup(family: Path) -> dict[str, Any]:
    cz = zstandard.ZstdCompressor(level=3, threads=0)
    seen: set[bytes] = set()
    total, seconds, dups = 0, 0.0, 0
    for m in ALL:
        path = family / m / MODEL_FILE
        total += header(path)[0]
        for _name, dtype, shape, data in tensors(path):
            t0 = time.perf_counter()
            d = digest(dtype, shape, data)
            if d in seen:
                dups += 1
            else:
                seen.add(d)
                total += len(cz.compress(data))
            seconds += time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "duplicates": dups}


def m_bitx(family: Path) -> dict[str, Any]:
    cz, dz = zstandard.ZstdCompressor(level=3, threads=0), zstandard.ZstdDecompressor()
    seen: set[bytes] = set()
    total, seconds, xored = 0, 0.0, 0
    base_path = family / "base" / MODEL_FILE
    for m in ALL:
        path = family / m / MODEL_FILE
        total += header(path)[0]
        for name, dtype, shape, data in tensors(path):
            t0 = time.perf_counter()
            d = digest(dtype, shape, data)
            if d in seen:
                seconds += time.perf_counter() - t0
                continue
            seen.add(d)
            src, partner = data, None
            if m != "base":
                b = read_tensor(base_path, name)
                if b is not None and b[0] == dtype and b[1] == shape:
                    partner = b[2]
                    src = xor(data, partner)
                    xored += 1
            ps = planes(src, ITEMSIZE.get(dtype, 1))
            blobs = [cz.compress(p) for p in ps]
            seconds += time.perf_counter() - t0
            total += sum(len(x) for x in blobs)
            # round trip, untimed: planes back to bytes, XOR back to the tensor
            back = [dz.decompress(x) for x in blobs]
            if len(back) > 1:
                arr = np.stack([np.frombuffer(x, dtype=np.uint8) for x in back], axis=1).tobytes()
            else:
                arr = back[0]
            if partner is not None:
                arr = xor(arr, partner)
            assert arr == data, (m, name)
    return {"bytes": total, "seconds": seconds, "xored": xored}


def wfactor_cmd(family: Path, out: Path, *extra: str) -> list[str]:
    members = [f"{m}={family / m}" for m in MEMBERS]
    return [WFACTOR, "factor", *members, "--base", str(family / "base"), "-o", str(out), "-q", *extra]


def m_wfactor(family: Path, out: Path) -> dict[str, Any]:
    r = run_measured(wfactor_cmd(family, out, "--lossless"))
    if r.returncode != 0:
        raise RuntimeError(f"wfactor factor --lossless failed: {r.stderr.strip()[-500:]}")
    return {"bytes": dir_bytes(out), "seconds": r.seconds, "peak_rss_anon": r.peak_rss_anon}


def check_lossless(family: Path, out: Path) -> int:
    """Every member rebuilt from the lossless family equals its original bit for bit; returns tensors checked."""
    from safetensors.torch import load_file

    import wfactor

    fam = wfactor.open_family(out)
    n = 0
    try:
        for m in MEMBERS:
            orig = load_file(str(family / m / MODEL_FILE))
            sd = fam.state_dict(m)
            assert set(sd) == set(orig), m
            for k, t in orig.items():
                y = sd[k]
                assert y.dtype == t.dtype and y.shape == t.shape, (m, k)
                assert torch.equal(y.contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)), (m, k)
                n += 1
            del orig, sd
    finally:
        fam.close()
    return n


# -- speed and memory ------------------------------------------------------------------------------------
MATERIALIZE = ["full_ft", "bf16", "vocab_grown"]


def speed(family: Path, tmp: Path, startup: float, lossless_out: Path, default_budget: bool) -> dict[str, Any]:
    """factor (default budget, where asked) and materialize (from the default-budget family, else from the
    lossless one) through the CLI: wall time, MB/s, peak RssAnon."""
    res: dict[str, Any] = {"factor_default": None, "materialize_from": "lossless"}
    out = lossless_out
    if default_budget:
        out = tmp / "default"
        r = run_measured(wfactor_cmd(family, out))
        if r.returncode != 0:
            raise RuntimeError(f"wfactor factor failed: {r.stderr.strip()[-500:]}")
        res["factor_default"] = {"seconds": r.seconds, "peak_rss_anon": r.peak_rss_anon, "bytes": dir_bytes(out)}
        res["materialize_from"] = "default budget"
    mats = []
    for m in MATERIALIZE:
        dest = tmp / f"mat-{m}"
        r = run_measured([WFACTOR, "materialize", str(out), m, "-o", str(dest)])
        if r.returncode != 0:
            raise RuntimeError(f"wfactor materialize {m} failed: {r.stderr.strip()[-500:]}")
        written = (dest / MODEL_FILE).stat().st_size
        mats.append({"member": m, "seconds": r.seconds, "peak_rss_anon": r.peak_rss_anon, "bytes": written})
        shutil.rmtree(dest)
    res["materialize"] = mats
    res["startup_s"] = startup
    return res


def startup() -> tuple[float, int]:
    """The CLI's start-up: median wall time of 3 ``wfactor --version`` runs, and its largest peak RssAnon."""
    runs = [run_measured([WFACTOR, "--version"]) for _ in range(3)]
    return sorted(r.seconds for r in runs)[1], max(r.peak_rss_anon for r in runs)


# -- one family ------------------------------------------------------------------------------------------
METHODS = [
    ("zstd", "zstd -3 per file"),
    ("zipnn", "ZipNN per tensor"),
    ("dedup", "tensor dedup + zstd -3"),
    ("bitx", "dedup + XOR byte planes + zstd -3 (ZipLLM/BitX style)"),
    ("wfactor", "wfactor factor --lossless"),
]
PEERS = ["zstd", "zipnn", "dedup", "bitx"]


def run_family(label: str, family: Path, startup: float, default_budget: bool = True) -> dict[str, Any]:
    raw = raw_bytes(family)
    res: dict[str, Any] = {"label": label, "path": family_label(family), "raw": raw, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="wfactor-lossless-") as td:
        tmp = Path(td)
        for key, fn in [("zstd", m_zstd), ("zipnn", m_zipnn), ("dedup", m_dedup), ("bitx", m_bitx)]:
            r = fn(family)
            res["methods"][key] = r
            if "error" in r:
                print(f"  [{label}] {key:<8} not measured: {r['error']}", flush=True)
            else:
                print(f"  [{label}] {key:<8} {r['bytes'] / raw:.3f} of raw  {r['seconds']:.1f} s", flush=True)
        out = tmp / "lossless"
        r = m_wfactor(family, out)
        r["tensors_checked"] = check_lossless(family, out)
        res["methods"]["wfactor"] = r
        print(f"  [{label}] wfactor  {r['bytes'] / raw:.3f} of raw  {r['seconds']:.1f} s", flush=True)
        res["speed"] = speed(family, tmp, startup, out, default_budget)
    return res


# -- report ------------------------------------------------------------------------------------------------
def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e6 / seconds:.3g}" if seconds > 0 else "n/a"


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def render(data: dict[str, Any]) -> tuple[str, dict]:
    info, fams, seconds, png = data["machine"], data["families"], data["seconds"], data.get("png")
    st_rss = data.get("startup", {}).get("peak_rss_anon")
    out: list[str] = []
    w = out.append
    verdict: dict[str, Any] = {}
    w("## Lossless, against the peers (issue 7)")
    w("")
    w(
        f"Measured {machine_line(info)}; one run of `bench/lossless.py`, {seconds:.0f} s. One thread everywhere "
        "(the CLI runs with OMP_NUM_THREADS=1)."
    )
    w("")
    for f in fams:
        gen = large_family.generation_seconds(ROOT / f["path"]) if f["label"] != "fixture" else None
        w(
            f"- **{f['label']}**: `{f['path']}`, seven checkpoints (base + {', '.join(MEMBERS)}), "
            f"{f['raw']:,} bytes side by side"
            + (
                f"; generated by `bench/large_family.py` (the fixture's code, {json.dumps(large_family.PARAMS)}) "
                f"in {gen:.0f} s, cached in `bench/work/`, not committed"
                if gen is not None
                else ""
            )
            + "."
        )
    w("")
    w(
        "Bytes: everything each method must store to give back the seven files (per-tensor methods also keep "
        "each file's safetensors header; wfactor: its family directory on disk: backbone, delta files, "
        "manifest). Every method is checked: zstd, ZipNN and the XOR planes are decompressed and compared bit "
        "for bit, wfactor's members are rebuilt with `open_family(...).state_dict()` and compared tensor by "
        "tensor. Time: compression only (ZipNN includes the defensive copy), file reads from the page cache; "
        "MB/s of raw input. wfactor's time is the CLI's wall time; *net* subtracts its start-up "
        "(`wfactor --version`, median of 3)."
    )
    w("")
    head = ["method"]
    for f in fams:
        head += [f"{f['label']}: bytes", "ratio", "MB/s"]
    rows = []
    for key, desc in METHODS:
        row = [desc]
        for f in fams:
            r = f["methods"][key]
            if "error" in r:
                row += ["not measured", "", ""]
                continue
            secs = r["seconds"] - (f["speed"]["startup_s"] if key == "wfactor" else 0.0)
            row += [f"{r['bytes']:,}", f"**{r['bytes'] / f['raw']:.3f}**", mbps(f["raw"], secs)]
        rows.append(row)
    w(md_table(head, rows))
    w("")
    notes = []
    for f in fams:
        z = f["methods"]["zipnn"]
        if "error" in z:
            notes.append(f"ZipNN on {f['label']}: not measurable here: {z['error']}.")
        else:
            sc = z["inputs_scrambled"]
            notes.append(
                f"ZipNN {z['version']} on {f['label']}: compress() changed the tensor handed to it in {sc[0]} of "
                f"{sc[1]} calls (hence the copy)."
            )
        notes.append(
            f"{f['label']}: dedup found {f['methods']['dedup']['duplicates']} duplicate tensors; the XOR method "
            f"XORed {f['methods']['bitx']['xored']} member tensors with their base partner; wfactor's rebuild "
            f"was checked on {f['methods']['wfactor']['tensors_checked']} tensors."
        )
    w(" ".join(notes))
    w("")
    if png:
        w(f"![lossless bytes as a ratio to raw]({png})")
        w("")

    w("### Goals (lossless)")
    w("")
    lines = []
    for f in fams:
        ms = f["methods"]
        peers = {k: ms[k]["bytes"] for k in PEERS if "error" not in ms[k]}
        best = min(peers, key=lambda k: peers[k])
        ratio = ms["wfactor"]["bytes"] / peers[best]
        ok = ratio <= GOAL_BYTES
        z = ms["zstd"]
        t_ratio = ms["wfactor"]["seconds"] / z["seconds"]
        t_net = (ms["wfactor"]["seconds"] - f["speed"]["startup_s"]) / z["seconds"]
        ok_t = t_ratio <= GOAL_TIME
        verdict[f["label"]] = {
            "best_peer": best,
            "bytes_ratio_to_best_peer": ratio,
            "bytes_goal_met": ok,
            "time_ratio_to_zstd": t_ratio,
            "time_ratio_to_zstd_net": t_net,
            "time_goal_met": ok_t,
        }
        desc = dict(METHODS)[best]
        lines.append(
            f"- **{f['label']}, at least 10% fewer bytes than the best lossless peer: {'met' if ok else 'MISSED'}.** "
            f"wfactor {ms['wfactor']['bytes']:,} bytes ({ms['wfactor']['bytes'] / f['raw']:.3f} of raw) vs "
            f"{desc} {peers[best]:,} ({peers[best] / f['raw']:.3f}): {ratio:.3f} of it (goal <= {GOAL_BYTES})."
        )
        lines.append(
            f"- **{f['label']}, `factor --lossless` no slower than 1.5x zstd -3 over the same bytes: "
            f"{'met' if ok_t else 'MISSED'}.** {ms['wfactor']['seconds']:.1f} s vs {z['seconds']:.2f} s: "
            f"{t_ratio:.1f}x ("
            + (
                f"{t_net:.1f}x without the CLI's {f['speed']['startup_s']:.1f} s start-up)."
                if t_net > 0
                else f"the run is shorter than the CLI's {f['speed']['startup_s']:.1f} s start-up, measured apart: "
                "no net figure)."
            )
        )
    w("\n".join(lines))
    w("")

    w("## Speed and memory (issue 7)")
    w("")
    w(
        "Same run. The CLI on each family: `wfactor factor` (lossless and the default budget) and "
        "`wfactor materialize` of three members (from the default-budget family where one was written, else from "
        "the lossless one). MB/s of the checkpoints read "
        "(factor) or written (materialize); *net* subtracts the CLI's start-up. Peak RssAnon: the largest "
        "anonymous resident memory of the process, sampled from /proc every 10 ms (the files themselves are "
        "mapped, not counted). `bench/memory.py` bounds memory on a 2 GB synthetic family; load times are in "
        "the loader section."
    )
    w("")
    rows = []
    for f in fams:
        sp = f["speed"]
        st = sp["startup_s"]
        wl = f["methods"]["wfactor"]
        fd = sp["factor_default"]
        rows.append(
            [
                f["label"],
                "factor --lossless",
                mb(f["raw"]),
                f"{wl['seconds']:.1f}",
                mbps(f["raw"], wl["seconds"]),
                mbps(f["raw"], wl["seconds"] - st),
                mb(wl["peak_rss_anon"]),
            ]
        )
        if fd is not None:
            rows.append(
                [
                    f["label"],
                    "factor (default budget)",
                    mb(f["raw"]),
                    f"{fd['seconds']:.1f}",
                    mbps(f["raw"], fd["seconds"]),
                    mbps(f["raw"], fd["seconds"] - st),
                    mb(fd["peak_rss_anon"]),
                ]
            )
        for r in sp["materialize"]:
            rows.append(
                [
                    f["label"],
                    f"materialize {r['member']} ({sp['materialize_from']})",
                    mb(r["bytes"]),
                    f"{r['seconds']:.1f}",
                    mbps(r["bytes"], r["seconds"]),
                    mbps(r["bytes"], r["seconds"] - st),
                    mb(r["peak_rss_anon"]),
                ]
            )
    w(md_table(["family", "command", "bytes", "wall s", "MB/s", "MB/s net", "peak RssAnon"], rows, "llrrrrr"))
    w("")
    w(
        f"CLI start-up (`wfactor --version`, median of 3): {fams[0]['speed']['startup_s']:.2f} s"
        + (f", peak RssAnon {mb(st_rss)} (Python, torch and wfactor imported, nothing read)" if st_rss else "")
        + ". Default-budget family on disk: "
        + ", ".join(
            f"{f['label']} {f['speed']['factor_default']['bytes']:,} bytes "
            f"({f['speed']['factor_default']['bytes'] / f['raw']:.3f} of raw)"
            if f["speed"]["factor_default"]
            else f"{f['label']}: not factored at the default budget in this run (WFACTOR_BENCH_LARGE_DEFAULT=1 "
            "adds it; the lossy section on the large family times the planner there)"
            for f in fams
        )
        + "."
    )
    w("")
    return "\n".join(out), verdict


def rerender() -> int:
    """Rewrite bench/results/lossless.md from the .json of the last run (after a change to the report only)."""
    from common import RESULTS_DIR

    data = json.loads((RESULTS_DIR / f"{NAME}.json").read_text())
    md, data["verdict"] = render(data)
    write_results(NAME, md, data)
    print(md)
    return 0


def main() -> int:
    if sys.argv[1:] == ["--render"]:
        return rerender()
    t_start = time.perf_counter()
    info = machine_info()
    print(f"[{NAME}] {machine_line(info)}", flush=True)
    wanted = os.environ.get("WFACTOR_BENCH_FAMILIES", "fixture,large").split(",")
    startup_s, startup_rss = startup()
    fams = []
    if "fixture" in wanted:
        fams.append(run_family("fixture", FAMILY, startup_s))
    if "large" in wanted:
        fams.append(run_family("large", large_family.ensure(), startup_s, default_budget=LARGE_DEFAULT))
    png = plots.lossless_bars(
        {
            f["label"]: {
                dict(METHODS)[k].split(" (")[0]: f["methods"][k]["bytes"] / f["raw"]
                for k, _ in METHODS
                if "error" not in f["methods"][k]
            }
            for f in fams
        },
        "lossless.png",
    )
    seconds = time.perf_counter() - t_start
    data = {
        "machine": info,
        "families": fams,
        "seconds": round(seconds, 1),
        "startup": {"seconds": startup_s, "peak_rss_anon": startup_rss},
        "png": png,
    }
    md, data["verdict"] = render(data)
    path = write_results(NAME, md, data)
    print(md)
    print(f"[{NAME}] wrote {path} in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
