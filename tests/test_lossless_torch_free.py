"""Lossless factoring never imports torch (issue 17: wfactor.exact plans it with numpy): in a process where
importing torch fails, `wfactor factor --lossless` writes the same bytes as in this process (torch loaded)
and as a lossy planner's exact options would; quantised members are the exception, and say so."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import wfactor
from wfactor.format import read_manifest

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "fixtures" / "family"
MEMBERS = [p.name for p in sorted(FAMILY.iterdir()) if p.name != "base"]

BLOCKED = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked here (imported: {name})")

    sys.meta_path.insert(0, NoTorch())
    sys.argv = ["wfactor", *sys.argv[1:]]
    try:
        runpy.run_module("wfactor", run_name="__main__")
    finally:
        assert "torch" not in sys.modules
    """
)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("with_base", [True, False])
def test_lossless_factor_without_torch_is_the_same_bytes(tmp_path: Path, with_base: bool) -> None:
    args = [f"{m}={FAMILY / m}" for m in MEMBERS]
    base = ["--base", str(FAMILY / "base")] if with_base else []
    script = tmp_path / "no_torch.py"
    script.write_text(BLOCKED)
    cmd = [sys.executable, str(script), "factor", *args, *base, "--lossless", "-o", str(tmp_path / "a"), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    wfactor.factor(args, base=str(FAMILY / "base") if with_base else None, out=tmp_path / "b",
                   budget=wfactor.Budget(lossless=True), workers=2)  # fmt: skip
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for rel in a:
        assert a[rel] == b[rel], rel
    fam = wfactor.open_family(tmp_path / "a")
    assert fam.members == MEMBERS
    codecs = {c for m in read_manifest(tmp_path / "a").members for c in m.plan["codecs"]}
    assert "base+residual" in codecs and codecs <= {"identical", "base+residual", "dense"}, codecs


def test_lossy_factor_imports_torch(tmp_path: Path) -> None:
    script = tmp_path / "no_torch.py"
    script.write_text(BLOCKED)
    cmd = [sys.executable, str(script), "factor", f"lora={FAMILY / 'lora'}", "--base", str(FAMILY / "base"),
           "-o", str(tmp_path / "a"), "-q"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "torch is blocked here" in res.stderr + res.stdout
