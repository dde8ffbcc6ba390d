"""Inputs are never modified (issue 5, item 8): no codec, planner, reader or factor() writes into a
caller's tensor or a source file.

Tensors are snapshotted (bit patterns) before and compared after; source files are compared by SHA-256
and modification time. A separate process also feeds every codec and the planner tensors that live in
read-only memory maps of the fixture files, where any write faults (the process would die with SIGSEGV).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILY, ROOT

import wfactor
from wfactor.codecs import dense, lowrank, quant, residual, sparse
from wfactor.format.parts import PartSpec
from wfactor.format.records import Record
from wfactor.inputs import open_source
from wfactor.plan import Budget, TensorPlanner, plan_tensor, rebuild_planned
from wfactor.reconstruct import reconstruct
from wfactor.tensors import bitwise_equal, from_storage


def _snap(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone() for t in ts]


def _same(before: list[torch.Tensor], *after: torch.Tensor) -> None:
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert bitwise_equal(b, a), "an input tensor was modified"


def _pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, target, base): fp32 full/low-rank/sparse drifts, bf16 and fp16 targets, a grown vocabulary,
    an integer tensor, a non-contiguous view."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(48, 40, generator=g)
    lr = b + 0.05 * torch.randn(48, 3, generator=g) @ torch.randn(3, 40, generator=g)
    sp = b.clone()
    sp.view(-1)[::97] += 1.0
    grown = torch.cat([b, torch.randn(8, 40, generator=g)]) + 0.01
    return [
        ("full", b + 0.01 * torch.randn(48, 40, generator=g), b),
        ("lowrank", lr, b),
        ("sparse", sp, b),
        ("bf16", (b + 0.01).to(torch.bfloat16), b),
        ("fp16", (b - 0.01).to(torch.float16), b.to(torch.float16)),
        ("grown", grown, b),
        ("int", torch.arange(40, dtype=torch.int64) * 3, torch.arange(40, dtype=torch.int64)),
        ("view", (b + 0.02).t(), b.t()),
        ("vector", b[0] + 0.1, b[0]),
    ]


@pytest.mark.parametrize("label", [p[0] for p in _pairs()])
def test_codec_encoders_leave_their_inputs_alone(label: str) -> None:
    _, target, base = next(p for p in _pairs() if p[0] == label)
    before = _snap(target, base)
    dense.encode(target)
    if target.is_floating_point() and target.shape == base.shape:
        delta = target.to(torch.float32) - base.to(torch.float32)
        dsnap = _snap(delta)
        residual.encode(target, base.to(target.dtype))
        for bits in (2, 5, 8):
            codes, scales = quant.best(delta, bits)
            csnap = _snap(codes, scales)
            quant.encode(codes, scales, bits)
            _same(csnap, codes, scales)
        sparse.encode(delta, 17)
        sparse.encode(delta, delta.numel())
        if delta.dim() >= 2:
            u, s, vh = lowrank.spectrum(delta, 4)
            usnap = _snap(u, s, vh)
            lowrank.encode(u, s, vh, 3)
            _same(usnap, u, s, vh)
        _same(dsnap, delta)
    assert all(bitwise_equal(b, a) for b, a in zip(before, (target, base))), "an encoder modified its input"


@pytest.mark.parametrize("label", [p[0] for p in _pairs()])
@pytest.mark.parametrize("budget", [Budget(), Budget(lossless=True)], ids=["lossy", "lossless"])
def test_planner_leaves_target_and_base_alone(label: str, budget: Budget) -> None:
    _, target, base = next(p for p in _pairs() if p[0] == label)
    before = _snap(target, base)
    planned = plan_tensor("w", target, "w", base, budget)
    y = rebuild_planned(planned, base)  # the reader's path, as the planner measures it
    _same(before, target, base)
    if budget.lossless:
        assert bitwise_equal(y, target.contiguous())
    if not budget.lossless and target.is_floating_point():
        TensorPlanner("w", target, "w", base, budget).ladder()  # every option of a family-wide budget
        _same(before, target, base)


def test_decoders_leave_parts_and_base_alone() -> None:
    """Decoded parts are cached (Family.delta_cache) and bases are the shared backbone: rebuilding must not
    write into either."""
    for label, target, base in _pairs():
        for budget in (Budget(), Budget(lossless=True)):
            planned = plan_tensor("w", target, "w", base, budget)
            parts = {
                k: from_storage(_decoded(planned, k), s.dtype)
                for k, s in ((s.key, s) for s in planned.record.part_specs())
            }
            before = _snap(base, *parts.values())

            def load(spec: PartSpec, parts: dict[str, torch.Tensor] = parts) -> torch.Tensor:
                return parts[spec.key]

            y1 = reconstruct(planned.record, base, load)
            y2 = reconstruct(planned.record, base, load)
            _same(before, base, *parts.values())
            assert bitwise_equal(y1, y2), label


def _decoded(planned: object, key: str) -> object:
    from wfactor.format.parts import read_part_array

    spec = next(s for s in planned.record.part_specs() if s.key == key)  # type: ignore[attr-defined]
    return read_part_array(spec, planned.stored[key], key)  # type: ignore[attr-defined]


def test_reconstruct_identical_shares_but_never_writes_the_base() -> None:
    base = torch.randn(8, 8)
    before = _snap(base)
    rec = Record("w", (8, 8), "F32", "w")
    y = reconstruct(rec, base, lambda spec: torch.empty(0))
    assert y.data_ptr() == base.data_ptr()  # identical tensors are the backbone's own storage (documented)
    _same(before, base)


def _digests(paths: list[Path]) -> dict[str, tuple[str, int, int]]:
    out = {}
    for d in paths:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def test_sources_reader_returns_private_tensors() -> None:
    src_dir = FAMILY / "lora"
    before = _digests([src_dir])
    with open_source(str(src_dir)) as src:
        key = src.keys()[0]
        t = src.tensor(key)
        want = t.clone()
        t.add_(1.0)  # a caller writing into what it was given
        assert bitwise_equal(src.tensor(key), want)
        raw = src.raw_bytes(key)
        assert isinstance(raw, bytes)
    assert _digests([src_dir]) == before


@pytest.mark.parametrize(
    "mode",
    [
        ("base", wfactor.Budget()),
        ("base", wfactor.Budget(lossless=True)),
        (None, wfactor.Budget()),
    ],
    ids=["lossy", "lossless", "no_base"],
)
def test_factor_leaves_source_files_alone(mode: tuple[str | None, wfactor.Budget], tmp_path: Path) -> None:
    base, budget = mode
    members = ["lora", "vocab_grown"]
    dirs = [FAMILY / m for m in members] + ([FAMILY / base] if base else [FAMILY / "base"])
    before = _digests(dirs)
    args = [f"{m}={FAMILY / m}" for m in members] + ([] if base else [f"base={FAMILY / 'base'}"])
    wfactor.factor(args, base=str(FAMILY / base) if base else None, out=tmp_path / "fam", budget=budget)
    assert _digests(dirs) == before
    assert sorted(p.name for p in FAMILY.iterdir() if p.name.startswith(".")) == []  # nothing left beside them


READ_ONLY_DRIVER = textwrap.dedent(
    r"""
    import mmap, sys
    import torch
    from wfactor.codecs import dense, lowrank, quant, residual, sparse
    from wfactor.format.safetensors_io import SafetensorsFile
    from wfactor.plan import Budget, TensorPlanner, plan_tensor
    from wfactor.tensors import TORCH_DTYPES
    import warnings
    warnings.simplefilter("ignore")  # torch warns that the buffers are not writable: that is the point

    def mapped(path):
        f = SafetensorsFile(path)
        fh = open(path, "rb")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        out = {}
        for name, info in f.tensors.items():
            if info.nbytes == 0:
                continue
            dt = TORCH_DTYPES[info.dtype]
            n = info.numel
            t = torch.frombuffer(mm, dtype=dt, count=n, offset=f.data_start + info.begin).reshape(info.shape)
            out[name] = t
        return out, (fh, mm, f)

    base, keep1 = mapped(sys.argv[1])
    done = 0
    for member in sys.argv[2:]:
        tensors, keep2 = mapped(member)
        for name, t in tensors.items():
            b = base.get(name)
            dense.encode(t)
            if b is not None and t.is_floating_point() and b.shape == t.shape:
                residual.encode(t, b.to(t.dtype))
            for budget in (Budget(), Budget(lossless=True)):
                plan_tensor(name, t, name if b is not None else None, b, budget)
            if b is not None and t.is_floating_point() and b.dim() == t.dim() and done % 8 == 0:
                TensorPlanner(name, t, name, b, Budget()).ladder()  # every option (a family-wide budget)
            done += 1
    print("ok", done)
    """
)


def test_codecs_and_planner_run_on_read_only_memory_maps(tmp_path: Path) -> None:
    """Any write into an input tensor would fault: the tensors are views of read-only maps of the files."""
    script = tmp_path / "ro.py"
    script.write_text(READ_ONLY_DRIVER)
    files = [str(FAMILY / m / "model.safetensors") for m in ("base", "top_ft", "vocab_grown")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), *files], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode} (-11: a write into a read-only input): {proc.stderr[-2000:]}"
    assert proc.stdout.split()[0] == "ok" and int(proc.stdout.split()[1]) > 60, proc.stdout
