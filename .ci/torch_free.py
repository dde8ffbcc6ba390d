"""CI check: the torch-free core works in an environment where torch is not installed at all.

Run by `make torch-free` in a virtual environment holding wfactor (installed without its dependencies) plus
numpy, zstandard, click and rich only: the format package and the family checks import, the independent
reference reader rebuilds the conformance control family, `wfactor --help` / `wfactor inspect` run, and
`wfactor factor --lossless` factors the fixture family (with and without --base; the base-only casts of its
bf16 member and grown vocabulary included), every member rebuilt bit for bit by the reference reader.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "fixtures" / "invalid" / "valid"
FIXTURES = ROOT / "fixtures" / "family"


def factor_lossless(exe: Path, rr: object) -> int:
    """`wfactor factor --lossless` here (no torch), with and without --base: each member comes back from the
    reference reader equal to its checkpoint, bit for bit. Returns the members checked."""
    members = [p.name for p in sorted(FIXTURES.iterdir()) if p.name != "base"]
    args = [f"{m}={FIXTURES / m}" for m in members]
    checked = 0
    with tempfile.TemporaryDirectory() as tmp:
        for extra in (["--base", str(FIXTURES / "base")], []):
            out = Path(tmp) / ("with-base" if extra else "no-base")
            res = subprocess.run(
                [str(exe), "factor", *args, *extra, "--lossless", "-o", str(out), "-q"], capture_output=True, text=True
            )
            assert res.returncode == 0, res.stderr
            fam = rr.open_family(out)  # type: ignore[attr-defined]
            for m in members:
                _meta, want = rr.read_safetensors(FIXTURES / m / "model.safetensors")  # type: ignore[attr-defined]
                got = fam.state_dict(m)
                assert sorted(got) == sorted(want), m
                for k, a in want.items():
                    b = got[k]
                    assert a.shape == b.shape and a.tobytes() == np.ascontiguousarray(b).tobytes(), (m, k)
                checked += 1
    return checked


def main() -> int:
    assert importlib.util.find_spec("torch") is None, "this check must run where torch is not installed"
    import wfactor.format  # noqa: F401
    from wfactor.format.family_dir import FamilyDir

    sys.path.insert(0, str(ROOT / "tests"))
    import reference_reader as rr

    with FamilyDir(FAMILY) as fam:
        fam.verify_backbone(full=True)
        with fam.open_delta("m") as d:
            names = sorted(d.records)
    ref = rr.open_family(FAMILY).state_dict("m")
    assert sorted(ref) == names, (sorted(ref), names)
    exe = Path(sys.executable).with_name("wfactor")
    for args in (["--help"], ["inspect", str(FAMILY)], ["inspect", str(FAMILY), "--json"]):
        res = subprocess.run([str(exe), *args], capture_output=True, text=True)
        assert res.returncode == 0, (args, res.stderr)
    res = subprocess.run([str(exe), "verify", str(FAMILY)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error[dependency]:"), res.stderr
    checked = factor_lossless(exe, rr)
    print(
        f"torch-free: wfactor.format, FamilyDir, the reference reader ({len(names)} tensors), the CLI and "
        f"`factor --lossless` ({checked} members rebuilt bit for bit) work"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
