"""The package's structure: a torch-free core, no import cycles, no reach-ins into other modules' private
members, no module shadowed by a function, a command line that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "wfactor"

# Run in a child interpreter in which `import torch` (and transformers, which pulls it) fails, as on a
# machine without torch: the format, the manifest and delta checks, inspect's report and the reference
# reader must work there.
NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "diffusers", "peft"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_format_and_the_reference_reader_need_no_torch() -> None:
    family = ROOT / "fixtures" / "invalid" / "valid"
    code = f"""
import numpy as np
import wfactor, wfactor.format
from wfactor.format import read_manifest, DeltaFile
from wfactor.format.family_dir import FamilyDir, describe_delta
sys.path.insert(0, {str(ROOT / "tests")!r})
import reference_reader as rr
fam = FamilyDir({str(family)!r})
fam.verify_backbone(full=True)
with fam.open_delta("m") as d:
    names = sorted(d.records)
desc = fam.describe().to_json()
ref = rr.open_family({str(family)!r}).state_dict("m")
assert sorted(ref) == names, (sorted(ref), names)
assert desc["members"][0]["name"] == "m"
assert "torch" not in sys.modules
print("ok", len(names))
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok ")


def test_the_command_line_starts_and_inspects_without_torch(lossless_family: Path) -> None:
    code = f"""
from click.testing import CliRunner
from wfactor.cli import main
r = CliRunner().invoke(main, ["--help"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(main, ["inspect", {str(lossless_family)!r}, "--json"])
assert r.exit_code == 0, r.output
assert "torch" not in sys.modules
print("ok")
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    # a command that needs torch says so in one line when it is missing
    res = _run(
        "from click.testing import CliRunner\nfrom wfactor.cli import main\n"
        f"r = CliRunner().invoke(main, ['verify', {str(lossless_family)!r}])\nprint(r.exit_code)\nprint(r.output)"
    )
    assert res.returncode == 0, res.stderr
    code_line, *rest = [line for line in res.stdout.splitlines() if line]
    assert code_line == "2" and rest and rest[-1].startswith("error[dependency]:") and "torch" in rest[-1]


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every wfactor module each module imports at run time, at any level (function-local imports included;
    imports for type checkers only, under ``if TYPE_CHECKING:``, are not run and do not count)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        tree = ast.parse(p.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    target = base + ("." + node.module if node.module else "")
                else:
                    target = node.module or ""
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        edges[m].add(f"{target}.{a.name}")
                    elif target in mods:
                        edges[m].add(target)
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in mods)
        edges[m].discard(m)
    return edges


def test_the_import_graph_has_no_cycles() -> None:
    edges = _imports(_modules())
    assert len(edges) > 40 and edges["wfactor.factoring"]  # the graph was read (the package's modules)
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[str] = []

    def visit(v: str) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                cycles.append(" -> ".join(path[path.index(w) :] + [w]))
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v)
    assert cycles == [], cycles


def test_no_module_reaches_into_another_modules_private_members() -> None:
    """``obj._name`` where ``_name`` is a private attribute or method defined by another wfactor module, and
    ``from .x import _name``, are not allowed: modules talk through public names. (Private members of other
    libraries, such as torch's ``Module._parameters``, are not ours to police.)"""
    defined: dict[str, set[str]] = defaultdict(set)
    uses: list[tuple[str, int, str]] = []
    for p in sorted(PKG.rglob("*.py")):
        mod = p.relative_to(ROOT).as_posix()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("_"):
                if not n.name.startswith("__"):
                    defined[n.name].add(mod)
            elif isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
                if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                    if isinstance(n.ctx, ast.Store):
                        defined[n.attr].add(mod)
                    continue
                uses.append((mod, n.lineno, n.attr))
            elif isinstance(n, ast.ImportFrom) and n.level:
                for a in n.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        uses.append((mod, n.lineno, "import " + a.name))
    bad = [
        f"{mod}:{line}: {what}"
        for mod, line, what in uses
        if what.startswith("import ") or (what in defined and defined[what] != {mod})
    ]
    assert not bad, bad


def test_no_module_is_shadowed_by_a_function() -> None:
    import importlib

    import wfactor

    for name in wfactor.__all__:
        value = getattr(wfactor, name)
        if callable(value):
            spec = importlib.util.find_spec(f"wfactor.{name}")
            assert spec is None, f"wfactor.{name} is both a module and a public function"
    report = wfactor.factor  # still the function after every submodule was imported
    import wfactor.factoring  # noqa: F401

    assert wfactor.factor is report and callable(wfactor.factor)
