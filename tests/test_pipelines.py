"""Whole pipelines (diffusers directories) as members (spec/FORMAT.md 3.3): a family of tiny Stable-Diffusion
pipelines built from configs (fixtures/tiny_pipelines.py, nothing downloaded) is factored, rebuilt,
materialised back into diffusers' layout, attached per component and analysed per component."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from conftest import invoke, one_line_error  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import wfactor  # noqa: E402
from wfactor.errors import InputError, NotFoundError  # noqa: E402
from wfactor.inputs import open_source  # noqa: E402

MEMBERS = ["turbo", "style", "te_ft"]
COMPONENTS = ["text_encoder", "unet", "vae"]
# components each member shares bit for bit with the base
IDENTICAL = {"turbo": {"text_encoder", "vae"}, "style": {"text_encoder", "vae"}, "te_ft": {"unet", "vae"}}
WEIGHT_FILES = {
    "text_encoder": "text_encoder/model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny convolutions: thread start-up costs more than the work (and the CPUs are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_pipelines import build_pipelines

    return build_pipelines(tmp_path_factory.mktemp("pipes"))


def _factor(pipes: dict[str, Path], out: Path, **kw: object) -> wfactor.FactorReport:
    return wfactor.factor([f"{m}={pipes[m]}" for m in MEMBERS], base=str(pipes["base"]), out=out, **kw)


@pytest.fixture(scope="module")
def lossless(pipes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pl") / "fam"
    _factor(pipes, out, budget=wfactor.Budget(lossless=True))
    return out


@pytest.fixture(scope="module")
def lossy(pipes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, wfactor.FactorReport]:
    out = tmp_path_factory.mktemp("py") / "fam"
    return out, _factor(pipes, out)


def _component_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{c}/{k}": v for c, rel in WEIGHT_FILES.items() for k, v in load_file(folder / rel).items()}


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.view(torch.uint8).equal(b.view(torch.uint8))


def _load_pipe(folder: Path):  # type: ignore[no-untyped-def]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


# -- input side ---------------------------------------------------------------------------------------------
def test_a_diffusers_directory_is_one_source_with_namespaced_tensors(pipes: dict[str, Path]) -> None:
    with open_source(str(pipes["base"])) as src:
        comps = {c.name: c.file for c in src.components}  # type: ignore[attr-defined]
        assert comps == WEIGHT_FILES
        originals = _component_tensors(pipes["base"])
        assert src.keys() == sorted(originals)
        key = "unet/conv_in.weight"
        assert _bitwise(src.tensor(key), originals[key])
        rel = {src.aux_relpath(p) for p in src.aux_files}  # type: ignore[attr-defined]
        assert {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"} <= rel
        assert "scheduler/scheduler_config.json" in rel and any(r.startswith("tokenizer/") for r in rel)
        assert not any(r.endswith(".safetensors") for r in rel)


def test_a_directory_of_several_safetensors_files_is_a_pipeline(tmp_path: Path, pipes: dict[str, Path]) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for comp, rel in WEIGHT_FILES.items():
        (flat / f"{comp}.safetensors").write_bytes((pipes["turbo"] / rel).read_bytes())
    base = tmp_path / "flat_base"
    base.mkdir()
    for comp, rel in WEIGHT_FILES.items():
        (base / f"{comp}.safetensors").write_bytes((pipes["base"] / rel).read_bytes())
    fam = tmp_path / "fam"
    wfactor.factor([f"t={flat}"], base=str(base), out=fam, budget=wfactor.Budget(lossless=True))
    with wfactor.open_family(fam) as f:
        assert f.components("t") == COMPONENTS
        assert [c.file for c in f.member("t").components] == [f"{c}.safetensors" for c in COMPONENTS]
        f.materialize("t", tmp_path / "out")
    for comp in COMPONENTS:
        got, want = load_file(tmp_path / "out" / f"{comp}.safetensors"), load_file(flat / f"{comp}.safetensors")
        assert got.keys() == want.keys() and all(_bitwise(got[k], want[k]) for k in want)


def test_unshardable_layouts_are_one_line_errors(tmp_path: Path, pipes: dict[str, Path]) -> None:
    bad = tmp_path / "two_weights"
    bad.mkdir()
    (bad / "model_index.json").write_text((pipes["base"] / "model_index.json").read_text())
    for comp in COMPONENTS:
        (bad / comp).mkdir()
        src = pipes["base"] / WEIGHT_FILES[comp]
        (bad / comp / "a.safetensors").write_bytes(src.read_bytes())
        (bad / comp / "b.safetensors").write_bytes(src.read_bytes())
    with pytest.raises(InputError, match="2 .safetensors files"):
        open_source(str(bad))
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in (1, 2):
        (shards / f"model-0000{i}-of-00002.safetensors").write_bytes((pipes["base"] / WEIGHT_FILES["vae"]).read_bytes())
    code, _out, err = invoke("analyze", str(shards), "--base", str(pipes["base"]))
    assert code == 2
    assert "no *.safetensors.index.json" in one_line_error(err, "input")


# -- round trips -------------------------------------------------------------------------------------------
def test_lossless_round_trip_is_bit_for_bit(lossless: Path, pipes: dict[str, Path]) -> None:
    with wfactor.open_family(lossless) as fam:
        for m in MEMBERS:
            assert fam.components(m) == COMPONENTS
            want = _component_tensors(pipes[m])
            got = fam.state_dict(m)
            assert got.keys() == want.keys()
            bad = [k for k in want if not _bitwise(got[k], want[k])]
            assert not bad, (m, bad[:3])
        report = fam.verify(against={m: str(pipes[m]) for m in MEMBERS})
        assert report.ok, report.problems
        assert report.compared == sum(len(_component_tensors(pipes[m])) for m in MEMBERS)


def test_materialized_pipeline_has_the_same_layout_and_loads_in_diffusers(
    lossless: Path, pipes: dict[str, Path], tmp_path: Path
) -> None:
    from tiny_pipelines import denoise_step, fixed_inputs

    out = tmp_path / "turbo"
    code, stdout, err = invoke("materialize", str(lossless), "turbo", "-o", str(out), "--json")
    assert code == 0, err
    listed = json.loads(stdout)["files"]
    orig = sorted(p.relative_to(pipes["turbo"]).as_posix() for p in pipes["turbo"].rglob("*") if p.is_file())
    assert listed == orig  # same files, same folders: weights, configs, model_index.json, scheduler, tokenizer
    for rel in orig:
        if not rel.endswith(".safetensors"):
            assert (out / rel).read_bytes() == (pipes["turbo"] / rel).read_bytes(), rel
    got, want = _component_tensors(out), _component_tensors(pipes["turbo"])
    assert all(_bitwise(got[k], want[k]) for k in want) and got.keys() == want.keys()

    rebuilt, original = _load_pipe(out), _load_pipe(pipes["turbo"])
    assert type(rebuilt).__name__ == "StableDiffusionPipeline" and rebuilt.tokenizer is not None
    x = fixed_inputs()
    y = denoise_step(rebuilt.unet, rebuilt.text_encoder, x)
    assert torch.equal(y, denoise_step(original.unet, original.text_encoder, x))

    # sharded components with --force: diffusers' own sharded layout, and the single files are gone
    code, _o, err = invoke(
        "materialize", str(lossless), "turbo", "-o", str(out), "--force", "--max-shard-size", "100KB"
    )
    assert code == 0, err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert torch.equal(denoise_step(_load_pipe(out).unet, rebuilt.text_encoder, x), y)


def test_default_lossy_keeps_one_denoising_step(
    lossy: tuple[Path, wfactor.FactorReport], pipes: dict[str, Path]
) -> None:
    from tiny_pipelines import build_models, denoise_step, fixed_inputs

    fam_path, _rep = lossy
    x = fixed_inputs()
    unet, _vae, te = build_models(0)
    base_sd = _component_tensors(pipes["base"])
    with wfactor.open_family(fam_path) as fam:
        for m in MEMBERS:
            orig = _component_tensors(pipes[m])
            unet.load_state_dict({k[5:]: v for k, v in orig.items() if k.startswith("unet/")})
            te.load_state_dict({k[13:]: v for k, v in orig.items() if k.startswith("text_encoder/")}, strict=False)
            y_orig = denoise_step(unet, te, x)
            unet.load_state_dict({k[5:]: v for k, v in base_sd.items() if k.startswith("unet/")})
            te.load_state_dict({k[13:]: v for k, v in base_sd.items() if k.startswith("text_encoder/")}, strict=False)
            y_base = denoise_step(unet, te, x)
            unet.load_state_dict(fam.state_dict(m, component="unet"))
            te.load_state_dict(fam.state_dict(m, component="text_encoder"), strict=False)
            y = denoise_step(unet, te, x)
            cos = torch.nn.functional.cosine_similarity(y.flatten(), y_orig.flatten(), dim=0).item()
            cos_base = torch.nn.functional.cosine_similarity(y_base.flatten(), y_orig.flatten(), dim=0).item()
            assert cos >= 0.999, (m, cos)
            assert cos > cos_base, (m, cos, cos_base)  # the member differs from the base; the delta matters


def test_identical_components_cost_no_delta_bytes(lossy: tuple[Path, wfactor.FactorReport]) -> None:
    fam_path, rep = lossy
    with wfactor.open_family(fam_path) as fam:
        for m in MEMBERS:
            with fam.open_delta(m) as d:
                per_comp: dict[str, int] = {}
                for rec in d.records.values():
                    comp = rec.name.split("/", 1)[0]
                    per_comp[comp] = per_comp.get(comp, 0) + sum(d.file.tensors[p.key].nbytes for p in rec.part_specs())
            for comp in COMPONENTS:
                if comp in IDENTICAL[m]:
                    assert per_comp[comp] == 0, (m, comp)
                else:
                    assert per_comp[comp] > 0, (m, comp)
    by_name = {r.name: r for r in rep.members}
    assert by_name["style"].codecs["lowrank"].tensors == 32  # the merged LoRA: attention projections only
    assert by_name["style"].delta_bytes < 0.3 * by_name["style"].original_bytes


# -- loader ------------------------------------------------------------------------------------------------
def test_state_dict_of_a_component_and_errors(lossless: Path, pipes: dict[str, Path]) -> None:
    with wfactor.open_family(lossless) as fam:
        unet = fam.state_dict("style", component="unet")
        want = load_file(pipes["style"] / WEIGHT_FILES["unet"])
        assert unet.keys() == want.keys() and all(_bitwise(unet[k], want[k]) for k in want)
        assert (
            dict(fam.iter_tensors("style", component="vae")).keys()
            == load_file(pipes["style"] / WEIGHT_FILES["vae"]).keys()
        )
        with pytest.raises(NotFoundError, match="no component 'scheduler'"):
            fam.state_dict("style", component="scheduler")


def test_attach_per_component_shares_identical_components(
    lossy: tuple[Path, wfactor.FactorReport], pipes: dict[str, Path]
) -> None:
    from tiny_pipelines import build_models, denoise_step, fixed_inputs

    import wfactor.torch as wt

    fam_path, _rep = lossy
    x = fixed_inputs()
    with wfactor.open_family(fam_path) as fam:
        modules = {}
        for m in ("turbo", "style"):
            unet, _vae, te = build_models(0)
            modules[m] = (
                wt.attach(unet, fam, m, device="cpu", component="unet"),
                wt.attach(te, fam, m, device="cpu", component="text_encoder"),
            )
        te_a, te_b = dict(modules["turbo"][1].named_parameters()), dict(modules["style"][1].named_parameters())
        assert te_a.keys() == te_b.keys() and len(te_a) > 10
        assert all(te_a[k].data_ptr() == te_b[k].data_ptr() for k in te_a)  # one text encoder in memory
        unet_a, unet_b = dict(modules["turbo"][0].named_parameters()), dict(modules["style"][0].named_parameters())
        assert any(unet_a[k].data_ptr() != unet_b[k].data_ptr() for k in unet_a if k in unet_b)
        # the attached style UNet keeps its LoRA factored and computes what its rebuilt weights compute
        ref_unet, _v, ref_te = build_models(0)
        ref_unet.load_state_dict(fam.state_dict("style", component="unet"))
        ref_te.load_state_dict(fam.state_dict("style", component="text_encoder"), strict=False)
        y = denoise_step(modules["style"][0], modules["style"][1], x)
        torch.testing.assert_close(y, denoise_step(ref_unet, ref_te, x), rtol=1e-4, atol=1e-5)
        with pytest.raises(NotFoundError, match="no component"):
            wt.attach(build_models(0)[1], fam, "style", component="vae_decoder")


# -- analyze -----------------------------------------------------------------------------------------------
def test_analyze_reports_drift_per_component_then_per_block(pipes: dict[str, Path], tmp_path: Path) -> None:
    args = [f"{m}={pipes[m]}" for m in MEMBERS]
    code, stdout, err = invoke("analyze", *args, "--base", str(pipes["base"]), "--no-rank", "--json", "-")
    assert code == 0, err
    doc = json.loads(stdout)
    for model in doc["models"]:
        comps = {c["name"]: c for c in model["components"]}
        assert sorted(comps) == COMPONENTS
        for name, c in comps.items():
            if name in IDENTICAL[model["name"]]:
                assert c["identical"] == c["tensors"] and c["max_rel_drift"] == 0
            else:
                assert c["identical"] < c["tensors"] and c["rel_drift"] > 0
        assert model["related"]
        assert all(g["name"].split("/")[0] in COMPONENTS for g in model["groups"])
    # layer blocks sit inside their component: the component is the first level of every block name
    assert doc["groups"] == sorted(doc["groups"], key=lambda g: (g.split("/")[0],))[: len(doc["groups"])]
    code, text, err = invoke("analyze", *args, "--base", str(pipes["base"]), "--no-rank")
    assert code == 0, err
    assert text.index("components:") < text.index("layer blocks")


# -- the manifest key (spec 3.3) -----------------------------------------------------------------------------
def test_components_in_the_manifest_match_the_schema_and_are_checked(lossless: Path, tmp_path: Path) -> None:
    import shutil

    import jsonschema
    from conftest import ROOT

    from wfactor.errors import FormatError

    manifest = json.loads((lossless / "wfactor.json").read_text())
    schema = json.loads((ROOT / "spec" / "schema.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(manifest))
    assert not errors, [e.message for e in errors[:3]]
    entry = manifest["members"][0]
    assert entry["components"] == [
        {"name": c, "file": WEIGHT_FILES[c], "tensors": sum(t["name"].startswith(c + "/") for t in entry["tensors"])}
        for c in COMPONENTS
    ]
    assert {a["path"] for a in entry["aux_files"]} >= {
        f"aux/{entry['name']}/model_index.json",
        f"aux/{entry['name']}/unet/config.json",
        f"aux/{entry['name']}/scheduler/scheduler_config.json",
    }
    broken = tmp_path / "fam"
    shutil.copytree(lossless, broken)
    for bad, match in (
        ([c for c in entry["components"] if c["name"] != "vae"], "belongs to none of the member's components"),
        ([dict(entry["components"][0], file="../x.safetensors")] + entry["components"][1:], "inside the family"),
        (entry["components"] + [dict(entry["components"][0])], "appears twice"),
    ):
        doc = json.loads(json.dumps(manifest))
        doc["members"][0]["components"] = bad
        (broken / "wfactor.json").write_text(json.dumps(doc))
        with pytest.raises(FormatError, match=match):
            wfactor.open_family(broken)


def test_a_reader_that_ignores_components_still_rebuilds_every_tensor(lossless: Path, pipes: dict[str, Path]) -> None:
    """The reference reader, written from the spec without section 3.3, reads the pipeline family: same
    tensors, bit for bit, under their namespaced names (why ``components`` needs no new format version)."""
    import numpy as np
    import reference_reader as rr

    ref = rr.open_family(lossless)
    for m in MEMBERS:
        mine = ref.state_dict(m)
        want = _component_tensors(pipes[m])
        assert sorted(mine) == sorted(want)
        for k, t in want.items():
            assert isinstance(mine[k], np.ndarray) and mine[k].tobytes() == t.numpy().tobytes(), (m, k)
