"""Integrity on open (spec/FORMAT.md section 9): one flipped byte anywhere in a family is caught before a
wrong tensor is returned, on every path to a tensor (state_dict with and without a resident backbone,
iter_tensors, materialize with its config files, wfactor.torch.attach), and `verify` reports it.

Every file of a small family (manifest, backbone, deltas, aux files) has bytes flipped at positions spread
over its header and its data; after each flip every path must return exactly the intact family's tensors
or raise a WfactorError.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tinylm
import torch
from conftest import FAMILY

import wfactor
import wfactor.torch as wt
from wfactor.errors import IntegrityError, WfactorError
from wfactor.format.safetensors_io import SafetensorsFile
from wfactor.loader import BACKBONES
from wfactor.tensors import bitwise_equal

MEMBERS = ["lora", "top_ft"]
FLIPS_PER_FILE = 12
AUX_FLIPS = 4


def _model(member: str) -> torch.nn.Module:
    cfg = tinylm.TinyLMConfig.from_dict(json.loads((FAMILY / member / "config.json").read_text()))
    torch.manual_seed(0)
    return tinylm.TinyLM(cfg).eval()


def _ids() -> torch.Tensor:
    return tinylm.encode(tinylm.eval_texts(2), max_len=16)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "fam"
    wfactor.factor([f"{m}={FAMILY / m}" for m in MEMBERS], base=str(FAMILY / "base"), out=out)
    return out


@pytest.fixture(scope="module")
def reference(family: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """What the intact family returns on every path."""
    ref: dict[str, object] = {}
    with wfactor.open_family(family) as fam:
        for m in MEMBERS:
            ref[m] = fam.state_dict(m)
            out = tmp_path_factory.mktemp("ref") / m
            fam.materialize(m, out)
            ref[f"materialized:{m}"] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        with torch.no_grad():
            ref["logits"] = wt.attach(_model("lora"), fam, "lora")(_ids())
        fam.release("cpu")
    return ref


def _positions(path: Path, rng: random.Random) -> list[int]:
    """Positions spread over the file: its first bytes, its header (safetensors), its data, its end."""
    size = path.stat().st_size
    fixed = [0, 3, size // 2, size - 1]
    if path.suffix == ".safetensors":
        with SafetensorsFile(path) as f:
            start = f.data_start
        fixed += [8, 9, start // 2, start - 1, start, start + 1]
        picks = [rng.randrange(8, start) for _ in range(4)] + [rng.randrange(start, size) for _ in range(4)]
    else:
        picks = [rng.randrange(size) for _ in range(8)]
    spread = sorted({p for p in fixed + picks if 0 <= p < size})
    return (
        spread[:: max(1, len(spread) // AUX_FLIPS)][:AUX_FLIPS]
        if path.parent.parent.name == "aux"
        else spread[:FLIPS_PER_FILE]
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(bitwise_equal(got[k], want[k]) for k in want)


def _paths(root: Path, rel: str, ref: dict[str, object], scratch: Path, k: int) -> list[tuple[str, Callable[[], bool]]]:
    """(path name, a call that returns True when the result is exactly the intact one): state_dict on every
    flip plus one of the other paths in turn; an aux file is read only by materialize."""

    def state_dict() -> bool:
        with wfactor.open_family(root) as fam:
            return all(_same_state(fam.state_dict(m), ref[m]) for m in MEMBERS)  # type: ignore[arg-type]

    def resident() -> bool:
        with wfactor.open_family(root) as fam:
            fam.backbone("cpu")
            return all(_same_state(fam.state_dict(m, copy=True), ref[m]) for m in MEMBERS)  # type: ignore[arg-type]

    def iter_tensors() -> bool:
        with wfactor.open_family(root) as fam:
            return all(_same_state(dict(fam.iter_tensors(m)), ref[m]) for m in MEMBERS)  # type: ignore[arg-type]

    def materialize() -> bool:
        member = rel.split("/")[1] if rel.startswith("aux/") else MEMBERS[k % 2]
        out = scratch / f"m{k}"
        try:
            with wfactor.open_family(root) as fam:
                fam.materialize(member, out)
            return {p.name: p.read_bytes() for p in sorted(out.iterdir())} == ref[f"materialized:{member}"]
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def attach() -> bool:
        with wfactor.open_family(root) as fam, torch.no_grad():
            logits = wt.attach(_model("lora"), fam, "lora")(_ids())
        return bitwise_equal(logits, ref["logits"])  # type: ignore[arg-type]

    if rel.startswith("aux/"):
        return [("materialize", materialize)]
    others = [("state_dict+resident", resident), ("iter_tensors", iter_tensors), ("materialize", materialize)]
    others.append(("attach", attach))
    return [("state_dict", state_dict), others[k % len(others)]]


def test_every_flipped_byte_is_caught_before_a_wrong_tensor(
    family: Path, reference: dict[str, object], tmp_path: Path
) -> None:
    rng = random.Random(5)
    flips = caught = exact = 0
    per_file: dict[str, set[str]] = {}
    wrong: list[str] = []
    k = 0
    for path in _files(family):
        rel = path.relative_to(family).as_posix()
        for pos in _positions(path, rng):
            mask = rng.choice([0x01, 0x80, rng.randrange(1, 256)])
            data = bytearray(path.read_bytes())
            data[pos] ^= mask
            path.write_bytes(bytes(data))
            try:
                flips += 1
                for what, call in _paths(family, rel, reference, tmp_path, k):
                    try:
                        ok = call()
                    except WfactorError as exc:
                        caught += 1
                        per_file.setdefault(rel, set()).add(exc.code)
                        continue
                    if ok:
                        exact += 1
                    else:
                        wrong.append(f"{rel} byte {pos} ^ {mask:#04x}: {what} returned a wrong result")
                k += 1
                if rel != "wfactor.json":  # verify checks every byte of every file the manifest lists
                    try:
                        with wfactor.open_family(family) as fam:
                            assert not fam.verify().ok, f"verify missed {rel} byte {pos} ^ {mask:#04x}"
                    except WfactorError:
                        pass
            finally:
                data[pos] ^= mask
                path.write_bytes(bytes(data))
    assert not wrong, wrong[:5]
    assert flips >= 4 * FLIPS_PER_FILE, flips
    # every file took part and damage to every tensor-bearing file was caught
    files = {p.relative_to(family).as_posix() for p in _files(family)}
    assert files - {"wfactor.json"} <= set(per_file), sorted(files - set(per_file))
    assert caught > 0 and exact > 0  # flips in the manifest's informative fields change nothing


def test_open_checks_sizes_without_reading_data(family: Path, tmp_path: Path) -> None:
    """Opening checks every listed file's size (a truncated or grown file is refused at once); digests are
    checked when the data is first used."""
    copy = tmp_path / "fam"
    shutil.copytree(family, copy)
    delta = copy / "deltas" / "top_ft.safetensors"
    with open(delta, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match="size"):
        wfactor.open_family(copy)
    aux = next((copy / "aux" / "lora").iterdir())
    shutil.copytree(family, tmp_path / "fam2")
    aux2 = tmp_path / "fam2" / aux.relative_to(copy)
    aux2.write_bytes(aux2.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="size"):
        wfactor.open_family(tmp_path / "fam2")


class HashCounter:
    """Counts the files whose bytes are SHA-256 hashed: whole-file checks (``stamps.file_matches``) and files
    hashed while they are read (``stamps.read_exact`` with a hasher: the backbone, deltas read whole)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from wfactor.format import stamps

        self.names: list[str] = []
        real_hash, real_read = stamps.hash_open_file, stamps.read_exact

        def hashing(fh: Any, *a: Any) -> str:
            self.names.append(Path(fh.name).name)
            return real_hash(fh, *a)

        def reading(fh: Any, view: Any, hasher: Any = None, path: str = "file", offset: int = 0) -> None:
            if hasher is not None:
                self.names.append(Path(path).name)
            real_read(fh, view, hasher, path, offset)

        monkeypatch.setattr(stamps, "hash_open_file", hashing)
        monkeypatch.setattr(stamps, "read_exact", reading)

    def count(self, name: str) -> int:
        return sum(n == name for n in self.names)


def _settled_copy(family: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the family whose files count as settled for stamps (no one-second wait in tests), and a
    process-wide backbone registry of its own: a backbone of the same digest that another test's Family
    holds would otherwise be shared (already verified) instead of read from this copy."""
    import wfactor.family as fmod
    from wfactor.format import stamps
    from wfactor.loader import BackboneRegistry

    shutil.copytree(family, dest)
    monkeypatch.setattr(stamps, "SETTLE_NS", 0)
    monkeypatch.setattr(fmod, "BACKBONES", BackboneRegistry())
    return dest


def test_backbone_hashed_at_most_once_per_family(family: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With stamps off, the backbone's SHA-256 is computed exactly once per opened family, not per tensor or
    per member, on both paths (resident and per tensor)."""
    monkeypatch.setenv("WFACTOR_VERIFY", "always")
    hashes = HashCounter(monkeypatch)
    with wfactor.open_family(family) as fam:
        assert not hashes.names  # opening reads no data
        for m in MEMBERS:
            fam.state_dict(m)
            fam.state_dict(m)
    assert hashes.count("backbone.safetensors") == 1, hashes.names
    with wfactor.open_family(family) as fam:
        # a backbone another Family of this process holds is shared, not read (or hashed) again
        resident = BACKBONES.refs(fam.manifest.backbone.sha256, "cpu") > 0
        fam.backbone("cpu")
        for m in MEMBERS:
            fam.state_dict(m)
    assert hashes.count("backbone.safetensors") == (1 if resident else 2), hashes.names


def test_stamps_skip_rehashing_unchanged_files(family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file verified once and unchanged since is not hashed again on load, on either path to the backbone
    and for deltas; the tensors are the same. `verify` ignores stamps and hashes every file."""
    fam_dir = _settled_copy(family, tmp_path / "fam", monkeypatch)
    with wfactor.open_family(fam_dir) as fam:
        first = {m: fam.state_dict(m) for m in MEMBERS}
    hashes = HashCounter(monkeypatch)
    with wfactor.open_family(fam_dir) as fam:
        fam.backbone("cpu")
        for m in MEMBERS:
            got = fam.state_dict(m)
            assert all(bitwise_equal(got[k], first[m][k]) for k in got)
    with wfactor.open_family(fam_dir) as fam:
        list(fam.iter_tensors("lora"))
    assert hashes.names == [], hashes.names
    with wfactor.open_family(fam_dir) as fam:
        assert fam.verify().ok
    assert hashes.count("backbone.safetensors") == 1
    assert hashes.count("lora.safetensors") >= 1 and hashes.count("top_ft.safetensors") >= 1


def test_stamps_never_vouch_for_a_changed_file(family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a stamp is recorded, a flipped byte in the backbone or a delta is caught on load (the write
    changed the file's ctime), on the resident path, the per-tensor path and attach; and a file rewritten
    with its original bytes is hashed again, not trusted."""
    fam_dir = _settled_copy(family, tmp_path / "fam", monkeypatch)
    with wfactor.open_family(fam_dir) as fam:
        fam.backbone("cpu")
        fam.state_dict("lora")
    for rel in ("backbone.safetensors", "deltas/lora.safetensors"):
        path = fam_dir / rel
        good = path.read_bytes()
        bad = bytearray(good)
        bad[-3] ^= 0x10
        path.write_bytes(bytes(bad))
        with wfactor.open_family(fam_dir) as fam, pytest.raises(IntegrityError, match="sha256"):
            fam.backbone("cpu")
            fam.state_dict("lora")
        with wfactor.open_family(fam_dir) as fam, pytest.raises(IntegrityError, match="sha256"):
            list(fam.iter_tensors("lora"))
        with wfactor.open_family(fam_dir) as fam, pytest.raises(IntegrityError, match="sha256"):
            wt.attach(_model("lora"), fam, "lora")
        path.write_bytes(good)  # the right bytes again: hashed (a new ctime), then trusted
        hashes = HashCounter(monkeypatch)
        with wfactor.open_family(fam_dir) as fam:
            fam.state_dict("lora")
        assert hashes.count(path.name) == 1, hashes.names
        monkeypatch.undo()
        _settled_copy(family, tmp_path / f"again-{path.name}", monkeypatch)  # the same patches again


def test_stamps_need_a_settled_file_and_can_be_turned_off(
    family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stamp is recorded for a file changed within SETTLE_NS (a write in the same timestamp tick could
    keep its ctime); WFACTOR_VERIFY=always hashes on every open; an unusable cache only costs the hash
    (stamps then last as long as the process)."""
    from wfactor.format import stamps

    fam_dir = tmp_path / "fam"
    shutil.copytree(family, fam_dir)
    monkeypatch.setattr(stamps, "SETTLE_NS", 3600 * 10**9)
    hashes = HashCounter(monkeypatch)
    for _ in range(2):
        with wfactor.open_family(fam_dir) as fam:
            fam.state_dict("lora")
    assert hashes.count("backbone.safetensors") == 2 and hashes.count("lora.safetensors") == 2

    monkeypatch.setattr(stamps, "SETTLE_NS", 0)
    monkeypatch.setenv("WFACTOR_VERIFY", "always")
    for _ in range(2):
        with wfactor.open_family(fam_dir) as fam:
            fam.state_dict("lora")
    assert hashes.count("backbone.safetensors") == 4

    monkeypatch.delenv("WFACTOR_VERIFY")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("WFACTOR_CACHE", str(blocker))
    stamps.forget_memo()
    for _ in range(2):  # the stamp could not be written: kept for this process only
        with wfactor.open_family(fam_dir) as fam:
            fam.state_dict("lora")
    assert hashes.count("backbone.safetensors") == 5
    stamps.forget_memo()  # as a new process would: nothing on disk vouches for it
    with wfactor.open_family(fam_dir) as fam:
        fam.state_dict("lora")
    assert hashes.count("backbone.safetensors") == 6
    stamps.forget_memo()


def test_damaged_file_after_open_is_caught_at_use(family: Path, tmp_path: Path) -> None:
    """A delta damaged after the family was opened is caught when it is read (its digest is checked on each
    read), and the backbone digest of a not-yet-used backbone is checked at first use."""
    copy = tmp_path / "fam"
    shutil.copytree(family, copy)
    with wfactor.open_family(copy) as fam:
        delta = copy / "deltas" / "lora.safetensors"
        data = bytearray(delta.read_bytes())
        data[-1] ^= 0x40
        delta.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):  # streaming: the backbone is not used before the delta is read
            fam.state_dict("lora", resident=False)
        bb = copy / "backbone.safetensors"
        data = bytearray(bb.read_bytes())
        data[-5] ^= 0x01
        bb.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            fam.state_dict("top_ft", resident=False)
        with pytest.raises(IntegrityError):  # and loaded resident (the default), it is hashed as it is read
            fam.state_dict("top_ft")


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_overlapped_hashing_equals_sha256(tmp_path: Path, size: int) -> None:
    """Whole-file checks read chunk k+1 while chunk k is hashed (two buffers, a second thread), and files read
    for loading are hashed as they are read: both give SHA-256 of the bytes, at every chunk boundary."""
    import hashlib

    import numpy as np

    from wfactor.format import stamps

    data = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        assert stamps.hash_open_file(fh, chunk=4096) == hashlib.sha256(data).hexdigest()
    real_chunk = stamps.READ_CHUNK
    try:
        stamps.READ_CHUNK = 4096
        out = np.empty(size, dtype=np.uint8)
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as fh:
            stamps.read_exact(fh, out.data.cast("B"), h, str(path))
        assert h.hexdigest() == hashlib.sha256(data).hexdigest() and out.tobytes() == data
        with open(path, "rb", buffering=0) as fh, pytest.raises(IntegrityError, match="ended after"):
            stamps.read_exact(fh, np.empty(size + 1, dtype=np.uint8).data.cast("B"), hashlib.sha256(), str(path))
    finally:
        stamps.READ_CHUNK = real_chunk
