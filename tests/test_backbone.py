"""Backbone choice without --base, and unrelated members stored whole and flagged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILY, member_args

import wfactor
from wfactor.backbone import pairwise, widest
from wfactor.format.manifest import read_manifest
from wfactor.inputs import open_source


def test_pairwise_distances_see_fine_tunes_close_and_unrelated_far() -> None:
    srcs = [open_source(a) for a in member_args()] + [open_source(str(FAMILY / "base"), name="base")]
    try:
        d = pairwise(srcs)
        base = len(srcs) - 1
        rel = {s.name: d.relative(i, base) for i, s in enumerate(srcs)}
        assert rel["base"] == 0.0
        assert all(rel[m] < 0.1 for m in ("full_ft", "top_ft", "lora", "bf16", "vocab_grown")), rel
        assert rel["unrelated"] > 0.5
        assert d.sq[0, 1] == d.sq[1, 0]
        assert [srcs[i].name for i in widest(srcs, range(len(srcs)))] == [s.name for s in srcs if s.name != "bf16"]
    finally:
        for s in srcs:
            s.close()


def test_without_base_the_smaller_candidate_is_kept(tmp_path: Path) -> None:
    args = member_args() + [f"base={FAMILY / 'base'}"]
    rep = wfactor.factor(args, base=None, out=tmp_path / "fam", exhaustive=True)
    origin = rep.backbone_origin
    assert set(origin["tried_bytes"]) == {"medoid", "consensus"}
    chosen = origin["kind"]
    assert origin["tried_bytes"][chosen] == min(origin["tried_bytes"].values())
    assert chosen == "medoid" and origin["member"] == "base"  # measured: 2.58 MB vs 2.97 MB for the mean
    man = read_manifest(tmp_path / "fam")
    assert man.backbone_origin["kind"] == "medoid"
    fam = wfactor.open_family(tmp_path / "fam")
    assert fam.state_dict("base")  # the medoid is a member too, at almost no cost
    assert man.member("base").delta.size < 20_000
    flags = {m.name: m.related for m in rep.members}
    assert flags["unrelated"] is False and all(v for k, v in flags.items() if k != "unrelated")


def test_consensus_backbone_is_the_mean_of_related_members(tmp_path: Path) -> None:
    """Two members that are base +/- the same drift: their mean is the base. The factoring measures both
    candidates and keeps the smaller family (the medoid here: one member then costs nothing)."""
    from safetensors.torch import load_file, save_file

    from wfactor.backbone import write_consensus
    from wfactor.format.safetensors_io import SafetensorsFile

    base = load_file(str(FAMILY / "base" / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    plus, minus = {}, {}
    for k, v in base.items():
        d = 0.05 * v.std() * torch.randn(v.shape, generator=gen)
        plus[k], minus[k] = v + d, v - d
    for name, sd in (("plus", plus), ("minus", minus)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    srcs = [open_source(str(tmp_path / n)) for n in ("plus", "minus")]
    write_consensus(srcs, tmp_path / "consensus.safetensors")
    with SafetensorsFile(tmp_path / "consensus.safetensors") as f:
        for k, v in base.items():
            torch.testing.assert_close(torch.from_numpy(f.numpy(k)), v, rtol=0, atol=1e-5)
    for s in srcs:
        s.close()
    rep = wfactor.factor(
        [str(tmp_path / "plus"), str(tmp_path / "minus")], base=None, out=tmp_path / "fam", exhaustive=True
    )
    tried = rep.backbone_origin["tried_bytes"]
    assert set(tried) == {"medoid", "consensus"} and tried[rep.backbone_origin["kind"]] == min(tried.values())


def test_unrelated_member_is_stored_whole_and_flagged(lossy_family: Path) -> None:
    man = read_manifest(lossy_family)
    plan = man.member("unrelated").plan
    assert plan["related"] is False
    with wfactor.open_family(lossy_family).open_delta("unrelated") as d:
        assert all(r.base is None and r.codec == "dense" for r in d.records.values())
    assert all(man.member(m).plan["related"] for m in ("full_ft", "top_ft", "lora", "bf16", "vocab_grown"))


@pytest.mark.parametrize("with_base", [False, True])
def test_the_estimated_backbone_choice_matches_the_exhaustive_one(tmp_path: Path, with_base: bool) -> None:
    """Without --base, each candidate's family is estimated from a sample of tensors and only the smaller is
    factored: the same choice and the same files as factoring both (only the manifest's origin differs)."""
    args = member_args() + ([f"base={FAMILY / 'base'}"] if with_base else [])
    est = wfactor.factor(args, base=None, out=tmp_path / "est")
    exh = wfactor.factor(args, base=None, out=tmp_path / "exh", exhaustive=True)
    o, x = est.backbone_origin, exh.backbone_origin
    assert (o["kind"], o.get("member")) == (x["kind"], x.get("member"))
    assert set(o["estimated_bytes"]) == {"medoid", "consensus"} and "tried_bytes" not in o
    for kind, guess in o["estimated_bytes"].items():  # within 5% of the measured family
        assert abs(guess - x["tried_bytes"][kind]) <= 0.05 * x["tried_bytes"][kind], (kind, guess, x)
    files = sorted(p.relative_to(tmp_path / "est") for p in (tmp_path / "est").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "exh") for p in (tmp_path / "exh").rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "wfactor.json":
            assert (tmp_path / "est" / rel).read_bytes() == (tmp_path / "exh" / rel).read_bytes(), rel
