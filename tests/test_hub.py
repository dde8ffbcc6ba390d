"""Hub ids as inputs, tested offline against a Hugging Face cache laid out by the test (never the network)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import FAMILY, invoke, one_line_error

import wfactor
from wfactor.errors import InputError, NotFoundError
from wfactor.hub import HubId, index_shards, parse_hub_id, select_files
from wfactor.inputs import open_source

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, Path | bytes], refs: list[str]) -> Path:
    """Lay out one snapshot as huggingface_hub does: blobs named by content, snapshot entries are relative
    symlinks to them, refs/<branch> holds the commit hash."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no trailing newline, like huggingface_hub
    return snap


def model_files(name: str) -> dict[str, Path | bytes]:
    d = FAMILY / name
    return {p.name: p for p in d.iterdir() if p.is_file()}


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative ids must not collide with the repository's own folders
    add_snapshot(cache, "acme/base-lm", COMMIT_MAIN, model_files("base"), ["main"])
    add_snapshot(cache, "acme/chat-lm", COMMIT_MAIN, model_files("full_ft"), ["main"])
    add_snapshot(cache, "acme/chat-lm", COMMIT_V1, model_files("top_ft"), ["v1"])
    add_snapshot(
        cache, "acme/old-lm", COMMIT_MAIN, {"pytorch_model.bin": b"\x80\x02}q\x00.", "config.json": b"{}"}, ["main"]
    )
    return cache


def test_parse_hub_id() -> None:
    assert parse_hub_id("org/name") == HubId("org/name", None)
    assert parse_hub_id("org/Llama-3.1-8B@v1.0") == HubId("org/Llama-3.1-8B", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == HubId("org/name", "refs/pr/3")
    assert parse_hub_id("hf://gpt2") == HubId("gpt2", None)
    assert parse_hub_id("hf://org/name@" + "c" * 40) == HubId("org/name", "c" * 40)
    # local-looking paths are never Hub ids
    for arg in ["name", "./org/name", "/org/name", "a/b/c", "ckpt/model.safetensors", "org/../x", "org/name@../x"]:
        assert parse_hub_id(arg) is None, arg
    with pytest.raises(InputError, match="not a Hub id"):
        parse_hub_id("hf://a/b/c")


def test_select_files() -> None:
    hub = HubId("o/n")
    listing = ["model.safetensors", "pytorch_model.bin", "config.json", "tokenizer.json", "unet/x.safetensors"]
    assert select_files(hub, listing) == ["model.safetensors", "config.json", "tokenizer.json"]
    sharded = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert select_files(hub, sharded + ["README.md", "pytorch_model.bin"]) == sorted(sharded)
    # several component checkpoints at the top level: all of them (wfactor.pipelines decides what they are)
    assert select_files(hub, ["unet.safetensors", "vae.safetensors", "x/y.json"]) == [
        "unet.safetensors",
        "vae.safetensors",
    ]
    # a diffusers pipeline: component folders' weights and configs, without fp16 variants or .bin files
    pipe = [
        "model_index.json",
        "README.md",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.safetensors.index.json",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/sub/deeper.json",
    ]
    assert select_files(hub, pipe) == [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
    ]
    # with the index read: only the shards it names, not another copy of the weights beside them
    mistral = sharded + ["consolidated.safetensors", "params.json", "config.json"]
    assert select_files(hub, mistral, index_shards=sharded[1:]) == sorted(sharded) + ["config.json", "params.json"]
    with pytest.raises(InputError, match="names model-00003-of-00003.safetensors, which the repository does not"):
        select_files(hub, mistral, index_shards=["model-00003-of-00003.safetensors"])
    assert index_shards(
        hub, b'{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-1.safetensors"}}'
    ) == [
        "m-1.safetensors",
        "m-2.safetensors",
    ]
    for bad in (b"[]", b"{}", b"not json", b'{"weight_map": {"a": "../x.safetensors"}}'):
        with pytest.raises(InputError, match="index"):
            index_shards(hub, bad)
    with pytest.raises(InputError, match=r"only pytorch_model\.bin; convert it"):
        select_files(hub, ["pytorch_model.bin", "config.json"])
    with pytest.raises(InputError, match="sub-folders"):
        select_files(hub, ["unet/diffusion_pytorch_model.safetensors"])
    with pytest.raises(InputError, match="no weights at all"):
        select_files(hub, ["README.md"])


def test_open_main_and_revision(hub_cache: Path) -> None:
    with open_source("acme/chat-lm") as src, open_source(str(FAMILY / "full_ft" / "model.safetensors")) as local:
        assert src.name == "chat-lm"
        assert src.hub == f"acme/chat-lm@{COMMIT_MAIN}"
        assert src.path == hub_cache / "models--acme--chat-lm" / "snapshots" / COMMIT_MAIN
        assert [p.name for p in src.aux_files] == ["config.json", "tokenizer_config.json"]
        assert src.keys() == local.keys()
        assert all(src.raw_bytes(k) == local.raw_bytes(k) for k in src.keys())
    with open_source("chat=acme/chat-lm@v1") as src, open_source(str(FAMILY / "top_ft")) as local:
        assert src.name == "chat" and src.hub == f"acme/chat-lm@{COMMIT_V1}"
        assert all(src.raw_bytes(k) == local.raw_bytes(k) for k in src.keys())
    with open_source(f"hf://acme/chat-lm@{COMMIT_V1}") as src:  # a commit hash needs no ref
        assert src.hub == f"acme/chat-lm@{COMMIT_V1}"


def test_local_path_wins(hub_cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "acme" / "chat-lm"
    shutil.copytree(FAMILY / "lora", local)
    with open_source("acme/chat-lm") as src:
        assert src.hub is None and src.path == Path("acme/chat-lm")


def test_missing_repo_and_revision(hub_cache: Path) -> None:
    with pytest.raises(NotFoundError, match=r"acme/nothing: no such file or directory.*not in the Hugging Face cache"):
        open_source("acme/nothing")
    with pytest.raises(NotFoundError, match=r"revision 'v9' of acme/chat-lm is not in"):
        open_source("acme/chat-lm@v9")


def test_repo_without_safetensors(hub_cache: Path) -> None:
    with pytest.raises(InputError, match=r"acme/old-lm: the repository has no \.safetensors weights: only pytorch"):
        open_source("acme/old-lm")


def test_cli_factor_verify_analyze_from_hub(hub_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "fam"
    code, stdout, stderr = invoke(
        "factor", "acme/chat-lm", "top=acme/chat-lm@v1", "--base", "acme/base-lm", "-o", str(out), "--lossless", "-q"
    )
    assert code == 0, stderr
    with wfactor.open_family(out) as fam:
        assert fam.members == ["chat-lm", "top"]
        assert fam.member("top").source["hub"] == f"acme/chat-lm@{COMMIT_V1}"
        assert [Path(a.path).name for a in fam.member("top").aux_files] == ["config.json", "tokenizer_config.json"]
    code, stdout, stderr = invoke(
        "verify", str(out), "--against", "chat-lm=acme/chat-lm", "--against", "top=acme/chat-lm@v1", "--json"
    )
    assert code == 0, stdout + stderr
    rep = json.loads(stdout)
    assert rep["ok"] and rep["tensors_compared"] == rep["tensors_rebuilt"] > 0
    # the wrong revision is caught: v1 (top-layers fine-tune) is not the main branch (full fine-tune)
    code, stdout, _ = invoke("verify", str(out), "--against", "chat-lm=acme/chat-lm@v1")
    assert code == 1 and "differs" in stdout
    code, stdout, stderr = invoke("analyze", "acme/chat-lm", "--base", "acme/base-lm", "--json", "-", "--no-rank")
    assert code == 0, stderr
    assert '"chat-lm"' in stdout


def test_cli_errors_are_one_line(hub_cache: Path, tmp_path: Path) -> None:
    code, _, stderr = invoke("factor", "acme/nothing", "--base", "acme/base-lm", "-o", str(tmp_path / "f"), "-q")
    assert code == 2
    assert "HF_HUB_OFFLINE" in one_line_error(stderr, "not_found")
    code, _, stderr = invoke("factor", "acme/old-lm", "--base", "acme/base-lm", "-o", str(tmp_path / "f"), "-q")
    assert code == 2
    assert "convert it" in one_line_error(stderr, "input")
    assert not (tmp_path / "f").exists()


def test_online_fetches_only_the_needed_files(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online (no HF_HUB_OFFLINE): the repository is listed, then only weights and configs are fetched, at the
    listed commit. huggingface_hub's network calls are replaced by fakes: no test touches the network."""
    import types

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls: list[tuple[str, dict]] = []
    listing = ["model.safetensors", "pytorch_model.bin", "config.json", "tokenizer_config.json", "onnx/model.onnx"]

    class FakeApi:
        def model_info(self, repo: str, revision: str | None = None, files_metadata: bool = False) -> object:
            calls.append(("model_info", {"repo": repo, "revision": revision}))
            siblings = [types.SimpleNamespace(rfilename=f) for f in listing]
            return types.SimpleNamespace(sha=COMMIT_V1, siblings=siblings)

    def fake_snapshot_download(repo: str, **kw: object) -> str:
        calls.append(("snapshot_download", dict(kw, repo=repo)))
        return str(hub_cache / "models--acme--chat-lm" / "snapshots" / str(kw["revision"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with open_source("acme/chat-lm@v1") as src:
        assert src.hub == f"acme/chat-lm@{COMMIT_V1}" and src.name == "chat-lm"
    assert calls[0] == ("model_info", {"repo": "acme/chat-lm", "revision": "v1"})
    kind, kw = calls[1]
    assert kind == "snapshot_download" and kw["revision"] == COMMIT_V1  # the listed commit, not the moving ref
    assert kw["allow_patterns"] == ["model.safetensors", "config.json", "tokenizer_config.json"]
    assert Path(str(kw["cache_dir"])) == hub_cache


def test_online_sharded_repo_fetches_the_index_first(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sharded repository that also holds another copy of its weights (consolidated.safetensors, as some
    do): the index is fetched first and only the shards it names come with it."""
    import types

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    listing = ["model.safetensors.index.json", *shards, "consolidated.safetensors", "config.json"]
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}))
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def model_info(self, repo: str, revision: str | None = None, files_metadata: bool = False) -> object:
            return types.SimpleNamespace(sha=COMMIT_V1, siblings=[types.SimpleNamespace(rfilename=f) for f in listing])

    def fake_hf_hub_download(repo: str, filename: str, **kw: object) -> str:
        calls.append(("hf_hub_download", dict(kw, repo=repo, filename=filename)))
        return str(index)

    def fake_snapshot_download(repo: str, **kw: object) -> str:
        calls.append(("snapshot_download", dict(kw, repo=repo)))
        return str(hub_cache / "models--acme--chat-lm" / "snapshots" / str(kw["revision"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with open_source("acme/chat-lm@v1"):
        pass
    assert calls[0] == (
        "hf_hub_download",
        {
            "repo": "acme/chat-lm",
            "filename": "model.safetensors.index.json",
            "revision": COMMIT_V1,
            "cache_dir": hub_cache,
        },
    )
    assert calls[1][0] == "snapshot_download"
    assert calls[1][1]["allow_patterns"] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ]
