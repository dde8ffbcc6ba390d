"""Crash safety (spec/FORMAT.md 9.1): `wfactor factor` killed with SIGKILL at random points never leaves a
half-written family at the target, and `--force` keeps the previous family whole until the new one is in.

A small driver process imports wfactor once, then forks one child per run; each child runs the `factor`
command (the click command, in-process) and the driver kills it with SIGKILL after a seeded random delay
spread over the length of an uninterrupted run. After every kill the driver checks the target and
reports one JSON line per run; the tests assert on those lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import FAMILY, ROOT

import wfactor
from wfactor.errors import WfactorError
from wfactor.format.atomic import atomic_file, exchange, recover, replace_dir

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

MEMBERS = [f"lora={FAMILY / 'lora'}", f"top_ft={FAMILY / 'top_ft'}"]
KILLS = 10

DRIVER = textwrap.dedent(
    r"""
    import hashlib, json, os, random, shutil, signal, sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    import wfactor
    from wfactor.cli import main
    from wfactor.errors import WfactorError

    def run_child(args):
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)  # the command's report is not the driver's output
            try:
                main.main(args, standalone_mode=False)
            except SystemExit as exc:  # the CLI exits with its status code
                os._exit(exc.code if isinstance(exc.code, int) else 3)
            except BaseException:
                os._exit(3)
            os._exit(0)
        return pid

    def manifest_digest(root):
        p = root / "wfactor.json"
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


    def check(root):
        # the family at ``root``, fully verified: every digest and every record decoded
        try:
            with wfactor.open_family(root) as fam:
                rep = fam.verify()
            return rep.ok, rep.problems[:3]
        except WfactorError as exc:
            return False, [exc.message]


    def scenario(cfg):
        out = Path(cfg["out"])
        pristine = Path(cfg["pristine"]) if cfg["pristine"] else None
        here = out.parent

        def reset():
            if out.exists():
                shutil.rmtree(out)
            if pristine is not None:
                shutil.copytree(pristine, out)

        def emit(row):
            print("ROW " + json.dumps(dict(row, scenario=cfg["name"])), flush=True)

        args = cfg["args"]
        reset()
        t0 = time.perf_counter()
        pid = run_child(args)
        _, status = os.waitpid(pid, 0)
        full = time.perf_counter() - t0
        assert os.waitstatus_to_exitcode(status) == 0, "an uninterrupted run failed"
        emit({"kind": "head", "full_run_s": full, "new": manifest_digest(out)})
        rng = random.Random(cfg["seed"])
        for i in range(cfg["kills"]):
            reset()
            old_digest = manifest_digest(out)
            delay = rng.uniform(0.0, full * 1.05)
            pid = run_child(args)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            row = {"kind": "kill", "delay": delay, "killed": os.WIFSIGNALED(status), "exists": out.exists(),
                   "digest": manifest_digest(out), "old": old_digest}
            if out.exists():
                row["ok"], row["problems"] = check(out)
            leftovers = [p for p in here.iterdir() if p.name != out.name]
            row["leftovers"] = sorted(p.name for p in leftovers)
            row["leftover_is_family"] = []
            for p in leftovers:
                try:
                    wfactor.open_family(p).close()
                    row["leftover_is_family"].append(p.name)
                except WfactorError:
                    pass
            emit(row)
        # the next run tidies what the killed ones left and completes
        pid = run_child(args if "--force" in args else args + ["--force"])
        _, status = os.waitpid(pid, 0)
        emit({"kind": "final", "rc": os.waitstatus_to_exitcode(status), "digest": manifest_digest(out),
              "ok": check(out)[0], "rest": sorted(p.name for p in here.iterdir() if p.name != out.name)})


    for cfg in json.loads(sys.argv[1]):
        scenario(cfg)
    """
)


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Both scenarios in one driver process (one import of torch): a fresh target, and --force over an
    existing (lossless) family. Returns {scenario: {"head", "kills", "final", "old"}}."""
    tmp = tmp_path_factory.mktemp("crash")
    pristine = tmp / "old" / "fam"
    wfactor.factor(MEMBERS, base=str(FAMILY / "base"), out=pristine, budget=wfactor.Budget(lossless=True))
    old = hashlib.sha256((pristine / "wfactor.json").read_bytes()).hexdigest()
    common = [*MEMBERS, "--base", str(FAMILY / "base"), "-q"]
    cfgs = []
    for seed, (name, extra, pre) in enumerate([("fresh", [], None), ("force", ["--force"], pristine)]):
        out = tmp / name / "fam"
        out.parent.mkdir()
        cfgs.append(
            {
                "name": name,
                "out": str(out),
                "args": ["factor", *common, *extra, "-o", str(out)],
                "pristine": str(pre) if pre else None,
                "seed": seed,
                "kills": KILLS,
            }
        )
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(cfgs)], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, dict[str, Any]] = {c["name"]: {"kills": [], "old": None} for c in cfgs}
    out["force"]["old"] = old
    for ln in proc.stdout.splitlines():
        if ln.startswith("ROW "):
            row = json.loads(ln[4:])
            sc = out[row["scenario"]]
            if row["kind"] == "kill":
                sc["kills"].append(row)
            else:
                sc[row["kind"]] = row
    return out


def _check(run: dict[str, Any]) -> None:
    rows, new, old = run["kills"], run["head"]["new"], run["old"]
    assert len(rows) == KILLS
    # most kills landed while the command ran (the others right after it finished)
    assert sum(r["killed"] for r in rows) >= KILLS // 2, rows
    for r in rows:
        assert not r["leftover_is_family"], r
        for name in r["leftovers"]:
            assert name.startswith(".fam.tmp-") or name.startswith(".fam.old-"), r
        if old is None:
            # a fresh target: nothing there, or the complete new family
            assert not r["exists"] or (r["ok"] and r["digest"] == new), r
        else:
            # --force: the previous family until the new one is complete, never a mixture, never nothing
            assert r["exists"] and r["ok"], r
            assert r["digest"] in (old, new), r
    final = run["final"]
    # the next run tidies what the killed ones left beside the target and completes
    assert final["rc"] == 0 and final["ok"] and final["digest"] == new, final
    assert final["rest"] == [], final


def test_sigkill_during_factor_leaves_nothing_or_the_whole_family(kill_runs: dict[str, dict[str, Any]]) -> None:
    run = kill_runs["fresh"]
    _check(run)
    assert any(not r["exists"] for r in run["kills"]), run["kills"]  # some kills landed before the rename


def test_sigkill_during_factor_force_keeps_the_previous_family(kill_runs: dict[str, dict[str, Any]]) -> None:
    run = kill_runs["force"]
    assert run["head"]["new"] != run["old"]
    _check(run)
    assert any(r["digest"] == run["old"] for r in run["kills"]), run["kills"]  # some landed before the swap


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_interrupted_fallback_swap_is_restored(tmp_path: Path) -> None:
    """Without RENAME_EXCHANGE the swap is two renames; a crash between them leaves the old family under
    ``.<name>.old-<pid>`` and no target. The next factor (recover) puts it back before doing anything."""
    fam = tmp_path / "fam"
    wfactor.factor(MEMBERS[:1], base=str(FAMILY / "base"), out=fam, budget=wfactor.Budget(lossless=True))
    before = (fam / "wfactor.json").read_bytes()
    trash = tmp_path / f".fam.old-{_dead_pid()}"
    os.replace(fam, trash)
    stale = tmp_path / f".fam.tmp-{_dead_pid()}"
    (stale / "family-0").mkdir(parents=True)
    with pytest.raises(WfactorError, match="already exists"):  # restored, so without --force it is refused
        wfactor.factor(MEMBERS[:1], base=str(FAMILY / "base"), out=fam)
    assert (fam / "wfactor.json").read_bytes() == before
    assert not trash.exists() and not stale.exists()
    with wfactor.open_family(fam) as f:
        assert f.verify().ok


def test_recover_leaves_live_processes_alone(tmp_path: Path) -> None:
    mine = tmp_path / f".fam.tmp-{os.getpid()}"
    mine.mkdir()
    other = tmp_path / ".unrelated.tmp-1"
    other.mkdir()
    assert recover(tmp_path / "fam") == []
    assert mine.exists() and other.exists()


@pytest.mark.parametrize("use_exchange", [True, False])
def test_replace_dir_swaps_whole_directories(tmp_path: Path, use_exchange: bool) -> None:
    target, new = tmp_path / "t", tmp_path / "n"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    (new / "b").write_text("new")
    replace_dir(new, target, use_exchange=use_exchange)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert (target / "a").read_text() == "new" and (target / "b").read_text() == "new"


def test_exchange_is_atomic_swap_where_supported(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here; replace_dir falls back to two renames")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "wfactor.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wfactor.json"]
    with atomic_file(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # not yet
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wfactor.json"]
