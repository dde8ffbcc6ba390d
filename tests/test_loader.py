"""Loading: one backbone per (backbone, device) in the process, reference-counted; a byte-bounded delta LRU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import wfactor
from wfactor.errors import IntegrityError
from wfactor.loader import BACKBONES, DeltaCache
from wfactor.tensors import bitwise_equal


def test_backbone_is_shared_across_family_objects_and_freed_on_last_release(lossless_family: Path) -> None:
    a, b = wfactor.open_family(lossless_family), wfactor.open_family(lossless_family)
    sha = a.manifest.backbone.sha256
    before = BACKBONES.refs(sha, "cpu")  # other tests' families may hold this backbone too
    bb_a, bb_b = a.backbone("cpu"), b.backbone("cpu")
    assert bb_a is bb_b  # loaded once for the process
    assert BACKBONES.refs(sha, "cpu") == before + 2
    a.backbone("cpu")  # a Family holds one reference per device, however often it asks
    assert BACKBONES.refs(sha, "cpu") == before + 2
    a.release("cpu")
    assert BACKBONES.refs(sha, "cpu") == before + 1  # b still holds it
    b.release("cpu")
    assert BACKBONES.refs(sha, "cpu") == before
    if before == 0:
        assert (sha, "cpu") not in BACKBONES.resident()  # the last reference freed it
    a.close()
    b.close()


def test_last_release_frees_a_private_backbone(tmp_path: Path) -> None:
    from conftest import FAMILY

    wfactor.factor([f"lora={FAMILY / 'lora'}"], base=str(FAMILY / "top_ft"), out=tmp_path / "fam")
    fam = wfactor.open_family(tmp_path / "fam")
    sha = fam.manifest.backbone.sha256
    assert BACKBONES.refs(sha, "cpu") == 0
    fam.backbone("cpu")
    assert (sha, "cpu") in BACKBONES.resident()
    fam.close()  # close releases every device
    assert (sha, "cpu") not in BACKBONES.resident()


def test_backbone_tensors_are_views_of_one_buffer_and_equal_the_file(lossless_family: Path) -> None:
    from safetensors.torch import load_file

    fam = wfactor.open_family(lossless_family)
    bb = fam.backbone("cpu")
    ref = load_file(str(lossless_family / "backbone.safetensors"))
    assert set(bb) == set(ref) and all(bitwise_equal(bb[k], ref[k]) for k in ref)
    storages = {t.untyped_storage().data_ptr() for t in bb.values()}
    assert len(storages) == 1
    fam.close()


def test_flipped_backbone_byte_is_refused_while_loading(tmp_path: Path) -> None:
    from conftest import FAMILY

    # a private backbone (no other test holds one with this digest), then one flipped byte
    wfactor.factor([f"lora={FAMILY / 'lora'}"], base=str(FAMILY / "full_ft"), out=tmp_path / "f")
    p = tmp_path / "f" / "backbone.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x10
    p.write_bytes(bytes(data))
    fam = wfactor.open_family(tmp_path / "f")
    sha = fam.manifest.backbone.sha256
    with pytest.raises(IntegrityError, match="sha256"):
        fam.backbone("cpu")
    assert BACKBONES.refs(sha, "cpu") == 0 and not fam._held
    assert not fam.verify().ok


def test_a_resident_backbone_is_found_by_content(lossless_family: Path, tmp_path: Path) -> None:
    """Backbones are shared by digest: a second family with the same backbone reuses the resident tensors
    and reads nothing; `verify` still hashes that family's own file."""
    import shutil

    a = wfactor.open_family(lossless_family)
    bb = a.backbone("cpu")
    shutil.copytree(lossless_family, tmp_path / "copy")
    b = wfactor.open_family(tmp_path / "copy")
    assert b.backbone("cpu") is bb
    a.close()
    b.close()


def test_second_member_moves_only_its_delta_and_cached_members_move_nothing(lossy_family: Path) -> None:
    fam = wfactor.open_family(lossy_family)
    fam.backbone("cpu")
    first = fam.state_dict("lora")
    assert fam.last_delta_bytes == fam.member("lora").delta.size
    fam.state_dict("top_ft")
    assert fam.last_delta_bytes == fam.member("top_ft").delta.size
    again = fam.state_dict("lora")
    assert fam.last_delta_bytes == 0
    assert all(bitwise_equal(first[k], again[k]) for k in first)
    fam.close()


def test_copy_gives_private_tensors(lossy_family: Path) -> None:
    fam = wfactor.open_family(lossy_family)
    bb = fam.backbone("cpu")
    shared = fam.state_dict("top_ft")
    private = fam.state_dict("top_ft", copy=True)
    k = "layers.0.self_attn.q_proj.weight"
    assert shared[k].data_ptr() == bb[k].data_ptr()
    assert private[k].data_ptr() != bb[k].data_ptr() and bitwise_equal(private[k], bb[k])
    fam.close()


def test_delta_lru_stays_within_its_byte_budget() -> None:
    cache = DeltaCache(max_bytes=1000)
    t = {"x": torch.zeros(100, dtype=torch.float32)}  # 400 bytes
    cpu = torch.device("cpu")
    for name in ("a", "b", "c"):
        cache.put(name, cpu, dict(t))
        assert cache.used <= 1000
    assert ("a", "cpu") not in cache and ("b", "cpu") in cache and ("c", "cpu") in cache
    assert cache.get("b", cpu) is not None  # b becomes most recent
    cache.put("d", cpu, dict(t))
    assert ("c", "cpu") not in cache and ("b", "cpu") in cache
    cache.put("huge", cpu, {"x": torch.zeros(1000)})  # larger than the cache: not kept, nothing evicted
    assert ("huge", "cpu") not in cache and cache.used == 800


def test_family_lru_evicts_by_bytes(lossy_family: Path) -> None:
    fam = wfactor.open_family(lossy_family, delta_cache_bytes=200_000)
    for m in ("full_ft", "top_ft", "lora", "bf16"):
        fam.state_dict(m)
        assert fam.delta_cache.used <= 200_000
    fam.close()
