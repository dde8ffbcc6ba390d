"""Factoring on a Ray cluster (wfactor/distributed.py): a local 2-CPU Ray instance plans the tensors and the
family is byte-identical to a local run's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAMILY, invoke

import wfactor

ray = pytest.importorskip("ray")  # the `ray` extra (installed by the `test` extra)


@pytest.fixture(scope="module")
def local_cluster():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "members,base,budget",
    [
        (["lora", "top_ft", "bf16", "unrelated"], "base", wfactor.Budget()),
        (["lora", "vocab_grown"], "base", wfactor.Budget(lossless=True)),
        (["full_ft", "lora", "top_ft"], None, wfactor.Budget()),
    ],
    ids=["lossy", "lossless", "no_base"],
)
def test_ray_and_local_runs_write_the_same_bytes(
    local_cluster: None, tmp_path: Path, members: list[str], base: str | None, budget: wfactor.Budget
) -> None:
    args = [f"{m}={FAMILY / m}" for m in members]
    b = str(FAMILY / base) if base else None
    wfactor.factor(args, base=b, out=tmp_path / "local", budget=budget, workers=1)
    wfactor.factor(args, base=b, out=tmp_path / "ray", budget=budget, executor="ray")
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")


def test_an_unknown_executor_is_a_one_line_error(tmp_path: Path) -> None:
    code, _out, err = invoke(
        "factor",
        f"lora={FAMILY / 'lora'}",
        "--base",
        str(FAMILY / "base"),
        "-o",
        str(tmp_path / "f"),
        "--executor",
        "spark",
    )
    assert code == 2 and "executor" in err
