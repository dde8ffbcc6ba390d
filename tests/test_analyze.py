"""`wfactor analyze` (spec/ANALYZE.md): per-tensor figures, verdicts on the fixture family, JSON, the CLI."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILY, MEMBERS, RELATED, invoke, member_args, one_line_error
from safetensors.torch import save_file

from wfactor import analyze as analyze_mod
from wfactor import drift as drift_mod
from wfactor.analyze import AnalysisReport, analyze, effective_rank, group_of
from wfactor.errors import InputError, NotFoundError

BASE = str(FAMILY / "base")
LORA_TARGETS = (
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


@pytest.fixture(scope="module")
def report() -> AnalysisReport:
    return analyze(member_args(), base=BASE)


def raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, bytes), parsed straight from the safetensors layout (no wfactor code)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    start = 8 + n
    return {
        k: (v["dtype"], v["shape"], data[start + v["data_offsets"][0] : start + v["data_offsets"][1]])
        for k, v in header.items()
    }


# -- library ---------------------------------------------------------------------------------------------
def test_verdicts_on_the_fixture_family(report: AnalysisReport) -> None:
    assert [m.name for m in report.models] == MEMBERS
    for name in RELATED:
        m = report.member(name)
        assert m.related, (name, m.reason)
        assert not m.shares_nothing
        assert m.summary.verdict_median_drift is not None and m.summary.verdict_median_drift < 0.3
    bad = report.member("unrelated")
    assert not bad.related and not bad.shares_nothing
    assert "1.41" in bad.reason
    assert bad.summary.verdict_median_drift is not None and 1.2 < bad.summary.verdict_median_drift < 1.6
    assert bad.summary.close_share_bytes == 0.0 and bad.summary.identical == 0
    for m in report.models:
        assert "\n" not in m.reason and m.reason


def test_top_ft_untouched_layers_are_identical(report: AnalysisReport) -> None:
    base = raw_tensors(FAMILY / "base" / "model.safetensors")
    top = raw_tensors(FAMILY / "top_ft" / "model.safetensors")
    m = report.member("top_ft")
    assert {t.name for t in m.tensors} == set(top) == set(base)
    for t in m.tensors:
        same = top[t.name] == base[t.name]
        assert t.identical is same, t.name
        assert t.status == ("identical" if same else "drift"), t.name
        assert (t.changed_fraction == 0.0) is same
        if same:
            assert t.rel_drift == 0.0 and t.rank99 in (0, None)
    untouched = [n for n in top if n.startswith(("layers.0.", "layers.1.", "layers.2.", "embed_"))]
    assert len(untouched) == 50
    assert all(m.tensor(n).identical for n in untouched)
    assert not any(t.identical for t in m.tensors if t.name.startswith("layers.3."))
    for block in ("layers.0", "layers.1", "layers.2", "embed_tokens", "embed_positions"):
        g = m.group(block)
        assert g is not None and g.identical == g.tensors and g.rel_drift == 0.0
    assert m.summary.identical == 50


def test_lora_merged_tensors_are_low_rank(report: AnalysisReport) -> None:
    m = report.member("lora")
    merged = [t for t in m.tensors if t.name.endswith(LORA_TARGETS)]
    assert len(merged) == 16
    for t in merged:
        assert t.status == "drift" and t.rank99 is not None and 1 <= t.rank99 <= 4, (t.name, t.rank99)
    assert all(t.identical for t in m.tensors if t not in merged)
    full = report.member("full_ft")  # a full fine-tune is far from low rank
    assert max(t.rank99 or 0 for t in full.tensors) > 16


def test_vocab_grown_and_bf16_statuses(report: AnalysisReport) -> None:
    vg = report.member("vocab_grown")
    for name in ("embed_tokens.weight", "lm_head.weight"):
        t = vg.tensor(name)
        assert t.status == "shape_changed" and not t.identical
        assert t.shape == [268, 64] and t.base_shape == [260, 64]
        assert t.note is not None and "overlapping leading block [260, 64]" in t.note
        assert t.compared == 260 * 64 and t.rel_drift is not None and t.rel_drift < 0.3
    assert vg.summary.shape_changed == 2
    bf = report.member("bf16")
    assert {t.status for t in bf.tensors} == {"dtype_changed"}
    assert all(t.dtype == "BF16" and t.base_dtype == "F32" for t in bf.tensors)
    assert bf.summary.dtype_changed == 69


def test_first_argument_is_the_base_without_base() -> None:
    rep = analyze([BASE, f"lora={FAMILY / 'lora'}"], base=None, ranks=False)
    assert rep.base.name == "base" and [m.name for m in rep.models] == ["lora"]
    assert rep.member("lora").related
    assert all(t.rank99 is None for t in rep.member("lora").tensors)


def test_errors() -> None:
    with pytest.raises(InputError, match="needs a base"):
        analyze([BASE], base=None)
    with pytest.raises(NotFoundError, match="missing/x: no such file"):
        analyze(["missing/x"], base=BASE)
    with pytest.raises(InputError, match="used twice"):
        analyze([f"a={FAMILY / 'lora'}", f"a={FAMILY / 'top_ft'}"], base=BASE)


def test_synthetic_cases(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(32, 16, generator=g),
        "b.weight": torch.randn(32, 16, generator=g),
        "zero.bias": torch.zeros(16),
        "nan.weight": torch.randn(4, 4, generator=g),
        "only_base.weight": torch.randn(4, 4, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
    }
    u = torch.randn(32, 2, generator=g)
    v = torch.randn(2, 16, generator=g)
    member = {
        "a.weight": base["a.weight"].to(torch.bfloat16),  # exactly the cast base: identical, dtype_changed
        "b.weight": base["b.weight"] + 0.01 * (u @ v),  # rank 2
        "zero.bias": torch.ones(16),  # base all zeros
        "new.weight": torch.randn(3, 3, generator=g),
        "conv.weight": base["conv.weight"].reshape(8, 36).clone(),  # 2-D vs 4-D: not compared
        "nan.weight": base["nan.weight"].clone(),
    }
    member["nan.weight"][0, 0] = float("nan")
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(member, str(tmp_path / "m.safetensors"))
    rep = analyze([str(tmp_path / "m.safetensors")], base=str(tmp_path / "base.safetensors"))
    m = rep.member("m")
    a = m.tensor("a.weight")
    assert a.status == "dtype_changed" and a.identical and a.changed_fraction == 0.0 and a.rel_drift is not None
    b = m.tensor("b.weight")
    assert b.status == "drift" and b.rank99 == 2 and b.cosine is not None and b.cosine > 0.99
    z = m.tensor("zero.bias")
    assert z.rel_drift is None and z.note and "all zeros" in z.note and z.rank99 is None
    assert m.tensor("new.weight").status == "only_in_member"
    nan = m.tensor("nan.weight")
    assert nan.status == "drift" and nan.changed_fraction == 1 / 16 and nan.rel_drift is None and nan.rank99 is None
    assert nan.note and "non-finite" in nan.note
    c = m.tensor("conv.weight")
    assert c.status == "shape_changed" and c.rel_drift is None and c.note and "not compared" in c.note
    assert m.tensor("only_base.weight").status == "only_in_base" and m.tensor("only_base.weight").shape is None
    assert m.summary.identical == 1 and m.summary.only_in_base == 1 and m.summary.only_in_member == 1
    assert m.related
    json.dumps(rep.to_json(), allow_nan=False)

    # no tensor with a common name and shape: shares nothing, unrelated
    save_file({"other.weight": torch.randn(5, 5, generator=g)}, str(tmp_path / "o.safetensors"))
    rep = analyze([str(tmp_path / "o.safetensors")], base=str(tmp_path / "base.safetensors"))
    o = rep.member("o")
    assert o.shares_nothing and not o.related and "different architecture" in o.reason


def test_effective_rank_exact_and_randomised(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    low = torch.randn(150, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 100, generator=g, dtype=torch.float64)
    noise = torch.randn(150, 100, generator=g)
    exact_low, exact_noise = effective_rank(low), effective_rank(noise)
    assert exact_low == 7 and 50 < exact_noise < 100
    assert effective_rank(torch.zeros(5, 5)) == 0
    # force the randomised path on small matrices: widths 4, 8, 16, 32 (up to half the smaller dimension)
    monkeypatch.setattr(drift_mod, "FULL_SVD_MAX_DIM", 16)
    monkeypatch.setattr(drift_mod, "_RANDOM_SVD_START", 4)
    qr_calls = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda a: qr_calls.append(a.shape) or real_qr(a))
    assert effective_rank(low) == 7
    assert qr_calls and max(s[1] for s in qr_calls) == 8 + drift_mod._RANDOM_SVD_OVERSAMPLE
    assert effective_rank(noise) == exact_noise  # beyond the randomised widths: exact fallback
    assert effective_rank(low) == effective_rank(low)  # fixed seed


@pytest.mark.parametrize(
    "name,group",
    [
        ("layers.3.mlp.up_proj.weight", "layers.3"),
        ("model.layers.12.self_attn.q_proj.weight", "model.layers.12"),
        ("blocks.12.attn.qkv.weight", "blocks.12"),
        ("model.layers.0.mlp.experts.7.w1.weight", "model.layers.0"),
        ("embed_tokens.weight", "embed_tokens"),
        ("model.norm.weight", "model.norm"),
        ("lm_head.weight", "lm_head"),
        ("logit_scale", "logit_scale"),
    ],
)
def test_group_of(name: str, group: str) -> None:
    assert group_of(name) == group


def check_documented_json(doc: dict[str, Any]) -> None:
    """The keys and types spec/ANALYZE.md section 7 documents."""
    assert doc["analysis_version"] == 1
    assert list(doc)[:7] == [
        "analysis_version",
        "created_by",
        "base",
        "thresholds",
        "ranks",
        "groups",
        "models",
    ]
    assert set(doc["base"]) == {"name", "path", "tensors", "bytes"}
    assert doc["thresholds"] == {
        "related_max_drift": 0.5,
        "related_min_close_share": 0.5,
        "rank_energy": 0.99,
    }
    summary_keys = {
        "tensors",
        "nbytes",
        "shared",
        "compared",
        "identical",
        "identical_bytes",
        "drift",
        "shape_changed",
        "dtype_changed",
        "only_in_member",
        "only_in_base",
        "median_rel_drift",
        "max_rel_drift",
        "max_rel_drift_tensor",
        "weighted_rel_drift",
        "verdict_basis",
        "verdict_tensors",
        "verdict_median_drift",
        "close_share_bytes",
        "close_share_count",
        "identical_share_bytes",
    }
    tensor_keys = [
        "name",
        "base",
        "group",
        "status",
        "identical",
        "shape",
        "dtype",
        "base_shape",
        "base_dtype",
        "bytes",
        "rel_drift",
        "cosine",
        "rank99",
        "changed_fraction",
        "delta_norm",
        "base_norm",
        "note",
    ]
    for m in doc["models"]:
        assert list(m) == [
            "name",
            "path",
            "related",
            "reason",
            "shares_nothing",
            "summary",
            "components",
            "alignment",
            "groups",
            "tensors",
        ]
        assert m["components"] == []  # pipelines only (tests/test_pipelines.py)
        al = m["alignment"]  # spec/ANALYZE.md section 4; the fixture family shares the base's names
        assert list(al) == [
            "rules",
            "aligned_tensors",
            "aligned_bytes",
            "aligned_share",
            "by_content",
            "by_content_bytes",
            "member_only_tensors",
            "member_only_bytes",
            "member_only",
        ]
        assert [(r["from"], r["to"], r["origin"]) for r in al["rules"]] == [("", "", "identity")]
        assert al["rules"][0]["accepted"] == m["related"] and al["by_content"] == 0
        for t in m["tensors"]:
            named = t["name"] if t["status"] not in ("only_in_member", "only_in_base") else None
            assert t["base"] == named, t
        assert isinstance(m["name"], str) and isinstance(m["related"], bool) and isinstance(m["reason"], str)
        assert set(m["summary"]) == summary_keys
        for g in m["groups"]:
            assert list(g) == [
                "name",
                "tensors",
                "compared",
                "identical",
                "bytes",
                "rel_drift",
                "max_rel_drift",
            ]
            assert g["name"] in doc["groups"]
        assert m["tensors"]
        for t in m["tensors"]:
            assert list(t) == tensor_keys
            assert t["status"] in analyze_mod.STATUSES and isinstance(t["identical"], bool)
            assert t["rank99"] is None or isinstance(t["rank99"], int)
            for k in ("rel_drift", "cosine", "changed_fraction"):
                assert t[k] is None or isinstance(t[k], float)
            assert t["shape"] is None or all(isinstance(d, int) for d in t["shape"])
            assert t["dtype"] is None or isinstance(t["dtype"], str)


def test_json_document(report: AnalysisReport) -> None:
    doc = json.loads(json.dumps(report.to_json(), allow_nan=False))
    check_documented_json(doc)
    assert [m["name"] for m in doc["models"]] == MEMBERS
    assert {m["name"]: m["related"] for m in doc["models"]} == {m: m != "unrelated" for m in MEMBERS}


# -- command line ----------------------------------------------------------------------------------------
def test_cli_tables_heatmap_and_json_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    names = ["top_ft", "lora", "unrelated"]
    code, out, _ = invoke("analyze", *[f"{n}={FAMILY / n}" for n in names], "--base", BASE, "--json", str(path))
    assert code == 0, out
    for fragment in (
        "members against the base",
        "layer blocks",
        "heatmap",
        "UNRELATED",
        "related",
        "layers.3",
        "embed_tokens",
        "lm_head",
        "rank99",
        f"wrote {path}",
        *names,
    ):
        assert fragment in out, fragment
    assert "not derived from the base" in out and "a fine-tune of the base" in out
    heat = out[out.index("heatmap") :]
    assert "1.4" in heat and "=" in heat  # unrelated blocks near sqrt 2; top_ft's untouched blocks identical
    doc = json.loads(path.read_text())
    check_documented_json(doc)
    assert {m["name"]: m["related"] for m in doc["models"]}["unrelated"] is False


def test_cli_json_to_stdout_without_base() -> None:
    code, out, _ = invoke("analyze", BASE, f"lora={FAMILY / 'lora'}", "--json", "-", "--no-rank")
    assert code == 0
    doc = json.loads(out)  # nothing but the JSON on stdout
    check_documented_json(doc)
    assert doc["base"]["name"] == "base" and [m["name"] for m in doc["models"]] == ["lora"]
    assert doc["ranks"] is False


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["analyze", "missing/path", "--base", BASE], "not_found", "missing/path: no such file or directory"),
        (["analyze", BASE], "input", "needs a base"),
        (
            ["analyze", str(FAMILY / "lora"), "--base", str(FAMILY / "lora" / "config.json")],
            "not_safetensors",
            "config.json",
        ),
    ],
)
def test_cli_one_line_errors(args: list[str], code: str, fragment: str) -> None:
    exit_code, _, err = invoke(*args)
    assert exit_code == 2
    assert fragment in one_line_error(err, code)


def test_cli_plot(tmp_path: Path) -> None:
    png = tmp_path / "drift.png"
    code, _, err = invoke("analyze", f"lora={FAMILY / 'lora'}", "--base", BASE, "--plot", str(png), "--no-rank")
    if importlib.util.find_spec("matplotlib") is None:
        assert code == 2
        assert "pip install 'wfactor[plot]'" in one_line_error(err, "input")
        assert not png.exists()
    else:
        assert code == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help_has_examples() -> None:
    code, out, _ = invoke("analyze", "--help")
    assert code == 0 and "Example" in out and "--base" in out and "--json" in out and "--plot" in out
