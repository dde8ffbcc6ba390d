"""Loading: one backbone per (backbone, device) in the process, reference-counted; a byte-bounded delta LRU."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import wfactor
from wfactor.errors import IntegrityError, WfactorError
from wfactor.format import manifest as manifest_mod
from wfactor.format import parts as parts_mod
from wfactor.format.safetensors_io import SafetensorsFile
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


def test_delta_is_read_from_the_file_that_was_checked(
    lossy_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta replaced by another (valid, for the same backbone) right after its digest was checked is not
    what gets decoded: the check and the reads use one open file, not the path twice."""
    fam_dir = tmp_path / "fam"
    shutil.copytree(lossy_family, fam_dir)
    with wfactor.open_family(fam_dir) as fam:
        want = fam.state_dict("lora")
        fam.delta_cache.clear()
        lora, other = fam_dir / fam.member("lora").delta.path, fam_dir / fam.member("top_ft").delta.path
        real = manifest_mod.open_file_matches

        def check_then_swap(fh: Any, sha256: str, use_stamps: bool = True) -> str:
            got = real(fh, sha256, use_stamps)
            if Path(fh.name) == lora:
                swapped = tmp_path / "swap"
                shutil.copyfile(other, swapped)
                swapped.replace(lora)  # a rename over the path, as a deploy script would
            return got

        monkeypatch.setattr(manifest_mod, "open_file_matches", check_then_swap)
        got = fam.state_dict("lora")
        assert got.keys() == want.keys() and all(bitwise_equal(got[k], want[k]) for k in want)
        monkeypatch.undo()
        fam.delta_cache.clear()
        with pytest.raises(IntegrityError):  # the next read checks what is now at the path
            fam.state_dict("lora")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pipelined_rebuild_equals_the_tensor_by_tensor_path(
    lossy_family: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state_dict rebuilds tensor k while later parts decode on threads: the same tensors as iter_tensors
    (one part at a time, no threads), whatever the thread count, and every part ends up in the LRU."""
    monkeypatch.setattr(parts_mod, "DECODE_THREADS", threads)
    monkeypatch.setattr(parts_mod, "PARALLEL_MIN_BYTES", 0)  # the fixture's deltas are small: threads anyway
    with wfactor.open_family(lossy_family) as fam:
        fam.backbone("cpu")
        for m in ("full_ft", "bf16", "vocab_grown", "unrelated"):
            got = fam.state_dict(m)
            want = dict(fam.iter_tensors(m))
            assert list(got) == list(want) and all(bitwise_equal(got[k], want[k]) for k in want)
            records, cached = fam.load_delta(m)
            assert fam.last_delta_bytes == 0  # from the LRU
            assert set(cached) == {s.key for r in records.values() for s in r.part_specs()}


def test_a_part_that_fails_to_decode_stops_the_pipeline_with_its_error(
    lossy_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt part met midway through a pipelined rebuild raises the one-line error naming its tensor,
    leaves nothing in the LRU, and the family stays usable for the other members."""
    monkeypatch.setattr(parts_mod, "PARALLEL_MIN_BYTES", 0)
    fam_dir = tmp_path / "fam"
    shutil.copytree(lossy_family, fam_dir)
    man = json.loads((fam_dir / "wfactor.json").read_text())
    entry = next(m for m in man["members"] if m["name"] == "full_ft")
    path = fam_dir / entry["delta"]["path"]
    with SafetensorsFile(path) as f:
        info = max(f.tensors.values(), key=lambda i: i.nbytes)  # a large zstd part, late in no particular order
        start = f.data_start + info.begin
    data = bytearray(path.read_bytes())
    data[start : start + 4] = b"\0\0\0\0"  # its zstd magic number
    path.write_bytes(bytes(data))
    entry["delta"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (fam_dir / "wfactor.json").write_text(json.dumps(man, indent=1))
    with wfactor.open_family(fam_dir) as fam:
        with pytest.raises(WfactorError, match=rf"full_ft\.safetensors: tensor .*part {info.name!r}.*zstd"):
            fam.state_dict("full_ft")
        assert ("full_ft", "cpu") not in fam.delta_cache
        assert fam.state_dict("lora")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_round_trips_and_is_reused(lossy_family: Path) -> None:  # pragma: no cover - GPU only
    """On a GPU: parts and backbones go through the process's two pinned buffers (allocated once), arrays
    larger than a buffer in several chunks, every dtype bit for bit, and the rebuilt member equals the CPU one."""
    import numpy as np

    from wfactor import loader

    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, size=loader.CHUNK_BYTES + 12345, dtype=np.uint8)
    for arr, dtype in (
        (big, "U8"),
        (rng.standard_normal((3, 5)).astype(np.float32), "F32"),
        (rng.integers(0, 1 << 16, size=(7,), dtype=np.uint16), "BF16"),
        (np.zeros((0, 4), dtype=np.float32), "F32"),
    ):
        got = loader.to_device(arr, dtype, dev)
        want = loader.to_device(arr, dtype, torch.device("cpu"))
        assert got.device.type == "cuda" and got.dtype == want.dtype and got.shape == want.shape
        assert bitwise_equal(got.cpu(), want)
    bufs = loader.STAGING._bufs
    assert bufs is not None and all(b.is_pinned() for b in bufs)
    with wfactor.open_family(lossy_family) as fam:
        fam.backbone(dev)
        for m in ("full_ft", "bf16"):
            gpu, cpu = fam.state_dict(m, dev), fam.state_dict(m)
            for k in cpu:  # GPU arithmetic may round differently (spec 5.3); staging errors would not be small
                g, c = gpu[k].cpu().double(), cpu[k].double()
                tol = 1e-2 * float(c.abs().max(initial=0)) + 1e-6
                assert g.shape == c.shape and float((g - c).abs().max(initial=0)) <= tol
    assert loader.STAGING._bufs is bufs  # reused, not allocated per load
