"""Factored runtime (wfactor.torch): attach members to torch modules, shared backbone, mixed batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinylm
import torch
import torch.nn as nn
from conftest import FAMILY

import wfactor
import wfactor.torch as wt
from wfactor.errors import InputError


def config(member: str) -> tinylm.TinyLMConfig:
    return tinylm.TinyLMConfig.from_dict(json.loads((FAMILY / member / "config.json").read_text()))


def build(member: str) -> nn.Module:
    torch.manual_seed(0)
    return tinylm.TinyLM(config(member))


def ids(n: int = 6, max_len: int = 48) -> torch.Tensor:
    return tinylm.encode(tinylm.eval_texts(n), max_len=max_len)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def fam(lossy_family: Path) -> wfactor.Family:
    f = wfactor.open_family(lossy_family)
    yield f
    f.close()


def records(fam: wfactor.Family, member: str) -> dict:
    with fam.open_delta(member) as d:
        return dict(d.records)


def test_lora_uses_factored_linears_over_the_backbone(fam: wfactor.Family) -> None:
    model = wt.attach(build("lora"), fam, "lora").eval()
    bb = fam.backbone("cpu")
    recs = records(fam, "lora")
    factored = {n: m for n, m in model.named_modules() if isinstance(m, wt.FactoredLinear)}
    lowrank = {n[: -len(".weight")] for n, r in recs.items() if r.codec == "lowrank"}
    assert lowrank and set(factored) == lowrank  # q/v/up/down projections of every layer
    for path, layer in factored.items():
        base = bb[recs[path + ".weight"].base]
        assert layer.base_weight.data_ptr() == base.data_ptr()
        assert layer.u.shape[0] == layer.out_features and layer.v.shape[1] == layer.in_features
        assert layer.rank < min(layer.in_features, layer.out_features)
        assert not layer.base_weight.requires_grad
    ref = tinylm.model_from_state_dict(config("lora"), fam.state_dict("lora"))
    x = ids()
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert rel(got, want) <= 1e-5
    # the factored layer's dense weight is the member's tensor
    sd = fam.state_dict("lora")
    for path, layer in factored.items():
        assert rel(layer.materialize(), sd[path + ".weight"]) <= 1e-6


def test_identical_tensors_share_the_backbone(fam: wfactor.Family) -> None:
    model = wt.attach(build("top_ft"), fam, "top_ft")
    bb = fam.backbone("cpu")
    recs = records(fam, "top_ft")
    params = dict(model.named_parameters())
    identical = [n for n, r in recs.items() if r.codec == "identical"]
    changed = [n for n, r in recs.items() if r.codec != "identical"]
    assert identical and changed
    for n in identical:
        assert params[n].data_ptr() == bb[recs[n].base].data_ptr(), n
    for n in changed:  # materialised per member (or factored): not the backbone's storage
        if n in params:
            assert params[n].data_ptr() != bb[recs[n].base].data_ptr(), n
    ref = tinylm.model_from_state_dict(config("top_ft"), fam.state_dict("top_ft"))
    x = ids(3)
    with torch.no_grad():
        assert rel(model(x), ref(x)) <= 1e-5


def test_two_members_share_backbone_tensors(fam: wfactor.Family) -> None:
    a = wt.attach(build("lora"), fam, "lora")
    b = wt.attach(build("top_ft"), fam, "top_ft")
    bb = fam.backbone("cpu")
    name = "layers.0.self_attn.k_proj.weight"  # identical in both members
    pa, pb = dict(a.named_parameters())[name], dict(b.named_parameters())[name]
    assert pa.data_ptr() == pb.data_ptr() == bb[name].data_ptr()
    # lora's factored q_proj and top_ft's plain q_proj of layer 0 also read the same backbone storage
    qa = a.layers[0].self_attn.q_proj
    qb = b.layers[0].self_attn.q_proj
    assert isinstance(qa, wt.FactoredLinear) and not isinstance(qb, wt.FactoredLinear)
    assert qa.base_weight.data_ptr() == qb.weight.data_ptr()


def test_materialised_members_match_state_dict(fam: wfactor.Family) -> None:
    # grown vocabulary: lm_head's lowrank record has a smaller base, so it is materialised
    model = wt.attach(build("vocab_grown"), fam, "vocab_grown")
    assert type(model.lm_head) is nn.Linear
    ref = tinylm.model_from_state_dict(config("vocab_grown"), fam.state_dict("vocab_grown"))
    x = ids(2)
    with torch.no_grad():
        assert rel(model(x), ref(x)) <= 1e-5
    # bf16 member of the fp32 backbone: plain parameters take the member's dtype; factored layers compute on
    # the shared fp32 backbone tensor and return bf16
    model = wt.attach(build("bf16"), fam, "bf16").eval()
    factored = [m for m in model.modules() if isinstance(m, (wt.FactoredLinear, wt.FactoredEmbedding))]
    assert factored and all(m.base_weight.dtype == torch.float32 for m in factored)
    skip = {id(p) for m in factored for p in m.parameters()}  # the backbone tensor, U and V: fp32
    assert {p.dtype for p in model.parameters() if id(p) not in skip} == {torch.bfloat16}
    ref = tinylm.model_from_state_dict(config("bf16"), fam.state_dict("bf16"))
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert got.dtype == torch.bfloat16  # (the reference model holds the bf16 weights in fp32 parameters)
    assert rel(got, want) <= 2e-2  # bf16 activations: the materialised model rounds its weights to bf16


def test_multimodel_mixed_batch_equals_per_member_runs(fam: wfactor.Family) -> None:
    names = ["lora", "top_ft", "full_ft"]
    multi = wt.MultiModel(fam, names, build, device="cpu").eval()
    bb = fam.backbone("cpu")
    k = "layers.0.self_attn.k_proj.weight"  # identical in lora and top_ft: one storage
    assert multi["lora"].layers[0].self_attn.k_proj.weight.data_ptr() == bb[k].data_ptr()
    assert multi["top_ft"].layers[0].self_attn.k_proj.weight.data_ptr() == bb[k].data_ptr()
    x = ids(7)
    rows = ["lora", "top_ft", "full_ft", "lora", "full_ft", "top_ft", "lora"]
    with torch.no_grad():
        alone = {n: tinylm.model_from_state_dict(config(n), fam.state_dict(n))(x) for n in names}
        got = multi(x, rows)
        got_idx = multi(x, torch.tensor([names.index(r) for r in rows]))
        assert torch.equal(got, got_idx)
        for i, r in enumerate(rows):
            assert rel(got[i], alone[r][i]) <= 1e-5, (i, r)
            # same module run on that member's rows alone
            sel = [j for j, rr in enumerate(rows) if rr == r]
            torch.testing.assert_close(got[i], multi[r](x[sel])[sel.index(i)], rtol=1e-6, atol=1e-6)
        assert torch.equal(multi(x[:2], "top_ft"), multi["top_ft"](x[:2]))
    with pytest.raises(InputError, match="nope"):
        multi(x, ["nope"] * 7)
    with pytest.raises(InputError, match="rows"):
        multi(x, rows[:3])


def test_mismatched_module_is_an_input_error(fam: wfactor.Family) -> None:
    with pytest.raises(InputError, match=r"'0\.weight'"):  # missing from the member
        wt.attach(nn.Sequential(nn.Linear(64, 64)), fam, "lora")
    cfg = config("lora")
    cfg.n_layers -= 1
    with pytest.raises(InputError, match=rf"'layers\.{cfg.n_layers}\."):  # a member tensor the module lacks
        wt.attach(tinylm.TinyLM(cfg), fam, "lora")
    cfg = config("lora")
    cfg.d_ff += 8
    with pytest.raises(InputError, match=r"'layers\.0\.mlp\.(up|down)_proj\.weight' is \[\d+, \d+\] in the member"):
        wt.attach(tinylm.TinyLM(cfg), fam, "lora")
    # one line, the stable code
    try:
        wt.attach(nn.Linear(3, 3), fam, "lora")
    except InputError as exc:
        assert "\n" not in str(exc) and exc.code == "input"
    else:  # pragma: no cover
        pytest.fail("no error")


def test_factored_layers_equal_dense() -> None:
    g = torch.Generator().manual_seed(0)
    w, u, v, b = (torch.randn(s, generator=g) for s in ((12, 8), (12, 3), (3, 8), (12,)))
    x = torch.randn(5, 8, generator=g)
    lin = wt.FactoredLinear(w, u, v, b)
    assert lin.base_weight.data_ptr() == w.data_ptr()
    torch.testing.assert_close(lin(x), x @ (w + u @ v).T + b)
    emb = wt.FactoredEmbedding(w, u, v)
    i = torch.tensor([[0, 11, 3], [5, 5, 2]])
    torch.testing.assert_close(emb(i), torch.nn.functional.embedding(i, w + u @ v))
    with pytest.raises(ValueError):
        wt.FactoredLinear(w, v, u)


def test_quantised_deltas_stay_factored(fam: wfactor.Family) -> None:
    """full_ft's deltas are k-bit codes: its layers keep int8 codes + row scales over the shared backbone
    weight, no float copy of the weight, and compute the same outputs as the materialised member."""
    model = wt.attach(build("full_ft"), fam, "full_ft").eval()
    bb = fam.backbone("cpu")
    recs = records(fam, "full_ft")
    sd = fam.state_dict("full_ft")
    quantised = {
        n[: -len(".weight")]
        for n, r in recs.items()
        if n.endswith(".weight")
        and [t.codec for t in r.terms] == ["quant"]
        and r.residual is None
        and r.same_as is None
        and tuple(bb[r.base].shape) == tuple(r.shape)
    }
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (wt.FactoredLinear, wt.FactoredEmbedding))}
    linear_q = {n for n in quantised if isinstance(model.get_submodule(n), (wt.FactoredLinear, wt.FactoredEmbedding))}
    assert linear_q and linear_q <= set(layers)
    backbone_ptrs = {t.data_ptr() for t in bb.values()}
    for path in linear_q:
        layer = layers[path]
        assert layer.codes is not None and layer.codes.dtype == torch.int8 and layer.u is None
        assert layer.base_weight.data_ptr() in backbone_ptrs
        assert rel(layer.materialize(), sd[path + ".weight"]) <= 1e-6
        # nothing float of the weight's size is held by the layer except the shared backbone tensor
        own = [t for t in list(layer.parameters()) + list(layer.buffers()) if t.data_ptr() not in backbone_ptrs]
        assert all(t.dtype == torch.int8 or t.numel() < layer.base_weight.numel() for t in own)
    ref = tinylm.model_from_state_dict(config("full_ft"), sd)
    x = ids(4)
    with torch.no_grad():
        assert rel(model(x), ref(x)) <= 1e-5


def test_quant_layer_checks_its_codes() -> None:
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="do not quantise"):
        wt.FactoredLinear(w, None, None, None, torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="give U and V"):
        wt.FactoredLinear(w, None, None)
    codes = torch.tensor([[1, -2, 3], [0, 4, -5], [7, 0, 1], [-1, -1, 2]], dtype=torch.int8)
    scales = torch.tensor([0.5, 0.25, 0.125, 2.0])
    lin = wt.FactoredLinear(w, None, None, None, codes, scales)
    x = torch.randn(2, 3)
    assert torch.allclose(lin(x), x @ (w + codes.float() * scales[:, None]).T, atol=1e-6)
    emb = wt.FactoredEmbedding(w, None, None, None, codes, scales)
    ids_ = torch.tensor([[3, 0], [1, 1]])
    assert torch.allclose(emb(ids_), (w + codes.float() * scales[:, None])[ids_], atol=1e-6)


@pytest.mark.parametrize("bits", range(2, 8))
def test_packed_codes_round_trip_on_both_paths(bits: int) -> None:
    """k-bit codes packed in bit planes unpack to the same codes, whole or by rows, for row lengths that are
    not multiples of 8 and empty tensors; the numpy (CPU) and torch (device) paths give the same bytes."""
    from wfactor.torch.layers import _pack_torch, _unpack_torch, pack_codes, unpack_codes

    q = (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(bits)
    for shape in [(5, 13), (3, 8), (4, 1), (0, 5), (3, 0), (64, 1000)]:  # [rows, cols], as layers hold them
        codes = torch.randint(-q, q + 1, shape, generator=g, dtype=torch.int8)
        planes = pack_codes(codes, bits)
        assert planes.dtype == torch.uint8 and tuple(planes.shape) == (bits, *shape[:-1], (shape[-1] + 7) // 8)
        assert torch.equal(planes, _pack_torch(codes, bits, q))
        assert torch.equal(unpack_codes(planes, bits, shape[-1]), codes)
        assert torch.equal(_unpack_torch(planes, bits, shape[-1], q), codes)
        if len(shape) == 2 and shape[0] > 2:
            rows = torch.tensor([[2, 0], [2, 1]])
            assert torch.equal(unpack_codes(planes[:, rows], bits, shape[-1]), codes[rows])
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.full((2, 3), q + 1, dtype=torch.int8), bits)


def test_packed_layers_compute_what_int8_layers_compute(fam: wfactor.Family) -> None:
    """attach keeps k-bit codes packed (b/8 byte per weight, less than the int8 codes) and its outputs are
    bit-identical to the int8 layers'; packed=False keeps int8 codes."""
    packed = wt.attach(build("full_ft"), fam, "full_ft").eval()
    plain = wt.attach(build("full_ft"), fam, "full_ft", packed=False).eval()
    quant_layers = [
        m for m in packed.modules() if isinstance(m, (wt.FactoredLinear, wt.FactoredEmbedding)) and m.quantised
    ]
    assert quant_layers
    for layer in quant_layers:
        assert layer.bits is not None and layer.bits < 8 and layer.code_planes is not None
        rows, cols = layer.base_weight.shape
        assert layer.code_planes.numel() == layer.bits * rows * ((cols + 7) // 8) < rows * cols
    for layer in (m for m in plain.modules() if isinstance(m, (wt.FactoredLinear, wt.FactoredEmbedding))):
        assert layer.code_planes is None and (layer.codes_int8 is not None) == layer.quantised
    x = ids(4)
    with torch.no_grad():
        assert torch.equal(packed(x), plain(x))


def test_delta_parts_decode_the_same_on_any_number_of_threads(
    lossy_family: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta's parts decode on a few threads; the result does not depend on how many."""
    import wfactor.format.parts as parts_mod

    results = []
    monkeypatch.setattr(parts_mod, "PARALLEL_MIN_BYTES", 0)  # the fixture's deltas are small: threads anyway
    for threads in (1, 4):
        monkeypatch.setattr(parts_mod, "DECODE_THREADS", threads)
        with wfactor.open_family(lossy_family) as f:
            results.append(f.state_dict("full_ft"))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
