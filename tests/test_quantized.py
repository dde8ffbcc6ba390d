"""Quantised and low-precision members (wfactor/quantized.py, format versions 4 and 5): fp8 compressed-tensors
checkpoints predicted from their float base by a rescale term, int4 pack-quantized and GPTQ-layout ones (round
to nearest and GPTQ-made) by a requant term, all stored lossless; plain F8 and unsigned-integer tensors; bad
quantisation configs refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY, invoke
from safetensors.torch import load_file, save_file

import wfactor
from wfactor.analyze import analyze
from wfactor.tensors import bitwise_equal

pytest.importorskip("compressed_tensors")  # the `quant` extra (installed by the `test` extra)
import quantized as qz  # noqa: E402  (fixtures/quantized.py)


@pytest.fixture(scope="module")
def qfam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    base = qz.make_llama(root / "base")
    ft = qz.finetune(base, root / "ft", steps=2, lr=2e-4)
    return {
        "base": base,
        "fp8": qz.quantize_fp8(base, root / "fp8"),
        "ft": ft,
        "ft_fp8": qz.quantize_fp8(ft, root / "ft_fp8"),
        "int4": qz.quantize_int4(base, root / "int4"),
        "ft_int4": qz.quantize_int4(ft, root / "ft_int4"),
        "gptq": qz.gptq_quantize(base, root / "gptq"),
        "root": root,
    }


@pytest.fixture(scope="module")
def factored(qfam: dict[str, Path]) -> tuple[Path, wfactor.FactorReport]:
    out = qfam["root"] / "fam"
    rep = wfactor.factor(
        [f"fp8={qfam['fp8']}", f"ft_fp8={qfam['ft_fp8']}", f"int4={qfam['int4']}"], base=str(qfam["base"]), out=out
    )
    return out, rep


def _member(rep: wfactor.FactorReport, name: str):  # type: ignore[no-untyped-def]
    return next(m for m in rep.members if m.name == name)


def test_fp8_members_round_trip_bit_exact_and_load_in_transformers(
    qfam: dict[str, Path], factored: tuple[Path, wfactor.FactorReport], tmp_path: Path
) -> None:
    fam, rep = factored
    with wfactor.open_family(fam) as f:
        assert f.manifest.format_version == 5  # the int4 member's requant terms (spec 8)
        assert [f.open_delta(n).__enter__().version for n in ("fp8", "int4")] == [4, 5]
        report = f.verify({n: str(qfam[n]) for n in ("fp8", "ft_fp8", "int4")})
        assert report.ok, report.problems
        for name in ("fp8", "ft_fp8"):
            sd = f.state_dict(name)
            orig = load_file(str(qfam[name] / "model.safetensors"))
            assert sorted(sd) == sorted(orig) and all(bitwise_equal(sd[k], orig[k]) for k in orig)
            out = f.materialize(name, tmp_path / name)
            again = load_file(str(out))
            assert sorted(again) == sorted(orig) and all(bitwise_equal(again[k], orig[k]) for k in orig)
            cfg = json.loads((tmp_path / name / "config.json").read_text())
            assert cfg["quantization_config"]["format"] == "float-quantized"
            assert torch.equal(qz.logits(tmp_path / name), qz.logits(qfam[name]))
    quant = _member(rep, "fp8").quantization
    assert quant["method"] == "compressed-tensors" and quant["quantized_weights"] == 14
    assert quant["predicted_from_backbone"] is True


def test_a_plain_fp8_copy_of_the_base_costs_its_scales(factored: tuple[Path, wfactor.FactorReport]) -> None:
    fam, rep = factored
    m = _member(rep, "fp8")
    assert m.ratio <= 0.05, m.ratio
    with wfactor.open_family(fam) as f:
        for r in f.records("fp8").values():
            if r.dtype == "F8_E4M3":  # round(B / s) is the member's codes exactly: no residual at all
                assert [t.codec for t in r.terms] == ["rescale"] and r.residual is None, r.name


def test_a_quantised_fine_tune_pays_for_its_code_changes(
    qfam: dict[str, Path], factored: tuple[Path, wfactor.FactorReport]
) -> None:
    import zstandard

    m = _member(rep := factored[1], "ft_fp8")
    packed = zstandard.ZstdCompressor(level=3).compress((qfam["ft_fp8"] / "model.safetensors").read_bytes())
    assert m.delta_bytes < len(packed), (m.delta_bytes, len(packed))
    assert _member(rep, "fp8").delta_bytes < m.delta_bytes


def test_pack_quantized_members_are_predicted_from_the_base(
    qfam: dict[str, Path], factored: tuple[Path, wfactor.FactorReport], tmp_path: Path
) -> None:
    """A round-to-nearest int4 copy of the base: every packed weight is a requant record whose correction is
    all zero, so the member costs little more than its scales; it materialises bit for bit and loads in
    transformers with the original's logits."""
    fam, rep = factored
    m = _member(rep, "int4")
    q = m.quantization
    assert q["format"] == "pack-quantized" and q["predicted_from_backbone"] is True and "not_predicted" not in q
    assert m.codecs["requant"].tensors == 14
    size = (qfam["int4"] / "model.safetensors").stat().st_size
    scales = sum(v.nbytes for k, v in load_file(str(qfam["int4"] / "model.safetensors")).items() if "scale" in k)
    assert m.delta_bytes <= 0.15 * size, (m.delta_bytes, size, scales)
    assert m.codecs["requant"].bytes < 0.01 * m.delta_bytes + 1024  # all-zero corrections: the scales cost
    with wfactor.open_family(fam) as f:
        f.materialize("int4", tmp_path / "int4")
    again = load_file(str(tmp_path / "int4" / "model.safetensors"))
    orig = load_file(str(qfam["int4"] / "model.safetensors"))
    assert sorted(again) == sorted(orig) and all(bitwise_equal(again[k], orig[k]) for k in orig)
    assert torch.equal(qz.logits(tmp_path / "int4"), qz.logits(qfam["int4"]))


@pytest.mark.parametrize("bits", range(1, 9))
def test_requant_packing_is_compressed_tensors_packing(bits: int) -> None:
    """Rows of codes as one little-endian bit stream (spec 5.4) are compressed-tensors' pack_to_int32, for every
    bit width (3, 5, 6, 7 cross word boundaries) and for rows that end inside a word; unpacking inverts it."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from wfactor.codecs import requant

    gen = torch.Generator().manual_seed(bits)
    for n in (1, 31, 32, 37, 96):
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, n), generator=gen, dtype=torch.int8)
        u = q.to(torch.int16) + (1 << (bits - 1))
        packed = requant.pack(u, bits, "rows")
        assert torch.equal(packed, pack_to_int32(q, bits)), (bits, n)
        assert torch.equal(requant.unpack(packed, bits, n, "rows"), u)
        assert torch.equal(requant.unpack(requant.pack(u, bits, "columns"), bits, n, "columns"), u)


def test_quantised_fine_tune_and_gptq_copy_pay_for_their_code_changes(qfam: dict[str, Path], tmp_path: Path) -> None:
    """An int4 copy of a fine-tune and a GPTQ-made copy of the base (codes moved by error compensation) come
    back bit for bit, through wfactor and through the independent reference reader, and cost less than zstd
    of their own files; their corrections are what costs, not their packed words."""
    import zstandard
    from reference_reader import open_family as ref_open

    names = {"ft_int4": qfam["ft_int4"], "gptq": qfam["gptq"]}
    rep = wfactor.factor([f"{k}={v}" for k, v in names.items()], base=str(qfam["base"]), out=tmp_path / "fam")
    ref = ref_open(tmp_path / "fam")
    with wfactor.open_family(tmp_path / "fam") as f:
        assert f.verify({k: str(v) for k, v in names.items()}).ok
        for name, path in names.items():
            sd = f.state_dict(name)
            orig = load_file(str(path / "model.safetensors"))
            assert sorted(sd) == sorted(orig) and all(bitwise_equal(sd[k], orig[k]) for k in orig)
            theirs = ref.state_dict(name)
            for k in orig:
                mine = orig[k].contiguous().view(torch.uint8).numpy().tobytes()
                assert np.ascontiguousarray(theirs[k]).tobytes() == mine, (name, k)
            raw = (path / "model.safetensors").read_bytes()
            m = _member(rep, name)
            assert m.codecs["requant"].tensors == 14 and 0 < m.codecs["requant"].bytes
            assert m.delta_bytes < 0.6 * len(zstandard.ZstdCompressor(level=3).compress(raw)), (name, m.delta_bytes)


def test_analyze_dequantises_a_quantised_copy(qfam: dict[str, Path]) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    rep = analyze([f"fp8={qfam['fp8']}"], base=str(qfam["base"]), ranks=False)
    m = rep.models[0]
    assert m.related, m.reason
    base = load_file(str(qfam["base"] / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    w = base[name]
    s = w.abs().amax(dim=1, keepdim=True) / 448.0
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    err = float(torch.linalg.norm(fake_quantize(w, s, None, args) - w) / torch.linalg.norm(w))
    assert m.tensor(name).rel_drift == pytest.approx(err, rel=1e-3)
    assert 0.005 < err < 0.1


def test_analyze_dequantises_packed_int4_copies(qfam: dict[str, Path]) -> None:
    """A packed int4 copy (pack-quantized, and GPTQ-made) is related to its base, each packed weight compared,
    as the float weight it stands for, with its dequantised values: its drift is its quantisation error,
    computed here with compressed-tensors' own unpacking."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    rep = analyze([f"int4={qfam['int4']}", f"gptq={qfam['gptq']}"], base=str(qfam["base"]), ranks=False)
    int4, gptq = rep.models
    assert int4.related and gptq.related, (int4.reason, gptq.reason)
    base = load_file(str(qfam["base"] / "model.safetensors"))
    q = load_file(str(qfam["int4"] / "model.safetensors"))
    stem = "model.layers.0.mlp.up_proj."
    w = base[stem + "weight"]
    codes = unpack_from_int32(q[stem + "weight_packed"], 4, torch.Size(w.shape))
    deq = (codes.float().reshape(w.shape[0], -1, 32) * q[stem + "weight_scale"][:, :, None]).reshape(w.shape)
    err = float(torch.linalg.norm(deq - w) / torch.linalg.norm(w))
    t = int4.tensor(stem + "weight_packed")
    assert t.base == stem + "weight" and t.rel_drift == pytest.approx(err, rel=1e-3)
    assert 0.02 < err < 0.3
    g = gptq.tensor(stem + "qweight")
    assert g.base == stem + "weight" and 0.02 < g.rel_drift < 0.3


def _requantized(qfam: dict[str, Path], tmp_path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / "bad"
    out.mkdir()
    sd = load_file(str(qfam["fp8"] / "model.safetensors"))
    cfg = json.loads((qfam["fp8"] / "config.json").read_text())
    sd, cfg = edit(sd, cfg)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    "what,edit,words",
    [
        (
            "unknown method",
            lambda sd, c: (sd, {**c, "quantization_config": {"quant_method": "hqq"}}),
            "quant_method 'hqq'",
        ),
        (
            "unknown format",
            lambda sd, c: (sd, {**c, "quantization_config": {**c["quantization_config"], "format": "nvfp4-x"}}),
            "format 'nvfp4-x'",
        ),
        (
            "scales of another shape",
            lambda sd, c: (
                {**sd, "model.layers.0.mlp.up_proj.weight_scale": torch.ones(3, 1)},
                c,
            ),
            "does not fit",
        ),
        (
            "missing scales",
            lambda sd, c: ({k: v for k, v in sd.items() if k != "model.layers.1.self_attn.q_proj.weight_scale"}, c),
            "is missing",
        ),
    ],
)
def test_bad_quantised_checkpoints_are_one_line_errors(
    qfam: dict[str, Path],
    tmp_path: Path,
    what: str,
    edit,
    words: str,  # type: ignore[no-untyped-def]
) -> None:
    bad = _requantized(qfam, tmp_path, edit)
    code, _out, err = invoke("factor", f"m={bad}", "--base", str(qfam["base"]), "-o", str(tmp_path / "f"), "-q")
    assert code == 2, (what, err)
    assert err.startswith("error[input]:") and words in err and err.count("\n") == 1, (what, err)


def test_plain_low_precision_tensors_lossless_and_lossy(tmp_path: Path) -> None:
    """F8 tensors of a float base without scales, and unsigned integer tensors: bit for bit when lossless; an
    F8 member planned lossy stays within its budget."""
    base = load_file(str(FAMILY / "base" / "model.safetensors"))
    ft = load_file(str(FAMILY / "full_ft" / "model.safetensors"))
    member = {k: (v.to(torch.float8_e5m2) if v.dim() == 2 else v) for k, v in ft.items()}
    member["counts"] = torch.arange(10, dtype=torch.int64).to(torch.uint32)
    member["ids"] = torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16)
    (tmp_path / "m").mkdir()
    save_file(member, str(tmp_path / "m" / "model.safetensors"))
    for lossless in (True, False):
        out = tmp_path / f"fam-{lossless}"
        wfactor.factor(
            [f"m={tmp_path / 'm'}"], base=str(FAMILY / "base"), out=out, budget=wfactor.Budget(lossless=lossless)
        )
        with wfactor.open_family(out) as f:
            assert f.manifest.format_version == 4
            report = f.verify({"m": str(tmp_path / "m")})
            assert report.ok, report.problems
            sd = f.state_dict("m")
            assert sd["counts"].dtype == torch.uint32 and sd["ids"].dtype == torch.uint16
            assert bitwise_equal(sd["ids"], member["ids"])
            if lossless:
                assert all(bitwise_equal(sd[k], member[k]) for k in member)
    assert base  # the base itself is F32: the F8 members are predicted from it


def test_gptq_layout_members_round_trip_bit_for_bit(qfam: dict[str, Path], tmp_path: Path) -> None:
    gptq = qz.gptq_layout(qfam["base"], tmp_path / "gptq")
    rep = wfactor.factor([f"gptq={gptq}"], base=str(qfam["base"]), out=tmp_path / "fam")
    q = rep.members[0].quantization
    assert q["method"] == "gptq" and q["predicted_from_backbone"] is True
    assert rep.members[0].codecs["requant"].tensors == 14
    with wfactor.open_family(tmp_path / "fam") as f:
        assert f.verify({"gptq": str(gptq)}).ok
        sd = f.state_dict("gptq")
    orig = load_file(str(gptq / "model.safetensors"))
    assert sorted(sd) == sorted(orig) and all(bitwise_equal(sd[k], orig[k]) for k in orig)
    assert any(k.endswith("qweight") for k in orig)


def _broken_copy(src: Path, out: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    out.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    sd, cfg = edit(sd, cfg)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _int_quantized(sd: dict[str, torch.Tensor], cfg: dict) -> tuple[dict[str, torch.Tensor], dict]:  # type: ignore[type-arg]
    """int4 codes held in int8 (compressed-tensors' int-quantized), one of them out of the 4-bit range."""
    out = {}
    for k, v in sd.items():
        if k.endswith("weight_packed"):
            stem = k[: -len("weight_packed")]
            m, n = (int(x) for x in sd[stem + "weight_shape"].tolist())
            codes = torch.zeros(m, n, dtype=torch.int8)
            codes[0, 0] = 9  # beyond +7
            out[stem + "weight"] = codes
        elif not k.endswith("weight_shape"):
            out[k] = v
    q = dict(cfg["quantization_config"], format="int-quantized")
    return out, {**cfg, "quantization_config": q}


@pytest.mark.parametrize(
    "what,source,edit,words",
    [
        (
            "weight_packed against weight_shape",
            "int4",
            lambda sd, c: ({**sd, "model.layers.0.mlp.up_proj.weight_shape": torch.tensor([512, 999])}, c),
            "packs into",
        ),
        ("codes out of range", "int4", _int_quantized, "outside the 4-bit range"),
        (
            "grouped scales against the group size",
            "int4",
            lambda sd, c: ({**sd, "model.layers.0.mlp.up_proj.weight_scale": torch.ones(512, 3)}, c),
            "groups per output channel",
        ),
        (
            "g_idx against qweight",
            "gptq",
            lambda sd, c: ({**sd, "model.layers.0.mlp.up_proj.g_idx": torch.zeros(17, dtype=torch.int32)}, c),
            "lists 17",
        ),
    ],
)
def test_damaged_packed_checkpoints_are_one_line_errors(
    qfam: dict[str, Path],
    tmp_path: Path,
    what: str,
    source: str,
    edit,
    words: str,  # type: ignore[no-untyped-def]
) -> None:
    src = qfam[source] if source in qfam else qz.gptq_layout(qfam["base"], tmp_path / "src")
    bad = _broken_copy(src, tmp_path / "bad", edit)
    code, _out, err = invoke("factor", f"m={bad}", "--base", str(qfam["base"]), "-o", str(tmp_path / "f"), "-q")
    assert code == 2, (what, err)
    assert err.startswith("error[input]:") and words in err and err.count("\n") == 1, (what, err)


def test_fp8_backbone_quarters_the_backbone_and_keeps_outputs(tmp_path: Path) -> None:
    """``--backbone-dtype fp8``: the backbone's matrices are F8_E4M3 with one scale per row (a version-4
    family), a quarter of the float32 backbone; members are their change from the base on top of it, so a
    tensor a member left unchanged costs nothing; rebuilt members keep their outputs (worst logit cosine
    >= 0.999 on real inputs), and the independent reference reader rebuilds the same tensors."""
    import tinylm
    from reference_reader import open_family as ref_open

    members = ["lora", "full_ft", "bf16"]
    args = [f"{m}={FAMILY / m}" for m in members]
    keep = wfactor.factor(args, base=str(FAMILY / "base"), out=tmp_path / "keep")
    fp8 = wfactor.factor(args, base=str(FAMILY / "base"), out=tmp_path / "fp8", backbone_dtype="fp8")
    assert fp8.backbone_bytes < 0.3 * keep.backbone_bytes, (fp8.backbone_bytes, keep.backbone_bytes)
    assert fp8.backbone_origin["backbone_dtype"] == "fp8"
    ref = ref_open(tmp_path / "fp8")
    with wfactor.open_family(tmp_path / "fp8") as f:
        assert f.manifest.format_version == 4
        bb = f.backbone("cpu")
        assert any(t.dtype == torch.float8_e4m3fn for t in bb.values())
        for m in members:
            sd = f.state_dict(m)
            orig = load_file(str(FAMILY / m / "model.safetensors"))
            model = tinylm.model_from_state_dict(json.loads((FAMILY / m / "config.json").read_text()), sd)
            cos = tinylm.worst_cosine(tinylm.load_model(FAMILY / m), model)
            assert cos >= 0.999, (m, cos)
            for k, v in orig.items():
                if v.is_floating_point():
                    err = float(torch.linalg.norm(sd[k].float() - v.float()) / torch.linalg.norm(v.float()))
                    assert err < 0.05, (m, k, err)  # the backbone's fp8 rounding, about 2-3%
            theirs = ref.state_dict(m)
            for k in orig:
                mine = sd[k].contiguous().view(torch.uint8).numpy().tobytes()
                # only lowrank products may differ in their last bits (spec 5.3)
                if np.ascontiguousarray(theirs[k]).tobytes() != mine:
                    rec = f.records(m)[k]
                    assert any(t.codec == "lowrank" for t in rec.terms), (m, k)
    code, _out, err = invoke(
        "factor", *args, "--base", str(FAMILY / "base"), "-o", str(tmp_path / "x"), "--backbone-dtype", "fp8",
        "--lossless", "-q",
    )  # fmt: skip
    assert code == 2 and err.startswith("error[input]:") and "--lossless" in err and err.count("\n") == 1, err
    code, _out, err = invoke("add", str(tmp_path / "fp8"), f"top={FAMILY / 'top_ft'}", "-q")
    assert code == 2 and err.startswith("error[input]:") and "fp8" in err and err.count("\n") == 1, err


def test_state_dict_dequantize_gives_float_weights(
    qfam: dict[str, Path], factored: tuple[Path, wfactor.FactorReport]
) -> None:
    """``state_dict(name, dequantize=True)``: packed int4 weights and fp8 weights come back as float weights
    under their float names, equal to compressed-tensors' own decompression; a float Llama built from the
    base's config loads them (strict) and gives the logits transformers gives for the quantised checkpoint."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoConfig, AutoModelForCausalLM

    fam, _rep = factored
    with wfactor.open_family(fam) as f:
        deq = {n: f.state_dict(n, dequantize=True) for n in ("int4", "fp8")}
    base = load_file(str(qfam["base"] / "model.safetensors"))
    for n, sd in deq.items():
        assert sorted(sd) == sorted(base), n  # the float model's own names, no scales or packed words
        assert all(v.is_floating_point() and v.shape == base[k].shape for k, v in sd.items()), n
    q = load_file(str(qfam["int4"] / "model.safetensors"))
    stem = "model.layers.1.self_attn.o_proj."
    w = base[stem + "weight"]
    codes = unpack_from_int32(q[stem + "weight_packed"], 4, torch.Size(w.shape)).float()
    want = (codes.reshape(w.shape[0], -1, 32) * q[stem + "weight_scale"][:, :, None]).reshape(w.shape)
    assert torch.equal(deq["int4"][stem + "weight"], want)
    cfg = AutoConfig.from_pretrained(qfam["base"])
    for n in ("int4", "fp8"):
        model = AutoModelForCausalLM.from_config(cfg).eval()
        model.load_state_dict({k: v.float() for k, v in deq[n].items()}, strict=True)
        ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            mine = model(input_ids=ids).logits.float()
        assert torch.allclose(mine, qz.logits(qfam[n]), atol=1e-4, rtol=1e-4), n


def test_attach_runs_quantised_members_dequantised(
    qfam: dict[str, Path], factored: tuple[Path, wfactor.FactorReport]
) -> None:
    """``attach`` gives a float Llama (built from the base's config) a quantised member's weights,
    dequantised: the logits transformers gives for the quantised checkpoint itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from wfactor.torch import attach

    cfg = AutoConfig.from_pretrained(qfam["base"])
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(7))
    with wfactor.open_family(factored[0]) as f:
        for n in ("int4", "fp8"):
            model = attach(AutoModelForCausalLM.from_config(cfg).eval(), f, n)
            with torch.no_grad():
                mine = model(input_ids=ids).logits.float()
            assert torch.allclose(mine, qz.logits(qfam[n]), atol=1e-4, rtol=1e-4), n


def test_int8_int_quantized_members_are_predicted(qfam: dict[str, Path], tmp_path: Path) -> None:
    """An int8 copy in compressed-tensors' int-quantized layout (int8 codes, no packing): requant records of
    layout ``codes``, bit for bit, loading in transformers with the original's logits, for about its scales."""
    int8 = qz.quantize_int8(qfam["base"], tmp_path / "int8")
    rep = wfactor.factor([f"int8={int8}"], base=str(qfam["base"]), out=tmp_path / "fam")
    m = rep.members[0]
    assert m.quantization["format"] == "int-quantized" and m.codecs["requant"].tensors == 14
    assert m.delta_bytes < 0.1 * (int8 / "model.safetensors").stat().st_size
    with wfactor.open_family(tmp_path / "fam") as f:
        assert all(r.terms[0].params["layout"] == "codes" for r in f.records("int8").values() if r.codec == "requant")
        f.materialize("int8", tmp_path / "again")
    again, orig = load_file(str(tmp_path / "again" / "model.safetensors")), load_file(str(int8 / "model.safetensors"))
    assert sorted(again) == sorted(orig) and all(bitwise_equal(again[k], orig[k]) for k in orig)
    assert torch.equal(qz.logits(tmp_path / "again"), qz.logits(int8))


def test_gptq_members_dequantise_to_the_checkpoints_own_weights(
    qfam: dict[str, Path], tmp_path: Path
) -> None:
    """A GPTQ-made member (no GPTQ kernel runs here to load it in transformers): its dequantised weights from
    the family are the checkpoint's own, (q - z) * s unpacked independently here, so a float Llama given
    either gives the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rep = wfactor.factor([f"g={qfam['gptq']}"], base=str(qfam["base"]), out=tmp_path / "fam")
    assert rep.members[0].quantization["predicted_from_backbone"] is True
    with wfactor.open_family(tmp_path / "fam") as f:
        deq = f.state_dict("g", dequantize=True)
    q = load_file(str(qfam["gptq"] / "model.safetensors"))
    own = {}
    for k, v in q.items():
        if k.endswith("qweight"):
            stem = k[: -len("qweight")]
            words = v.to(torch.int64) & 0xFFFFFFFF  # [in / 8, out]
            codes = torch.stack([(words >> (4 * j)) & 15 for j in range(8)], dim=1).reshape(-1, v.shape[1])
            scales = q[stem + "scales"].float()[q[stem + "g_idx"].long()]  # [in, out]
            own[stem + "weight"] = ((codes.float() - 8) * scales).t().contiguous().to(torch.float16)
        elif not k.endswith(("qzeros", "scales", "g_idx")):
            own[k] = v
    assert sorted(own) == sorted(deq)
    for k in own:
        assert torch.allclose(deq[k].float(), own[k].float(), rtol=0, atol=0), k
    cfg = AutoConfig.from_pretrained(qfam["base"])
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(7))
    outs = []
    for sd in (deq, own):
        model = AutoModelForCausalLM.from_config(cfg).eval()
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    assert torch.equal(outs[0], outs[1])


def test_quantised_members_and_fp8_backbones_are_deterministic(qfam: dict[str, Path], tmp_path: Path) -> None:
    """requant records (pack-quantized and GPTQ members) and an fp8 backbone: the same bytes for 1 and 2
    workers, manifest included."""
    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    quantised = [f"int4={qfam['int4']}", f"gptq={qfam['gptq']}"]
    floats = [f"ft={qfam['ft']}"]
    for label, args, dtype in (("q", quantised, "keep"), ("f8", floats, "fp8")):
        trees = []
        for workers in (1, 2):
            out = tmp_path / f"{label}{workers}"
            wfactor.factor(args, base=str(qfam["base"]), out=out, workers=workers, backbone_dtype=dtype)
            trees.append(tree(out))
        assert trees[0] == trees[1], label
