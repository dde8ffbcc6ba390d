"""Towers: one backbone shared by models that hold it under other names (wfactor/align.py).

The families are tiny real transformers models built from configs and trained for a few Adam steps on CPU
(fixtures/towers.py): a Llama base with a chat fine-tune, a reranker (LlamaForSequenceClassification), a
LLaVA whose language model starts from the base; a T5 base with an SD3-style pipeline holding a T5 encoder
fine-tune as ``text_encoder_3/`` and a BLIP-2 holding the base as its language model; a two-base backbone
(Llama text + CLIP vision) with members using one tower or both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import towers
from conftest import ROOT, invoke
from safetensors.torch import load_file, save_file

import wfactor
from wfactor.align import BackboneIndex, Rule, align, parse_map
from wfactor.analyze import analyze
from wfactor.errors import MapError
from wfactor.inputs import open_source
from wfactor.tensors import bitwise_equal

FAMILY_BASE = ROOT / "fixtures" / "family" / "base"
LLAMA_MEMBERS = ["chat", "reranker", "reranker_frozen", "vlm", "vlm_frozen"]
LLAVA_RENAME = towers.LLAVA_RENAME  # LLaVA's checkpoint names -> its module names in transformers 5


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return towers.make_llama_family(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def t5(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return towers.make_t5_family(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return towers.make_two_base_family(tmp_path_factory.mktemp("two"))


def _args(paths: dict[str, Path], names: list[str]) -> list[str]:
    return [f"{n}={paths[n]}" for n in names]


@pytest.fixture(scope="session")
def llama_family(llama: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("llama-fam") / "fam"
    rep = wfactor.factor(_args(llama, LLAMA_MEMBERS), base=str(llama["base"]), out=out)
    return out, rep


def _member(rep: Any, name: str) -> Any:
    return next(m for m in rep.members if m.name == name)


def _accepted(rep_member: Any) -> list[tuple[str, str]]:
    return [(r["from"], r["to"]) for r in rep_member.alignment["rules"] if r["accepted"]]


def _payload(fam: Path, member: str, prefix: str = "") -> int:
    """Stored part bytes of the member's records whose names start with ``prefix``."""
    with wfactor.open_family(fam) as f, f.open_delta(member) as d:
        return sum(
            int(d.file.tensors[s.key].nbytes)
            for r in d.records.values()
            if r.name.startswith(prefix)
            for s in r.part_specs()
        )


# -- the Llama family -------------------------------------------------------------------------------------
def test_llama_towers_align_without_map(llama_family: tuple[Path, Any]) -> None:
    _fam, rep = llama_family
    for name in LLAMA_MEMBERS:
        assert _member(rep, name).related, name
    assert _accepted(_member(rep, "chat")) == [("", "")]
    assert _accepted(_member(rep, "reranker")) == [("", "")]
    rr = _member(rep, "reranker").alignment
    assert rr["member_only"] == ["score.weight"]
    for name in ("vlm", "vlm_frozen"):
        al = _member(rep, name).alignment
        assert _accepted(_member(rep, name)) == [("language_model.", "")]
        only = al["member_only"]
        assert only and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in only), only
        assert al["aligned_tensors"] == 21  # 20 of model.* and lm_head
    # the vision tower (CLIP) was tried against the Llama names it shares, and refused or never proposed
    man = json.loads((_fam / "wfactor.json").read_text())
    entry = next(m for m in man["members"] if m["name"] == "vlm")
    assert entry["plan"]["alignment"]["rules"][0]["from"] == "language_model."
    chat_entry = next(m for m in man["members"] if m["name"] == "chat")
    assert "alignment" not in chat_entry["plan"]  # same names: recorded as before towers


def test_identical_towers_cost_no_payload(llama_family: tuple[Path, Any]) -> None:
    fam, rep = llama_family
    assert _payload(fam, "reranker_frozen", "model.") == 0
    assert _payload(fam, "vlm_frozen", "language_model.") == 0
    with wfactor.open_family(fam) as f, f.open_delta("vlm_frozen") as d:
        for r in d.records.values():
            if r.name.startswith("language_model."):
                assert r.codec == "identical" and r.base == r.name[len("language_model.") :], r.name


def _renamed_copy(src_dir: Path, mapping: dict[str, str], out: Path) -> Path:
    """The member with every aligned tensor under its backbone tensor's name (what name-only matching needs)."""
    sd = load_file(str(src_dir / "model.safetensors"))
    out.mkdir(parents=True)
    save_file({mapping.get(k, k): v for k, v in sd.items()}, str(out / "model.safetensors"))
    return out


def test_delta_costs_about_what_the_same_tensors_cost_under_the_base_names(
    llama: dict[str, Path], llama_family: tuple[Path, Any], tmp_path: Path
) -> None:
    fam, rep = llama_family
    for name in ("vlm", "vlm_frozen"):
        with wfactor.open_family(fam) as f, f.open_delta(name) as d:
            mapping = {r.name: r.base for r in d.records.values() if r.base is not None}
        renamed = _renamed_copy(llama[name], mapping, tmp_path / f"{name}-renamed")
        ref = wfactor.factor([f"{name}={renamed}"], base=str(llama["base"]), out=tmp_path / f"{name}-fam", infer=False)
        ours, theirs = _member(rep, name).delta_bytes, ref.members[0].delta_bytes
        assert ours <= 1.1 * theirs, (name, ours, theirs)


_rebuilt_cosine = towers.rebuilt_cosine


def test_llama_members_keep_their_outputs(llama: dict[str, Path], llama_family: tuple[Path, Any]) -> None:
    fam, _rep = llama_family
    for name in LLAMA_MEMBERS:
        assert _rebuilt_cosine(fam, name, llama[name]) >= 0.999, name


def test_llama_lossless_is_bit_exact(llama: dict[str, Path], tmp_path: Path) -> None:
    fam = tmp_path / "fam"
    wfactor.factor(_args(llama, LLAMA_MEMBERS), base=str(llama["base"]), out=fam, budget=wfactor.Budget(lossless=True))
    with wfactor.open_family(fam) as f:
        report = f.verify({n: str(llama[n]) for n in LLAMA_MEMBERS})
        assert report.ok, report.problems
        assert report.compared == sum(len(load_file(str(llama[n] / "model.safetensors"))) for n in LLAMA_MEMBERS)
        for name in ("vlm", "reranker"):
            sd = f.state_dict(name)
            orig = load_file(str(llama[name] / "model.safetensors"))
            assert sorted(sd) == sorted(orig)
            assert all(bitwise_equal(sd[k], orig[k]) for k in orig)


def test_state_dicts_share_backbone_storage_without_a_backbone_call(llama_family: tuple[Path, Any]) -> None:
    fam, _rep = llama_family
    with wfactor.open_family(fam) as f:
        rr = f.state_dict("reranker_frozen")
        vlm = f.state_dict("vlm_frozen")
        shared = [k for k in rr if k.startswith("model.")]
        assert len(shared) == 20
        for k in shared:
            assert rr[k].data_ptr() == vlm["language_model." + k].data_ptr(), k
        # streaming on request: a private tensor, nothing resident is shared
    with wfactor.open_family(fam) as f:
        a = f.state_dict("reranker_frozen", resident=False)
        b = f.state_dict("reranker_frozen", resident=False)
        assert a["model.norm.weight"].data_ptr() != b["model.norm.weight"].data_ptr()
        assert torch.equal(a["model.norm.weight"], rr["model.norm.weight"])


def test_chat_and_reranker_attached_side_by_side_share_aligned_identical_parameters(
    llama: dict[str, Path], llama_family: tuple[Path, Any]
) -> None:
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlavaForConditionalGeneration

    import wfactor.torch as wt

    fam, _rep = llama_family
    with wfactor.open_family(fam) as f:
        with wt.empty_weights():
            chat = LlamaForCausalLM(AutoConfig.from_pretrained(llama["chat"]))
            rr = LlamaForSequenceClassification(AutoConfig.from_pretrained(llama["reranker_frozen"]))
        chat = wt.attach(chat, f, "chat")
        rr = wt.attach(rr, f, "reranker_frozen")
        backbone = f.backbone("cpu")
        with f.open_delta("reranker_frozen") as d:
            identical = [r.name for r in d.records.values() if r.codec == "identical"]
        assert len(identical) == 20
        params = dict(rr.named_parameters())
        for name in identical:
            assert params[name].data_ptr() == backbone[name].data_ptr(), name
        # a LLaVA attached beside them (transformers 5 names its modules otherwise than its checkpoint)
        with wt.empty_weights():
            vlm = LlavaForConditionalGeneration(AutoConfig.from_pretrained(llama["vlm_frozen"]))
        vlm = wt.attach(vlm, f, "vlm_frozen", rename=LLAVA_RENAME)
        vparams = dict(vlm.named_parameters())
        for name in identical:
            local = name[len("model.") :]
            assert vparams["model.language_model." + local].data_ptr() == params[name].data_ptr(), name
        got = towers.outputs(vlm)
        assert towers.min_cosine(got, towers.outputs(towers.load_model(llama["vlm_frozen"]))) >= 0.999
        # the chat model's own tensors are its own; its output is the original's
        assert towers.min_cosine(towers.outputs(chat), towers.outputs(towers.load_model(llama["chat"]))) >= 0.999
        assert (
            towers.min_cosine(towers.outputs(rr), towers.outputs(towers.load_model(llama["reranker_frozen"]))) > 0.9999
        )


# -- T5: pipeline and BLIP-2 ------------------------------------------------------------------------------
def test_t5_parts_align_to_the_base(t5: dict[str, Path], tmp_path: Path) -> None:
    fam = tmp_path / "fam"
    rep = wfactor.factor(_args(t5, ["sd3", "blip2"]), base=str(t5["base"]), out=fam)
    sd3, blip = _member(rep, "sd3"), _member(rep, "blip2")
    assert _accepted(sd3) == [("text_encoder_3/", "")]
    assert all(n.startswith("transformer/") for n in sd3.alignment["member_only"])
    assert _accepted(blip) == [("language_model.", "")]
    assert not any(n.startswith("language_model.") for n in blip.alignment["member_only"])
    assert _payload(fam, "blip2", "language_model.") == 0  # the base, bit for bit
    assert _rebuilt_cosine(fam, "sd3", t5["sd3"], component="text_encoder_3") >= 0.999
    assert _rebuilt_cosine(fam, "blip2", t5["blip2"]) >= 0.999


# -- two bases --------------------------------------------------------------------------------------------
def test_a_two_base_backbone_serves_members_of_one_tower_or_both(two: dict[str, Path], tmp_path: Path) -> None:
    fam = tmp_path / "fam"
    rep = wfactor.factor(
        _args(two, ["chat", "retrieval", "vlm"]),
        base=[f"text={two['text']}", f"vision={two['vision']}"],
        out=fam,
    )
    assert rep.backbone_origin["kind"] == "bases"
    assert [b["name"] for b in rep.backbone_origin["bases"]] == ["text", "vision"]
    assert _accepted(_member(rep, "chat")) == [("", "text/")]
    assert _accepted(_member(rep, "retrieval")) == [("", "vision/")]
    assert sorted(_accepted(_member(rep, "vlm"))) == [("language_model.", "text/"), ("vision_tower.", "vision/")]
    assert all(n.startswith("multi_modal_projector.") for n in _member(rep, "vlm").alignment["member_only"])
    with wfactor.open_family(fam) as f:
        names = set(f.backbone("cpu"))
        assert names and all(n.startswith(("text/", "vision/")) for n in names)
    for name in ("chat", "retrieval", "vlm"):
        assert _rebuilt_cosine(fam, name, two[name]) >= 0.999, name
    # analyze sees the same towers
    an = analyze(_args(two, ["vlm"]), base=[f"text={two['text']}", f"vision={two['vision']}"], ranks=False)
    rules = [(r["from"], r["to"]) for r in an.models[0].alignment["rules"] if r["accepted"]]
    assert sorted(rules) == [("language_model.", "text/"), ("vision_tower.", "vision/")]
    blocks = an.models[0].alignment["rules"][0]["blocks"]
    assert blocks and all(b["rel_drift"] is not None for b in blocks)


def test_several_bases_need_names(two: dict[str, Path], tmp_path: Path) -> None:
    code, _out, err = invoke(
        "factor", str(two["chat"]), "--base", str(two["text"]), "--base", str(two["vision"]), "-o", str(tmp_path / "f")
    )
    assert code == 2 and err.startswith("error[input]:") and "NAME=PATH" in err and err.count("\n") == 1


# -- negative cases ---------------------------------------------------------------------------------------
def _unrelated_llama(llama: dict[str, Path], out: Path, prefix: str = "") -> Path:
    """A Llama of the base's config from another random initialisation, a few steps trained, names prefixed."""
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(llama["base"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        ids = torch.randint(0, 120, (4, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True)
    save_file(
        {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors")
    )
    return out


def test_an_unrelated_model_with_matching_shapes_is_not_aligned(llama: dict[str, Path], tmp_path: Path) -> None:
    same = _unrelated_llama(llama, tmp_path / "same")
    renamed = _unrelated_llama(llama, tmp_path / "renamed", prefix="language_model.")
    rep = wfactor.factor([f"same={same}", f"renamed={renamed}"], base=str(llama["base"]), out=tmp_path / "fam")
    for m in rep.members:
        assert not m.related, m.name
        assert m.alignment["aligned_tensors"] == 0 and set(m.codecs) <= {"dense", "tied"}
        tried = m.alignment["rules"]
        assert tried and not any(r["accepted"] for r in tried)
        assert all(r["median_drift"] > 1.0 for r in tried)  # independent initialisations: drift about 1.41
    assert [r["from"] for r in _member(rep, "renamed").alignment["rules"]] == ["language_model."]


def test_bad_map_rules_are_one_line_errors(llama: dict[str, Path], tmp_path: Path) -> None:
    base = str(llama["base"])
    cases = [
        ("no-equals", "error[map]:"),
        ("vlm:nothing.=model.", "maps no tensor"),
        ("vlm:language_model.model.norm.=model.layers.0.mlp.down_proj.", "cannot be predicted"),
        ("ghost:a.=b.", "no member named 'ghost'"),
    ]
    for rule, words in cases:
        code, _out, err = invoke(
            "factor", f"vlm={llama['vlm']}", "--base", base, "--map", rule, "-o", str(tmp_path / "f")
        )
        assert code == 2, (rule, err)
        assert err.startswith("error[map]:") and words in err and err.count("\n") == 1, (rule, err)
    assert not (tmp_path / "f").exists()  # nothing half-written


def test_explicit_map_overrides_inference(llama: dict[str, Path], tmp_path: Path) -> None:
    # map the VLM's language model onto the base on purpose, and its lm_head explicitly too
    rep = wfactor.factor(
        [f"vlm={llama['vlm']}"],
        base=str(llama["base"]),
        out=tmp_path / "fam",
        maps=["vlm:language_model.model.=model.", "language_model.lm_head.=lm_head."],
    )
    rules = _member(rep, "vlm").alignment["rules"]
    assert [(r["from"], r["to"], r["origin"]) for r in rules if r["accepted"]] == [
        ("language_model.model.", "model.", "explicit"),
        ("language_model.lm_head.", "lm_head.", "explicit"),
    ]
    assert parse_map("a:b.=") == Rule("b.", "", "a") and parse_map("=x.") == Rule("", "x.")
    with pytest.raises(MapError):
        parse_map("same.=same.")


def _ambiguous(tmp_path: Path) -> tuple[Path, Path]:
    """A base holding one tower twice (``enc.`` and ``dec.``, each a different fine-tune) and a member
    ``m.`` derived from the tower: both rules map the same bytes, and the tie must break the same way."""
    g = torch.Generator().manual_seed(0)
    tower = {f"layers.{i}.w.weight": torch.randn(16, 16, generator=g) for i in range(3)}
    base = {}
    for p in ("enc.", "dec."):
        for k, v in tower.items():
            base[p + k] = v + 0.01 * torch.randn(v.shape, generator=g)
    member = {"m." + k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tower.items()}
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    save_file(member, str(tmp_path / "m" / "model.safetensors"))
    return tmp_path / "b", tmp_path / "m"


def test_ambiguous_rules_resolve_the_same_way_every_run(tmp_path: Path) -> None:
    b, m = _ambiguous(tmp_path)
    with open_source(str(b)) as base, open_source(str(m)) as mem:
        al = align(mem, BackboneIndex(base))
    kept = [u.rule for u in al.rules if u.accepted]
    assert kept == [Rule("m.", "dec.")]  # equal bytes and length: alphabetical
    outs = []
    for seed in ("1", "2"):  # another hash seed: another set and dict iteration order, same family
        out = tmp_path / f"fam{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        code = "import sys, wfactor; wfactor.factor([sys.argv[1]], base=sys.argv[2], out=sys.argv[3])"
        subprocess.run([sys.executable, "-c", code, str(m), str(b), str(out)], check=True, env=env, cwd=ROOT)
        outs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1]


def test_a_family_without_towers_is_written_as_before(tmp_path: Path) -> None:
    """The fixture family (same names everywhere, one unrelated member): alignment finds only same names, so
    every file, manifest included, is byte for byte what name-only matching (the writer before towers) writes."""
    from conftest import FAMILY, member_args

    trees = []
    for infer in (True, False):
        out = tmp_path / f"fam-{infer}"
        wfactor.factor(member_args(), base=str(FAMILY / "base"), out=out, infer=infer)
        trees.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert trees[0] == trees[1]
    man = json.loads(trees[0][Path("wfactor.json")])
    assert all("alignment" not in m["plan"] for m in man["members"])


def test_a_bert_classifier_aligns_to_its_bi_encoder_base(tmp_path: Path) -> None:
    """A sentence-transformers style base (BertModel: ``embeddings.*``, ``encoder.*``, ``pooler.*``) and a
    classifier fine-tuned from it (``bert.*`` + ``classifier.*``), trained a few steps."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    base = BertModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    clf = BertForSequenceClassification(cfg)
    clf.bert.load_state_dict(base.state_dict())
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(0, 96, (4, 10), generator=gen)
        loss = clf(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.save_pretrained(tmp_path / "clf")
    rep = wfactor.factor([f"clf={tmp_path / 'clf'}"], base=str(tmp_path / "base"), out=tmp_path / "fam")
    m = rep.members[0]
    assert m.related and _accepted(m) == [("bert.", "")]
    assert sorted(m.alignment["member_only"]) == ["classifier.bias", "classifier.weight"]
    names_only = wfactor.factor(
        [f"clf={tmp_path / 'clf'}"], base=str(tmp_path / "base"), out=tmp_path / "fam2", infer=False
    ).members[0]
    assert not names_only.related and m.delta_bytes < 0.5 * names_only.delta_bytes


def test_bit_identical_tensors_align_by_content_whatever_their_names(tmp_path: Path) -> None:
    """A member holding the base's tensors under names no rule relates (one component each): aligned by
    content, 0 payload bytes; constant tensors (norm weights of ones) are not matched by content."""
    base = load_file(str(FAMILY_BASE / "model.safetensors"))
    keys = sorted(base)
    member = {f"t{i}": base[k].clone() for i, k in enumerate(keys)}
    member["ones"] = torch.ones(64)
    (tmp_path / "m").mkdir()
    save_file(member, str(tmp_path / "m" / "model.safetensors"))
    rep = wfactor.factor([f"m={tmp_path / 'm'}"], base=str(FAMILY_BASE), out=tmp_path / "fam")
    al = rep.members[0].alignment
    assert rep.members[0].related and not [r for r in al["rules"] if r["accepted"]]
    constant = [k for k in keys if bool((base[k] == base[k].reshape(-1)[0]).all())]
    assert al["by_content"] == len(keys) - len(constant) > 0
    assert set(al["member_only"]) == {"ones"} | {f"t{keys.index(k)}" for k in constant}
    with wfactor.open_family(tmp_path / "fam") as f, f.open_delta("m") as d:
        for i, k in enumerate(keys):
            r = d.records[f"t{i}"]
            assert (r.base == k and r.codec == "identical") or k in constant


def test_content_matches_are_confirmed_byte_for_byte(tmp_path: Path) -> None:
    """Tied weights and alignment by content look tensors up by a sampled fingerprint (64 KiB of each): a
    tensor that differs from another only where no sample falls is neither tied to it nor aligned to it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    u = torch.randn(256, 256, generator=g)
    gap = 320  # between the 2nd and 3rd sampled blocks of a 256 KiB tensor (tests/test_arrays.py)

    def flipped(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out.view(-1).view(torch.uint8)[gap] ^= 1
        return out

    (tmp_path / "base").mkdir()
    save_file({"w": w, "x": torch.randn(256, 256, generator=g)}, str(tmp_path / "base" / "model.safetensors"))
    member = {"v": flipped(w), "u": u, "u2": flipped(u), "u3": u.clone(), "x": torch.randn(256, 256, generator=g)}
    (tmp_path / "m").mkdir()
    save_file(member, str(tmp_path / "m" / "model.safetensors"))
    src = open_source(str(tmp_path / "m"))
    assert src.content("u")[0] == src.content("u2")[0] and not src.same_bytes("u", src, "u2")
    for budget in (wfactor.Budget(), wfactor.Budget(lossless=True)):
        out = tmp_path / f"fam{budget.lossless}"
        rep = wfactor.factor([f"m={tmp_path / 'm'}"], base=str(tmp_path / "base"), out=out, budget=budget)
        assert rep.members[0].alignment.get("by_content", 0) == 0  # v is not w
        with wfactor.open_family(out) as fam, fam.open_delta("m") as d:
            assert d.records["u3"].same_as == "u" and d.records["u2"].same_as is None
            assert d.records["v"].base is None
            rebuilt = fam.state_dict("m")
        for k, t in member.items():
            assert bitwise_equal(rebuilt[k], t), k
