"""PEFT LoRA adapters both ways (wfactor/peft.py): export a low-rank member and load it with peft; read an
adapter made by peft as a member (base + adapter) and compare with peft's own merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinylm
import torch
from conftest import FAMILY, invoke, one_line_error

import wfactor
from wfactor.errors import InputError
from wfactor.inputs import open_source

peft = pytest.importorskip("peft")  # in the `test` extra
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft's notes about non-transformers models


def ids() -> torch.Tensor:
    return tinylm.encode(tinylm.eval_texts(8), max_len=64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def member_model(family: Path, name: str) -> tinylm.TinyLM:
    cfg = json.loads((FAMILY / name / "config.json").read_text())
    with wfactor.open_family(family) as fam:
        return tinylm.model_from_state_dict(cfg, fam.state_dict(name))


def with_adapter(adapter: Path) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(tinylm.load_model(FAMILY / "base"), str(adapter)).eval()


def export(family: Path, name: str, out: Path, *extra: str) -> dict:
    code, stdout, stderr = invoke("export-peft", str(family), name, "-o", str(out), "--json", *extra)
    assert code == 0, stderr
    return json.loads(stdout)


@torch.no_grad()
def test_exported_lora_member_reproduces_its_outputs_under_peft(lossy_family: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora-peft"
    rep = export(lossy_family, "lora", out)
    # the fixture's rank-4 LoRA on q/v/up/down of 4 layers: 16 modules, each from the member's own factors
    assert rep["exact"] == 16 and rep["approximated"] == 0 and rep["dropped"] == []
    assert rep["r"] == rep["lora_alpha"] and 1 <= rep["r"] <= 4  # scaling 1; smaller ranks zero-padded
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 16
    assert all(m.endswith(("q_proj", "v_proj", "up_proj", "down_proj")) for m in config["target_modules"])
    x = ids()
    got = with_adapter(out)(x)
    want = member_model(lossy_family, "lora")(x)
    assert cosine(got, want) > 0.99999
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    original = tinylm.load_model(FAMILY / "lora")(x)
    base = tinylm.load_model(FAMILY / "base")(x)
    assert cosine(got, original) > 0.9999 > cosine(base, original)
    export(lossy_family, "lora", tmp_path / "again")  # deterministic: byte-identical files
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_full_rank_member_is_refused_naming_tensors(lossy_family: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft-peft"
    code, _, stderr = invoke("export-peft", str(lossy_family), "full_ft", "-o", str(out))
    assert code == 2
    line = one_line_error(stderr, "input")
    assert "'full_ft'" in line and "69 tensor(s)" in line and "embed_tokens.weight" in line and "--max-rank" in line
    assert not out.exists()


@torch.no_grad()
def test_max_rank_approximates_and_reports_errors(lossy_family: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft-peft"
    rep = export(lossy_family, "full_ft", out, "--max-rank", "8")
    mods = {m["tensor"]: m for m in rep["modules"]}
    assert rep["exact"] == 0 and rep["approximated"] == len(mods) > 16
    assert all(1 <= m["rank"] <= 8 and 0 < m["rel_error"] < 1 for m in mods.values())
    assert rep["worst_rel_error"] == max(m["rel_error"] for m in mods.values())
    assert mods["embed_tokens.weight"]["kind"] == "embedding" and mods["lm_head.weight"]["kind"] == "linear"
    dropped = {d["tensor"]: d for d in rep["dropped"]}
    assert "layers.0.input_layernorm.weight" in dropped and all(d["tensor"] not in mods for d in rep["dropped"])
    assert all(d["rel_drift"] > 0 for d in rep["dropped"])
    # the reported error is the real one: recompute it from the written factors
    from safetensors.torch import load_file

    ad = load_file(str(out / "adapter_model.safetensors"))
    name = "layers.2.mlp.up_proj"
    approx = ad[f"base_model.model.{name}.lora_B.weight"] @ ad[f"base_model.model.{name}.lora_A.weight"]
    with wfactor.open_family(lossy_family) as fam:
        delta = fam.state_dict("full_ft")[f"{name}.weight"] - fam.backbone()[f"{name}.weight"]
    err = float((approx - delta).norm() / delta.norm())
    assert err == pytest.approx(mods[f"{name}.weight"]["rel_error"], rel=1e-4)
    # peft loads it, embedding LoRA included, and it moves the base towards the member
    assert "base_model.model.embed_tokens.lora_embedding_A" in ad
    x = ids()
    original = tinylm.load_model(FAMILY / "full_ft")(x)
    base = tinylm.load_model(FAMILY / "base")(x)
    assert cosine(with_adapter(out)(x), original) > cosine(base, original)


def make_adapter(path: Path, seed: int, **config: object) -> torch.nn.Module:
    """A LoRA adapter on the fixture base, made and saved by peft itself, with deterministic random weights;
    returns peft's merged model."""
    base = tinylm.load_model(FAMILY / "base")
    cfg = peft.LoraConfig(**config)  # type: ignore[arg-type]
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in n and "weight" in n else 0.0))
    model.save_pretrained(str(path))
    return model.merge_and_unload()


ADAPTERS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
    "patterns": {
        "r": 4,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "o_proj", "up_proj", "lm_head", "embed_tokens"],
        "rank_pattern": {"up_proj": 2, "layers.0.self_attn.q_proj": 6},
        "alpha_pattern": {"o_proj": 3},
        "modules_to_save": ["norm"],
    },
    "rslora": {"r": 8, "lora_alpha": 4, "target_modules": ["k_proj", "down_proj"], "use_rslora": True},
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapter_source_matches_peft_merge(tmp_path: Path, kind: str) -> None:
    merged = make_adapter(tmp_path / kind, seed=len(kind), **ADAPTERS[kind]).state_dict()
    with open_source(f"m={tmp_path / kind}", base=str(FAMILY / "base")) as src:
        assert src.keys() == sorted(merged)
        changed = 0
        for k in src.keys():
            assert src.info(k).shape == tuple(merged[k].shape)
            torch.testing.assert_close(src.tensor(k), merged[k], atol=1e-6, rtol=1e-6)
            assert src.raw_bytes(k) == src.tensor(k).numpy().tobytes()
            changed += not torch.equal(src.tensor(k), tinylm.load_state_dict(FAMILY / "base")[k])
        assert changed >= 8


def test_factor_accepts_adapter_member(tmp_path: Path) -> None:
    merged = make_adapter(tmp_path / "ad", seed=3, **ADAPTERS["rslora"]).state_dict()
    fam = tmp_path / "fam"
    args = ("factor", f"chat={tmp_path / 'ad'}", "--base", str(FAMILY / "base"), "-o", str(fam), "--lossless", "-q")
    code, _, stderr = invoke(*args)
    assert code == 0, stderr
    with wfactor.open_family(fam) as f, open_source(str(tmp_path / "ad"), base=str(FAMILY / "base")) as src:
        assert f.members == ["chat"]
        sd = f.state_dict("chat")
        assert list(sd) == src.keys() == sorted(merged)
        for k, want in merged.items():
            assert torch.equal(sd[k], src.tensor(k)), k  # lossless: base + adapter, bit for bit
            torch.testing.assert_close(sd[k], want, atol=1e-6, rtol=1e-6)  # = peft's merge_and_unload
        assert sum(not torch.equal(sd[k], f.backbone()[k]) for k in sd) == 8  # k_proj, down_proj x 4 layers


def test_analyze_accepts_adapter_member(tmp_path: Path) -> None:
    """`analyze` takes a PEFT adapter directory as a member (base + adapter): the adapted tensors drift with
    rank99 at most the adapter's r, every other tensor is identical, and the member is related."""
    make_adapter(tmp_path / "ad", seed=3, **ADAPTERS["plain"])
    code, out, stderr = invoke("analyze", f"chat={tmp_path / 'ad'}", "--base", str(FAMILY / "base"), "--json", "-")
    assert code == 0, stderr
    model = json.loads(out)["models"][0]
    assert model["name"] == "chat" and model["related"] is True
    targets = ("q_proj", "v_proj", "up_proj", "down_proj")
    adapted = [t for t in model["tensors"] if t["name"].endswith(".weight") and any(m in t["name"] for m in targets)]
    assert len(adapted) == 16
    assert all(not t["identical"] and 1 <= t["rank99"] <= 4 for t in adapted)
    others = [t for t in model["tensors"] if t not in adapted]
    assert others and all(t["identical"] for t in others)


def test_adapter_refusals(tmp_path: Path) -> None:
    ad = tmp_path / "ad"
    make_adapter(ad, seed=1, **ADAPTERS["plain"])
    code, _, stderr = invoke("factor", str(ad), "-o", str(tmp_path / "f"))
    assert code == 2 and "pass --base" in one_line_error(stderr, "input")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    for patch, words in (({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "only LoRA")):
        (ad / "adapter_config.json").write_text(json.dumps(cfg | patch))
        with pytest.raises(InputError, match=words):
            open_source(str(ad), base=str(FAMILY / "base"))
    (ad / "adapter_config.json").write_text(json.dumps(cfg | {"r": 3}))
    with pytest.raises(InputError, match="rank 4"):
        open_source(str(ad), base=str(FAMILY / "base"))
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({"other.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="does not have"):  # the wrong base: no such modules
        open_source(str(ad), base=str(tmp_path / "other.safetensors")).close()
