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

import pytest
import tinylm
import torch
from conftest import FAMILY

import wfactor
import wfactor.torch as wt
from wfactor.errors import IntegrityError, WfactorError
from wfactor.format.safetensors_io import SafetensorsFile
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


def test_backbone_hashed_once_per_family(family: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backbone's SHA-256 is computed once per opened family, not per tensor or per member."""
    import wfactor.family as fmod

    calls: list[Path] = []
    real = fmod.sha256_file

    def counting(path: Path, *a: object) -> str:
        calls.append(Path(path))
        return real(path, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(fmod, "sha256_file", counting)
    with wfactor.open_family(family) as fam:
        assert not calls  # opening reads no data
        for m in MEMBERS:
            fam.state_dict(m)
            fam.state_dict(m)
    assert sum(p.name == "backbone.safetensors" for p in calls) == 1, calls


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
        with pytest.raises(IntegrityError):
            fam.state_dict("lora")
        bb = copy / "backbone.safetensors"
        data = bytearray(bb.read_bytes())
        data[-5] ^= 0x01
        bb.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            fam.state_dict("top_ft")
