"""`factor --fast-load`: k-bit codes stored as bit planes (spec/FORMAT.md 4.3, a version-3 family).

The family rebuilds exactly the tensors of the default (zstd) encoding, is written deterministically, only
its quantised deltas and its manifest become version 3, and `wfactor.torch.attach` keeps the stored planes
as they are (no unpacking at load) with outputs bit-identical to the default family's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import tinylm
import torch
from conftest import FAMILY, MEMBERS, invoke, member_args

import wfactor
import wfactor.torch as wt
from wfactor.format.safetensors_io import SafetensorsFile
from wfactor.tensors import bitwise_equal


@pytest.fixture(scope="module")
def fast_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fast") / "fam"
    wfactor.factor(member_args(), base=str(FAMILY / "base"), out=out, fast_load=True)
    return out


def _encodings(family: Path, member: str) -> set[str]:
    with wfactor.open_family(family) as f, f.open_delta(member) as d:
        return {s.encoding for r in d.records.values() for s in r.part_specs()}


def test_same_tensors_as_the_default_encoding(fast_family: Path, lossy_family: Path) -> None:
    with wfactor.open_family(fast_family) as fast, wfactor.open_family(lossy_family) as slow:
        assert fast.manifest.format_version == 3 and slow.manifest.format_version == 1
        for m in MEMBERS:
            a, b = fast.state_dict(m), slow.state_dict(m)
            assert list(a) == list(b)
            assert all(bitwise_equal(a[k], b[k]) for k in a), m
        assert fast.verify().ok
    quantised = [m for m in MEMBERS if "bitplanes" in _encodings(fast_family, m)]
    assert set(quantised) >= {"full_ft", "top_ft", "bf16", "vocab_grown"}
    for m in MEMBERS:
        meta = SafetensorsFile(fast_family / "deltas" / f"{m}.safetensors").metadata
        assert meta["wfactor.format_version"] == ("3" if m in quantised else "1"), m  # the lowest that describes it
    with wfactor.open_family(fast_family) as f:
        for m in quantised:
            with f.open_delta(m) as d:
                codes = [t.parts["codes"] for r in d.records.values() for t in r.terms if t.codec == "quant"]
            assert codes and all(s.encoding == "bitplanes" for s in codes), m  # every quant term's codes


def test_written_deterministically_and_opened_by_the_cli(fast_family: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    code, _out, err = invoke(
        "factor", *member_args(), "--base", str(FAMILY / "base"), "-o", str(again), "--fast-load", "-q"
    )
    assert code == 0, err

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
        }

    assert digests(again) == digests(fast_family)
    code, out, err = invoke("inspect", str(fast_family), "--json")
    assert code == 0 and json.loads(out)["format_version"] == 3, err
    code, _out, err = invoke("verify", str(fast_family))
    assert code == 0, err


def test_attach_keeps_the_stored_planes(fast_family: Path, lossy_family: Path) -> None:
    cfg = tinylm.TinyLMConfig.from_dict(json.loads((FAMILY / "full_ft" / "config.json").read_text()))
    ids = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return tinylm.TinyLM(cfg).eval()

    with wfactor.open_family(fast_family) as fast, wfactor.open_family(lossy_family) as slow:
        a = wt.attach(build(), fast, "full_ft")
        b = wt.attach(build(), slow, "full_ft")
        c = wt.attach(build(), fast, "full_ft", packed=False)
        layers = [m for m in a.modules() if isinstance(m, (wt.FactoredLinear, wt.FactoredEmbedding)) and m.quantised]
        assert layers and all(m.code_planes is not None and m.code_planes.dtype == torch.uint8 for m in layers)
        assert all(
            m.codes_int8 is not None
            for m in c.modules()
            if isinstance(m, (wt.FactoredLinear, wt.FactoredEmbedding)) and m.quantised
        )
        with torch.no_grad():
            assert torch.equal(a(ids), b(ids)) and torch.equal(a(ids), c(ids))


def test_attached_planes_do_not_change_when_the_file_is_rewritten(fast_family: Path, tmp_path: Path) -> None:
    """What a server holds is its own: a --fast-load delta rewritten in place (truncated, then other bytes)
    after attach changes no attached module's planes, and no forward faults; a write into one module's planes
    reaches neither the file nor another module."""
    import shutil

    cfg = tinylm.TinyLMConfig.from_dict(json.loads((FAMILY / "full_ft" / "config.json").read_text()))
    copy = tmp_path / "fam"
    shutil.copytree(fast_family, copy)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with wfactor.open_family(copy) as fam:
        delta = copy / fam.member("full_ft").delta.path
        original = delta.read_bytes()
        torch.manual_seed(0)
        a = wt.attach(tinylm.TinyLM(cfg).eval(), fam, "full_ft")
        torch.manual_seed(0)
        b = wt.attach(tinylm.TinyLM(cfg).eval(), fam, "full_ft")
        la = [m for m in a.modules() if isinstance(m, wt.FactoredLinear) and m.code_planes is not None]
        lb = [m for m in b.modules() if isinstance(m, wt.FactoredLinear) and m.code_planes is not None]
        assert la and len(la) == len(lb)
        held = [m.code_planes.clone() for m in la]
        with torch.no_grad():
            want = a(ids)
        with open(delta, "r+b") as fh:  # in place, as `cp` over the file would: truncate, then other bytes
            fh.truncate(0)
            fh.write(bytes(len(original) // 2))
        assert all(torch.equal(m.code_planes, h) for m, h in zip(la, held))
        with torch.no_grad():
            assert torch.equal(a(ids), want)
        keep = lb[0].code_planes.clone()
        la[0].code_planes.zero_()
        assert torch.equal(lb[0].code_planes, keep)
        assert delta.read_bytes() == bytes(len(original) // 2)
