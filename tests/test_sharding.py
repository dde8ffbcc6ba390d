"""Sharded outputs: --max-shard-size for materialize (transformers-style index), sizes, sharded inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAMILY, invoke, one_line_error

import wfactor
from wfactor.errors import InputError
from wfactor.format.safetensors_io import Entry, SafetensorsFile
from wfactor.format.shards import parse_size, plan_shards
from wfactor.inputs import open_source


def test_parse_size() -> None:
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("64KiB") == 65536
    assert parse_size("4096") == 4096
    assert parse_size(" 10 kb ") == 10_000
    assert parse_size(123) == 123
    for bad in ["", "2XB", "-1GB", "0", "GB", "1e9", "2 G B"]:
        with pytest.raises(InputError, match="--max-shard-size"):
            parse_size(bad)


def test_plan_shards_greedy() -> None:
    es = [Entry(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # 40, 40, 120, 20, 20, 20 bytes
    groups = plan_shards(es, 80)
    assert [[e.name for e in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert plan_shards(es, 10**9) == [es]
    assert [len(g) for g in plan_shards(es, 1)] == [1] * 6  # each tensor larger than the limit stands alone


def _weights(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".safetensors"))


def test_materialize_sharded_matches_unsharded(lossless_family: Path, tmp_path: Path) -> None:
    with wfactor.open_family(lossless_family) as fam:
        single = fam.materialize("full_ft", tmp_path / "one")
        index = fam.materialize("full_ft", tmp_path / "many", max_shard_size="200KB")
    assert single.name == "model.safetensors" and index.name == "model.safetensors.index.json"
    shards = _weights(tmp_path / "many")
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    idx = json.loads(index.read_text())
    with SafetensorsFile(single) as one:
        assert idx["metadata"]["total_size"] == sum(i.nbytes for i in one.tensors.values())
        assert sorted(idx["weight_map"]) == sorted(one.tensors)
        seen = {}
        for s in shards:
            with SafetensorsFile(tmp_path / "many" / s) as f:
                data = sum(i.nbytes for i in f.tensors.values())
                assert data <= 200_000 or len(f.tensors) == 1
                assert f.metadata == {"format": "pt"}
                for k in f.tensors:
                    assert idx["weight_map"][k] == s
                    seen[k] = f.read_bytes(k)
        assert seen == {k: one.read_bytes(k) for k in one.tensors}
    # config files beside, no temporary files left
    assert sorted(p.name for p in (tmp_path / "many").iterdir() if not p.name.endswith(".safetensors")) == [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer_config.json",
    ]
    # a sharded directory is read through its index: it verifies against the family
    with wfactor.open_family(lossless_family) as fam:
        rep = fam.verify({"full_ft": str(tmp_path / "many")})
    assert rep.ok and rep.compared > 0


def test_materialize_sharded_deterministic_and_force(lossless_family: Path, tmp_path: Path) -> None:
    with wfactor.open_family(lossless_family) as fam:
        fam.materialize("lora", tmp_path / "a", max_shard_size=150_000)
        fam.materialize("lora", tmp_path / "b", max_shard_size=150_000)
        for name in _weights(tmp_path / "a") + ["model.safetensors.index.json"]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        # --force over a sharded output: the old shards and index go, one model.safetensors stays
        fam.materialize("lora", tmp_path / "a", force=True)
    assert _weights(tmp_path / "a") == ["model.safetensors"]
    assert not (tmp_path / "a" / "model.safetensors.index.json").exists()
    with open_source(str(tmp_path / "a")) as x, open_source(str(tmp_path / "b")) as y:
        assert x.keys() == y.keys() and all(x.raw_bytes(k) == y.raw_bytes(k) for k in x.keys())


def test_cli_max_shard_size(lossless_family: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        "materialize", str(lossless_family), "top_ft", "-o", str(out), "--max-shard-size", "0.2MB", "--json"
    )
    assert code == 0, stderr
    rep = json.loads(stdout)
    assert "model.safetensors.index.json" in rep["files"]
    assert rep["bytes"] == sum((out / f).stat().st_size for f in _weights(out)) and len(_weights(out)) >= 3
    code, _, stderr = invoke(
        "materialize", str(lossless_family), "top_ft", "-o", str(tmp_path / "x"), "--max-shard-size", "2XB"
    )
    assert code == 2
    assert "500MB" in one_line_error(stderr, "input")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_factor_from_sharded_input(tmp_path: Path, lossless_family: Path) -> None:
    with wfactor.open_family(lossless_family) as fam:
        fam.materialize("top_ft", tmp_path / "top", max_shard_size="100KB")
    rep = wfactor.factor(
        [f"top={tmp_path / 'top'}"],
        base=str(FAMILY / "base"),
        out=tmp_path / "fam",
        budget=wfactor.Budget(lossless=True),
    )
    assert [m.name for m in rep.members] == ["top"]
    with wfactor.open_family(tmp_path / "fam") as fam:
        assert fam.member("top").source["files"] == _weights(tmp_path / "top")
        assert fam.verify({"top": str(FAMILY / "top_ft")}).ok


def _tiny_llama(tmp: Path) -> dict[str, Path]:
    """A tiny Llama built from a config (no download), saved as base plus two deterministic fine-tunes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    dirs = {"base": tmp / "base", "ft_a": tmp / "ft_a", "ft_b": tmp / "ft_b"}
    model.save_pretrained(dirs["base"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, pattern in [("ft_a", "layers.1."), ("ft_b", "mlp")]:
            for key, p in model.named_parameters():
                if pattern in key:
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
            model.save_pretrained(dirs[name])
    return dirs


def test_transformers_loads_sharded_materialisation(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    dirs = _tiny_llama(tmp_path)
    with open_source(str(dirs["ft_a"])) as src:
        assert "lm_head.weight" not in src  # save_pretrained drops the tied copy
    fam_dir = tmp_path / "fam"
    wfactor.factor(
        [f"ft_a={dirs['ft_a']}", f"ft_b={dirs['ft_b']}"],
        base=str(dirs["base"]),
        out=fam_dir,
        budget=wfactor.Budget(lossless=True),
    )
    ids = torch.arange(0, 120, 7).reshape(1, -1)
    with wfactor.open_family(fam_dir) as fam:
        for name in ["ft_a", "ft_b"]:
            out = tmp_path / f"rebuilt_{name}"
            fam.materialize(name, out, max_shard_size="20KB")
            assert len(_weights(out)) >= 3
            idx = json.loads((out / "model.safetensors.index.json").read_text())
            assert "lm_head.weight" not in idx["weight_map"]  # exactly what the source had
            rebuilt = AutoModelForCausalLM.from_pretrained(out).eval()
            original = AutoModelForCausalLM.from_pretrained(dirs[name]).eval()
            base = AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
            with torch.no_grad():
                got, want, far = rebuilt(ids).logits, original(ids).logits, base(ids).logits
            assert torch.equal(got, want), name  # lossless: the same logits, bit for bit
            assert not torch.equal(far, want)  # the fine-tune really differs from the base
            assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()


# -- sharded backbones (format version 2, spec/FORMAT.md section 2.1) -----------------------------------------

SHARD_MEMBERS = ["full_ft", "bf16", "vocab_grown"]


@pytest.fixture(scope="module")
def sharded_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "fam"
    wfactor.factor(
        [f"{m}={FAMILY / m}" for m in SHARD_MEMBERS],
        base=str(FAMILY / "base"),
        out=out,
        budget=wfactor.Budget(lossless=True),
        max_shard_size="300KB",
    )
    return out


def test_sharded_backbone_layout(sharded_family: Path) -> None:
    import hashlib

    man = json.loads((sharded_family / "wfactor.json").read_text())
    assert man["format_version"] == 2
    shards = man["backbone_shards"]
    n = len(shards)
    assert n >= 3 and [s["path"] for s in shards] == [
        f"backbone-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    listing = (sharded_family / "backbone.sha256").read_bytes()
    # the shard list is sha256sum's output over the shards, and its digest is the backbone's
    assert listing == b"".join(
        f"{hashlib.sha256((sharded_family / s['path']).read_bytes()).hexdigest()}  {s['path']}\n".encode()
        for s in shards
    )
    assert man["backbone"] == {
        "path": "backbone.sha256",
        "sha256": hashlib.sha256(listing).hexdigest(),
        "size": len(listing),
    }
    with SafetensorsFile(FAMILY / "base" / "model.safetensors") as base:
        seen: dict[str, bytes] = {}
        for s in shards:
            with SafetensorsFile(sharded_family / s["path"]) as f:
                assert f.metadata == {"wfactor.kind": "backbone", "wfactor.format_version": "2"}
                assert sum(i.nbytes for i in f.tensors.values()) <= 300_000 or len(f.tensors) == 1
                seen.update((k, f.read_bytes(k)) for k in f.tensors)
        assert seen == {k: base.read_bytes(k) for k in base.tensors}
    for m in man["members"]:  # deltas are unchanged (version 1) and name the shard list's digest
        with SafetensorsFile(sharded_family / m["delta"]["path"]) as d:
            assert d.metadata["wfactor.format_version"] == "1"
            assert d.metadata["wfactor.backbone_sha256"] == man["backbone"]["sha256"]
    code, stdout, _ = invoke("inspect", str(sharded_family), "--json")
    assert code == 0
    info = json.loads(stdout)["backbone"]
    assert info["bytes"] == len(listing) + sum(s["size"] for s in shards) and len(info["shards"]) == n


def test_sharded_backbone_rebuilds_like_one_file(sharded_family: Path, lossless_family: Path) -> None:
    import reference_reader as rr
    import torch

    with wfactor.open_family(sharded_family) as fam, wfactor.open_family(lossless_family) as one:
        assert [p.name for p in fam.backbone_files] == [
            s["path"] for s in json.loads((sharded_family / "wfactor.json").read_text())["backbone_shards"]
        ]
        bb, bb1 = fam.backbone(), one.backbone()
        assert bb.keys() == bb1.keys() and all(torch.equal(bb[k], bb1[k]) for k in bb)
        ref = rr.open_family(sharded_family)
        for m in SHARD_MEMBERS:
            sd, sd1 = fam.state_dict(m), one.state_dict(m)
            assert list(sd) == list(sd1)
            assert all(sd[k].dtype == sd1[k].dtype and torch.equal(sd[k], sd1[k]) for k in sd)
            # the numpy reader written from the spec reads the sharded family to the same bytes
            ref_sd = ref.state_dict(m)
            assert list(ref_sd) == list(sd)
            assert all(ref_sd[k].tobytes() == sd[k].contiguous().view(torch.uint8).numpy().tobytes() for k in sd)
        rep = fam.verify({m: str(FAMILY / m) for m in SHARD_MEMBERS})
        assert rep.ok, rep.problems
        assert "backbone.sha256" in rep.checked_files and len(rep.checked_files) > len(SHARD_MEMBERS) + 3


def test_unsharded_family_stays_v1_byte_identical(tmp_path: Path) -> None:
    args = [f"lora={FAMILY / 'lora'}"]
    exact = wfactor.Budget(lossless=True)
    wfactor.factor(args, base=str(FAMILY / "base"), out=tmp_path / "a", budget=exact)
    wfactor.factor(args, base=str(FAMILY / "base"), out=tmp_path / "b", budget=exact, max_shard_size="1GB")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    man = json.loads((tmp_path / "a" / "wfactor.json").read_text())
    assert man["format_version"] == 1 and "backbone_shards" not in man
    assert man["backbone"]["path"] == "backbone.safetensors"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_sharded_backbone_damage_is_refused(sharded_family: Path, tmp_path: Path) -> None:
    import reference_reader as rr

    from wfactor.errors import FormatError, IntegrityError

    # a flipped byte in a shard: refused before any tensor is returned, by both readers
    fam = _copy(sharded_family, tmp_path / "flip")
    shard = sorted(fam.glob("backbone-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    with wfactor.open_family(fam) as f, pytest.raises(IntegrityError, match=shard.name):
        f.backbone()
    with wfactor.open_family(fam) as f, pytest.raises(IntegrityError, match="modified or replaced"):
        f.state_dict("full_ft")
    with pytest.raises(rr.RefError) as e:
        rr.open_family(fam).state_dict("full_ft")
    assert e.value.code == "integrity"
    code, _, stderr = invoke("verify", str(fam))
    assert code == 1
    # a shard list that does not match backbone_shards (re-hashed so only the content check can catch it)
    fam = _copy(sharded_family, tmp_path / "list")
    man = json.loads((fam / "wfactor.json").read_text())
    shards = man["backbone_shards"]
    shards[0], shards[1] = shards[1], shards[0]
    (fam / "wfactor.json").write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="shard list"):
        wfactor.open_family(fam)
    with pytest.raises(rr.RefError) as e:
        rr.open_family(fam).state_dict("full_ft")
    assert e.value.code == "integrity"
    # backbone_shards in a version-1 manifest is malformed
    fam = _copy(sharded_family, tmp_path / "v1")
    man = json.loads((fam / "wfactor.json").read_text())
    man["format_version"] = 1
    (fam / "wfactor.json").write_text(json.dumps(man))
    with pytest.raises(FormatError, match="backbone_shards needs format_version 2"):
        wfactor.open_family(fam)
    with pytest.raises(rr.RefError) as e:
        rr.open_family(fam)
    assert e.value.code == "format"


def test_cli_factor_max_shard_size(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    code, stdout, stderr = invoke(
        "factor",
        f"lora={FAMILY / 'lora'}",
        "--base",
        str(FAMILY / "base"),
        "-o",
        str(out),
        "--max-shard-size",
        "400KB",
        "--lossless",
        "--json",
        "-q",
    )
    assert code == 0, stderr
    man = json.loads((out / "wfactor.json").read_text())
    assert man["format_version"] == 2 and len(man["backbone_shards"]) >= 3
    assert json.loads(stdout)["backbone_bytes"] == man["backbone"]["size"] + sum(
        s["size"] for s in man["backbone_shards"]
    )
    code, _, stderr = invoke(
        "factor",
        f"lora={FAMILY / 'lora'}",
        "--base",
        str(FAMILY / "base"),
        "-o",
        str(tmp_path / "x"),
        "--max-shard-size",
        "lots",
        "-q",
    )
    assert code == 2 and "--max-shard-size" in one_line_error(stderr, "input")
    assert not (tmp_path / "x").exists()


def test_sharded_manifest_matches_the_schema(sharded_family: Path) -> None:
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[1] / "spec" / "schema.json").read_text())
    check = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/manifest"})
    man = json.loads((sharded_family / "wfactor.json").read_text())
    assert not [e.message for e in check.iter_errors(man)]
    man["format_version"] = 1  # backbone_shards needs version 2
    assert [e.message for e in check.iter_errors(man)]
