"""CI check: the torch-free core works in an environment where torch is not installed at all.

Run by `make torch-free` in a virtual environment holding wfactor (installed without its dependencies) plus
numpy, zstandard, click and rich only: the format package and the family checks import, the independent
reference reader rebuilds the conformance control family, and `wfactor --help` / `wfactor inspect` run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "fixtures" / "invalid" / "valid"


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
    print(f"torch-free: wfactor.format, FamilyDir, the reference reader ({len(names)} tensors) and the CLI work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
