"""The planner: each budget, each codec chosen where it should be, and measured errors within budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinylm
import torch
from conftest import FAMILY, MEMBERS, member_args

import wfactor
from wfactor.errors import InputError
from wfactor.format.manifest import read_manifest
from wfactor.plan import Budget, TensorPlanner, allocate, plan_tensor


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


BASE = torch.randn(128, 96, generator=g(0))


def planned(target: torch.Tensor, budget: Budget | None = None, base: torch.Tensor = BASE):
    return plan_tensor("w", target, "w", base, budget or Budget())


def test_identical_and_exact_casts_cost_nothing() -> None:
    assert planned(BASE.clone()).record.codec == "identical"
    bf = BASE.to(torch.bfloat16)
    p = planned(bf)
    assert p.record.codec == "identical" and p.nbytes == 0


def test_tiny_drift_below_the_floor_keeps_the_base() -> None:
    p = planned(BASE + 1e-6 * torch.randn(128, 96, generator=g(1)))
    assert p.record.codec == "base" and p.nbytes == 0 and p.record.error["rel_l2"] < 1e-4


def test_full_rank_drift_is_quantised_within_budget() -> None:
    t = BASE + 0.02 * torch.randn(128, 96, generator=g(2))
    p = planned(t)
    assert p.record.codec == "quant"
    assert p.record.error["rel_drift"] <= 0.1
    assert p.nbytes < 0.25 * t.numel() * 4


def test_exact_low_rank_drift_is_low_rank() -> None:
    t = BASE + 0.05 * torch.randn(128, 3, generator=g(3)) @ torch.randn(3, 96, generator=g(4))
    p = planned(t)
    assert p.record.codec == "lowrank" and p.record.terms[0].params["rank"] <= 3


def test_few_changed_entries_are_sparse() -> None:
    t = BASE.clone()
    idx = torch.randperm(t.numel(), generator=g(5))[:30]
    t.view(-1)[idx] += 1.0
    p = planned(t)
    assert p.record.codec == "sparse" and p.record.error["rel_drift"] <= 0.1


def test_low_rank_plus_noise_uses_a_combination() -> None:
    base = torch.randn(256, 256, generator=g(6))
    t = base + 0.1 * torch.randn(256, 4, generator=g(7)) @ torch.randn(4, 256, generator=g(8))
    t = t + 0.1 * torch.randn(256, 256, generator=g(9))
    p = planned(t, base=base)
    assert p.record.codec == "lowrank+quant", p.record.codec
    tp = TensorPlanner("w", t, "w", base, Budget())
    single = [tp._search_bits("quant:{}", p.record.error["rel_l2"] * 1.0001)]
    assert single[0] is None or p.nbytes < single[0].nbytes
    assert p.record.error["rel_drift"] <= 0.1


def test_unrelated_tensor_and_non_finite_values_are_stored_exactly() -> None:
    other = torch.randn(128, 96, generator=g(10))
    assert planned(other).record.error["rel_l2"] == 0.0
    bad = BASE + 0.01
    bad[0, 0] = float("nan")
    bad[1, 1] = float("inf")
    p = planned(bad)
    assert p.record.error["rel_l2"] == 0.0 or p.record.error.get("rel_l2") != p.record.error.get("rel_l2")
    from wfactor.plan import rebuild_planned
    from wfactor.tensors import bitwise_equal

    assert bitwise_equal(rebuild_planned(p, BASE), bad)


def test_lossless_budget_and_integer_tensors_are_exact() -> None:
    t = BASE + 0.02 * torch.randn(128, 96, generator=g(11))
    p = planned(t, Budget(lossless=True))
    assert p.record.residual is not None and p.record.error["rel_l2"] == 0.0
    ids = torch.arange(10)
    q = plan_tensor("ids", ids + 1, "ids", ids, Budget())
    assert q.record.error["rel_l2"] == 0.0 and q.record.codec in ("base+residual", "dense")


@pytest.mark.parametrize("limit", [0.02, 0.1, 0.5])
def test_every_record_meets_the_per_tensor_budget(limit: float, tmp_path: Path) -> None:
    out = tmp_path / "fam"
    wfactor.factor(member_args(), base=str(FAMILY / "base"), out=out, budget=Budget(max_rel_error=limit))
    fam = wfactor.open_family(out)
    for m in fam.members:
        with fam.open_delta(m) as d:
            for r in d.records.values():
                floor_ok = r.error["rel_l2"] <= 1e-4
                assert r.error.get("rel_drift", 0.0) <= limit * 1.0001 or floor_ok, (m, r.name, r.error)


def test_allocate_spends_where_error_falls_fastest() -> None:
    ladders = [
        [("a0", 0, 1.0), ("a1", 10, 0.1), ("a2", 100, 0.0)],
        [("b0", 0, 1.0), ("b1", 50, 0.9)],
    ]
    opts, used = allocate(ladders, 60)
    assert opts == ["a1", "b1"] and used == 60
    opts, used = allocate(ladders, 20)
    assert opts == ["a1", "b0"] and used == 10
    opts, used = allocate(ladders, 10_000)
    assert opts == ["a2", "b1"]


def family_quality(out: Path) -> float:
    fam = wfactor.open_family(out)
    worst = 1.0
    for m in MEMBERS:
        cfg = json.loads((FAMILY / m / "config.json").read_text())
        rebuilt = tinylm.model_from_state_dict(cfg, fam.state_dict(m))
        worst = min(worst, tinylm.worst_cosine(tinylm.load_model(FAMILY / m), rebuilt))
    return worst


def test_target_bytes_and_ratio_are_met_and_buy_quality(tmp_path: Path) -> None:
    args = member_args()
    sizes = {}
    quality = {}
    for ratio in (0.36, 0.40):
        out = tmp_path / f"r{ratio}"
        rep = wfactor.factor(args, base=str(FAMILY / "base"), out=out, budget=Budget(target_ratio=ratio))
        sizes[ratio] = rep.family_bytes
        assert rep.family_bytes <= ratio * rep.original_bytes
        quality[ratio] = family_quality(out)
        assert read_manifest(out).members[0].plan["budget"]["target_ratio"] == ratio
    assert sizes[0.36] < sizes[0.40] and quality[0.36] < quality[0.40]
    assert quality[0.40] >= 0.999
    out = tmp_path / "bytes"
    rep = wfactor.factor(args, base=str(FAMILY / "base"), out=out, budget=Budget(target_bytes=sizes[0.36]))
    assert rep.family_bytes <= sizes[0.36]


def test_impossible_or_conflicting_targets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is not possible"):
        wfactor.factor(member_args(), base=str(FAMILY / "base"), out=tmp_path / "a", budget=Budget(target_bytes=1000))
    with pytest.raises(InputError, match="not both"):
        wfactor.factor(
            member_args(),
            base=str(FAMILY / "base"),
            out=tmp_path / "b",
            budget=Budget(target_bytes=10**7, target_ratio=0.5),
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
