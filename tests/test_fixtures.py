"""Checks on the committed fixture family (fixtures/family, built by fixtures/make_family.py)
and on the tiny LM helpers in fixtures/tinylm.py."""

import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))

import tinylm  # noqa: E402
from tinylm import (  # noqa: E402
    PAD_ID,
    TinyLM,
    TinyLMConfig,
    encode,
    eval_texts,
    load_model,
    load_state_dict,
    model_from_state_dict,
    output_cosines,
    save_model,
    worst_cosine,
)

FAMILY = FIXTURES / "family"
MEMBERS = ["base", "full_ft", "top_ft", "lora", "bf16", "vocab_grown", "unrelated"]
RELATED = ["full_ft", "top_ft", "lora", "bf16", "vocab_grown"]
N_LAYERS = 4
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")


def _identical(a: dict, b: dict) -> set:
    return {
        k for k in b if k in a and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
    }


@pytest.fixture(scope="module")
def base_sd():
    return load_state_dict(FAMILY / "base")


@pytest.fixture(scope="module")
def base_model():
    return load_model(FAMILY / "base")


@pytest.fixture(scope="module")
def cosines(base_model):
    texts = eval_texts()
    return {m: worst_cosine(base_model, load_model(FAMILY / m), texts) for m in MEMBERS}


# --------------------------------------------------------------------------
# the family on disk
# --------------------------------------------------------------------------
@pytest.mark.parametrize("member", MEMBERS)
def test_member_files(member):
    d = FAMILY / member
    for f in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert (d / f).is_file(), d / f
    assert json.loads((d / "tokenizer_config.json").read_text()) == {"kind": "bytes"}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == (268 if member == "vocab_grown" else 260)
    model = load_model(d)
    assert isinstance(model, TinyLM)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_family_is_small():
    total = sum(f.stat().st_size for f in FAMILY.rglob("*") if f.is_file())
    assert total < 8_000_000


def test_hf_style_names(base_sd):
    expected = {"embed_tokens.weight", "embed_positions.weight", "norm.weight", "norm.bias", "lm_head.weight"}
    for i in range(N_LAYERS):
        p = f"layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            expected |= {p + ln + ".weight", p + ln + ".bias"}
        for lin in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            expected |= {p + lin + ".weight", p + lin + ".bias"}
    assert set(base_sd) == expected
    assert all(t.dtype == torch.float32 for t in base_sd.values())


def test_top_ft_only_top_changed(base_sd):
    sd = load_state_dict(FAMILY / "top_ft")
    top = {
        k for k in base_sd if k.startswith(f"layers.{N_LAYERS - 1}.") or k.startswith("norm.") or k == "lm_head.weight"
    }
    assert _identical(sd, base_sd) == set(base_sd) - top
    assert not (top & _identical(sd, base_sd))  # every trained tensor actually moved


def test_lora_only_targets_changed(base_sd):
    sd = load_state_dict(FAMILY / "lora")
    targets = {f"layers.{i}.{t}.weight" for i in range(N_LAYERS) for t in LORA_TARGETS}
    assert _identical(sd, base_sd) == set(base_sd) - targets
    assert all(sd[k].dtype == torch.float32 for k in sd)


@pytest.mark.parametrize("target", LORA_TARGETS)
def test_lora_delta_is_low_rank(base_sd, target):
    sd = load_state_dict(FAMILY / "lora")
    for i in range(N_LAYERS):
        k = f"layers.{i}.{target}.weight"
        delta = sd[k].double() - base_sd[k].double()
        rank = int(torch.linalg.matrix_rank(delta, rtol=1e-4))
        assert 1 <= rank <= 4, (k, rank)


def test_full_ft_drifts_everywhere_at_high_rank(base_sd):
    sd = load_state_dict(FAMILY / "full_ft")
    assert not _identical(sd, base_sd)
    for i in range(N_LAYERS):
        k = f"layers.{i}.self_attn.q_proj.weight"
        delta = sd[k].double() - base_sd[k].double()
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) > 32
        assert 0 < float(delta.norm() / base_sd[k].double().norm()) < 0.5


def test_bf16_stored_in_bfloat16():
    sd = load_state_dict(FAMILY / "bf16")
    assert sd and all(t.dtype == torch.bfloat16 for t in sd.values())


def test_vocab_grown(base_sd):
    sd = load_state_dict(FAMILY / "vocab_grown")
    assert sd["embed_tokens.weight"].shape == (268, 64)
    assert sd["lm_head.weight"].shape == (268, 64)
    assert base_sd["embed_tokens.weight"].shape == (260, 64)
    assert load_model(FAMILY / "vocab_grown").config.vocab_size == 268
    for k in base_sd:
        if k not in ("embed_tokens.weight", "lm_head.weight"):
            assert sd[k].shape == base_sd[k].shape


def test_unrelated_shares_nothing(base_sd):
    sd = load_state_dict(FAMILY / "unrelated")
    assert not _identical(sd, base_sd)
    k = "layers.0.self_attn.q_proj.weight"
    assert float((sd[k] - base_sd[k]).norm() / base_sd[k].norm()) > 1.0


def test_worst_cosines(cosines):
    assert cosines["base"] == pytest.approx(1.0, abs=1e-9)
    for m in RELATED:
        # related: close to the base, but not identical
        assert 0.99 < cosines[m] < 1 - 1e-5, (m, cosines[m])
    # the unrelated model is much further away than any related one
    worst_related_gap = max(1 - cosines[m] for m in RELATED)
    assert cosines["unrelated"] < 0.99
    assert 1 - cosines["unrelated"] > 4 * worst_related_gap, cosines


# --------------------------------------------------------------------------
# tinylm helpers
# --------------------------------------------------------------------------
def test_eval_texts_fixed_and_nonempty():
    texts = eval_texts()
    assert len(texts) == 32
    assert all(isinstance(t, str) and t.strip() == t and t for t in texts)
    assert len(set(texts)) == len(texts)
    assert texts == eval_texts()


def test_encode_bytes_pad_truncate():
    ids, mask = encode(["ab", "é" * 100], max_len=8, return_mask=True)
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    assert ids[0].tolist() == [97, 98] + [PAD_ID] * 6
    assert mask[0].tolist() == [True] * 2 + [False] * 6
    assert ids[1].tolist() == list("é".encode() * 4)
    assert bool(mask[1].all())
    assert torch.equal(encode("ab", max_len=8), ids[:1])
    assert torch.equal(tinylm.pad_mask(ids), mask)


def test_model_is_causal(base_model):
    ids = encode(["hello world, this is a test"], max_len=32)
    other = ids.clone()
    other[0, 10:] = 65
    with torch.no_grad():
        a, b = base_model(ids), base_model(other)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-5)
    assert not torch.allclose(a[0, 10:], b[0, 10:])
    h = base_model.hidden(ids)
    assert h.shape == (1, 32, 64)
    assert torch.allclose(base_model.lm_head(h), a, atol=1e-5)


def test_save_load_roundtrip(tmp_path, base_model):
    save_model(base_model, base_model.config, tmp_path / "fp32")
    again = load_model(tmp_path / "fp32")
    for (k, v), (k2, v2) in zip(base_model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)

    save_model(base_model, base_model.config, tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_state_dict(tmp_path / "bf16").values())
    low = load_model(tmp_path / "bf16")
    assert all(p.dtype == torch.float32 for p in low.parameters())
    assert 0.999 < worst_cosine(base_model, low) < 1.0

    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert TinyLMConfig.from_dict(cfg) == base_model.config
    m = model_from_state_dict(cfg, load_state_dict(tmp_path / "fp32"))
    assert output_cosines(base_model, m, ["abc", "def"]) == pytest.approx([1.0, 1.0], abs=1e-12)


def test_cosines_across_vocab_sizes(base_model):
    grown = load_model(FAMILY / "vocab_grown")
    texts = eval_texts()[:4]
    cos = output_cosines(base_model, grown, texts)
    assert len(cos) == 4 and all(0.9 < c < 1 for c in cos)
    assert cos == pytest.approx(output_cosines(grown, base_model, texts), abs=1e-12)
