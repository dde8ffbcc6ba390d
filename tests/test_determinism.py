"""Determinism (issue 5, item 6): the same inputs and options give byte-identical family files, whatever the
process, its hash seed, its torch thread count or the output directory's name.

Each mode is factored once in this process (library) and once in a separate process (the command line,
another PYTHONHASHSEED, another output name); every file of the two families is compared byte for byte.
tests/test_family.py::test_factor_is_deterministic covers the default lossy mode within one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILY, ROOT

import wfactor

MODES: dict[str, tuple[list[str], str | None, list[str]]] = {
    # name: (members, base, extra CLI options)
    "lossy": (["lora", "bf16", "unrelated"], "base", []),
    "lossless": (["lora", "bf16", "unrelated"], "base", ["--lossless"]),
    "no_base": (["base", "lora", "top_ft"], None, []),
    "target_ratio": (["lora", "top_ft"], "base", ["--target-ratio", "0.5"]),
}


def _budget(extra: list[str]) -> wfactor.Budget:
    if "--lossless" in extra:
        return wfactor.Budget(lossless=True)
    if "--target-ratio" in extra:
        return wfactor.Budget(target_ratio=float(extra[extra.index("--target-ratio") + 1]))
    return wfactor.Budget()


def _args(members: list[str]) -> list[str]:
    return [f"{m}={FAMILY / m}" for m in members]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every mode factored by `wfactor factor` in one separate process with another hash seed and another
    torch thread count (this module runs with one)."""
    root = tmp_path_factory.mktemp("det_cli")
    script = (
        "import sys, json\n"
        "from wfactor.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        main.main(argv, standalone_mode=False)\n"
        "    except SystemExit as exc:\n"
        "        if exc.code:\n"
        "            raise\n"
    )
    runs = []
    for name, (members, base, extra) in MODES.items():
        argv = ["factor", *_args(members), *extra, "-o", str(root / name / "another_name"), "-q"]
        if base:
            argv += ["--base", str(FAMILY / base)]
        runs.append(argv)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="3")
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("mode", list(MODES))
def test_same_inputs_give_byte_identical_families(mode: str, other_process: Path, tmp_path: Path) -> None:
    members, base, extra = MODES[mode]
    here = tmp_path / "fam"
    wfactor.factor(_args(members), base=str(FAMILY / base) if base else None, out=here, budget=_budget(extra))
    a, b = _files(here), _files(other_process / mode / "another_name")
    assert sorted(a) == sorted(b)
    assert {"wfactor.json", "backbone.safetensors"} <= set(a)
    assert len([k for k in a if k.startswith("deltas/")]) == len(members)
    different = [k for k in a if a[k] != b[k]]
    assert not different, different


def test_determinism_would_notice_a_different_option(other_process: Path, tmp_path: Path) -> None:
    """The comparison is sensitive: a slightly different budget changes the bytes."""
    members, base, _extra = MODES["lossy"]
    here = tmp_path / "fam"
    wfactor.factor(_args(members), base=str(FAMILY / base), out=here, budget=wfactor.Budget(max_rel_error=0.2))
    a, b = _files(here), _files(other_process / "lossy" / "another_name")
    assert a["backbone.safetensors"] == b["backbone.safetensors"]
    assert a["deltas/lora.safetensors"] != b["deltas/lora.safetensors"]


@pytest.mark.parametrize("mode", ["lossy", "target_ratio", "no_base"])
def test_families_are_byte_identical_for_any_number_of_workers(tmp_path: Path, mode: str) -> None:
    """Tensors are planned on worker threads (--workers), each with one torch thread: 1, 2 and 4 workers
    write the same bytes, manifest included."""
    members, base, extra = MODES[mode]
    trees = []
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        wfactor.factor(
            _args(members), base=str(FAMILY / base) if base else None, out=out, budget=_budget(extra), workers=workers
        )
        trees.append(_files(out))
    assert trees[0] == trees[1] == trees[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path: Path) -> None:
    """--device cuda where torch sees no GPU, and a device that is not one, are refused in one line."""
    from conftest import invoke

    for device, words in (("cuda", "no such CUDA device"), ("cuda:7", "no such CUDA device"), ("tpu", "cpu, cuda")):
        code, _out, err = invoke(
            "factor", *_args(["lora"]), "--base", str(FAMILY / "base"), "-o", str(tmp_path / "f"), "--device", device
        )
        assert code == 2 and err.startswith("error[input]:") and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "f").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_planning_is_deterministic_and_keeps_outputs(tmp_path: Path) -> None:  # pragma: no cover - GPU only
    """--device cuda: two runs (1 and 2 workers) write the same bytes; lossless is the same as on the CPU; the
    lossy members keep their outputs."""
    import tinylm

    members, base, extra = MODES["lossy"]
    trees = []
    for workers in (1, 2):
        out = tmp_path / f"cuda{workers}"
        wfactor.factor(_args(members), base=str(FAMILY / base), out=out, workers=workers, device="cuda")
        trees.append(_files(out))
    assert trees[0] == trees[1]
    with wfactor.open_family(tmp_path / "cuda1") as fam:
        for m in members:
            cfg = json.loads((FAMILY / m / "config.json").read_text())
            rebuilt = tinylm.model_from_state_dict(cfg, fam.state_dict(m))
            assert tinylm.worst_cosine(tinylm.load_model(FAMILY / m), rebuilt) >= 0.999, m
    lossless = wfactor.Budget(lossless=True)
    for device in ("cpu", "cuda"):
        out = tmp_path / f"ll-{device}"
        wfactor.factor(_args(members), base=str(FAMILY / base), out=out, budget=lossless, device=device)
    assert _files(tmp_path / "ll-cpu") == _files(tmp_path / "ll-cuda")
