"""Conformance: every case of fixtures/invalid/ (one rule of spec/FORMAT.md broken per case) is refused with
the error code of its CASES.json entry, by the library, by its command line and by the reference reader
(tests/reference_reader.py); the control case is rebuilt identically by both. Also: the committed cases
are exactly what fixtures/make_invalid.py writes, the limits of section 7 are checked before anything is
allocated, and a zstd frame never makes a reader allocate more than the part it declares."""

from __future__ import annotations

import json
import os
import struct
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from conftest import invoke, one_line_error, zstd_spy_class

ROOT = Path(__file__).resolve().parents[1]
INVALID = ROOT / "fixtures" / "invalid"
for p in (str(ROOT / "tests"), str(ROOT / "fixtures")):
    if p not in sys.path:
        sys.path.insert(0, p)

import make_invalid  # noqa: E402
import reference_reader as rr  # noqa: E402

import wfactor  # noqa: E402

CASES: list[dict[str, Any]] = json.loads((INVALID / "CASES.json").read_text(encoding="utf-8"))
BY_NAME = {c["name"]: c for c in CASES}
IDS = [c["name"] for c in CASES]


def lib_code(family: Path, member: str) -> str | None:
    """The library's error code for rebuilding ``member``, through state_dict and through the streaming
    path (materialize/verify), which must agree; None if both succeed."""
    import wfactor
    from wfactor.errors import WfactorError

    codes = []
    for path in ("state_dict", "iter_tensors"):
        try:
            with wfactor.open_family(family) as fam:
                if path == "state_dict":
                    fam.state_dict(member)
                else:
                    list(fam.iter_tensors(member))
            codes.append(None)
        except WfactorError as exc:
            assert "\n" not in str(exc), exc
            codes.append(exc.code)
    assert codes[0] == codes[1], codes
    return codes[0]


def ref_code(family: Path, member: str) -> str | None:
    try:
        rr.open_family(family).state_dict(member)
    except rr.RefError as exc:
        return exc.code
    return None


def test_cases_index() -> None:
    from wfactor.errors import ERROR_CODES

    dirs = {p.name for p in INVALID.iterdir() if p.is_dir()}
    assert dirs == set(BY_NAME), dirs ^ set(BY_NAME)
    assert len(IDS) == len(BY_NAME) >= 100
    for c in CASES:
        assert c["code"] is None or c["code"] in ERROR_CODES, c
        assert c["rule"] and c["section"] and c["member"] == "m", c
        if c["file"]:
            assert os.path.lexists(INVALID / c["family"] / c["file"]), c
    assert [c["name"] for c in CASES if c["code"] is None] == [
        "valid",
        "valid_bitplanes",
        "valid_low_precision",
        "valid_requant",
        "valid_towers",
    ]
    # every error code a file can provoke has a case
    assert {c["code"] for c in CASES} >= {
        "not_safetensors", "format", "limit", "version", "codec", "integrity", "backbone_mismatch", "not_found"
    }  # fmt: skip
    total = sum(p.lstat().st_size for p in INVALID.rglob("*") if not p.is_dir())
    assert total < 1_000_000, total


def _tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def test_regenerating_gives_identical_bytes(tmp_path: Path) -> None:
    make_invalid.build_all(tmp_path / "invalid")
    mine, committed = _tree(tmp_path / "invalid"), _tree(INVALID)
    assert sorted(mine) == sorted(committed)
    changed = [k for k in mine if mine[k] != committed[k]]
    assert not changed, f"fixtures/invalid is stale; run `python fixtures/make_invalid.py` ({changed[:5]})"


@pytest.mark.parametrize("name", IDS)
def test_library_raises_the_expected_code(name: str) -> None:
    import wfactor
    from wfactor.errors import WfactorError

    c = BY_NAME[name]
    assert lib_code(INVALID / c["family"], c["member"]) == c["code"]
    # verify() reports what it finds instead of raising, once the family opens
    try:
        with wfactor.open_family(INVALID / c["family"]) as fam:
            report = fam.verify()
    except WfactorError as exc:
        assert exc.code == c["code"]
    else:
        assert report.ok == (c["code"] is None), report.problems


@pytest.mark.parametrize("name", IDS)
def test_reference_reader_raises_the_expected_code(name: str) -> None:
    c = BY_NAME[name]
    assert ref_code(INVALID / c["family"], c["member"]) == c["code"]


@pytest.mark.parametrize("name", IDS)
def test_cli_reports_one_line(name: str, tmp_path: Path) -> None:
    c = BY_NAME[name]
    code, _out, err = invoke("materialize", str(INVALID / c["family"]), c["member"], "-o", str(tmp_path / "out"))
    if c["code"] is None:
        assert code == 0, err
    else:
        one_line_error(err, c["code"])
        assert code == (1 if c["code"] in ("integrity", "backbone_mismatch") else 2)
        assert not (tmp_path / "out" / "model.safetensors").exists()


def _as_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8).numpy()
    out: np.ndarray = t.numpy()
    return out


@pytest.mark.parametrize("control", ["valid", "valid_bitplanes", "valid_low_precision", "valid_towers"])
def test_control_case_is_rebuilt_identically(control: str) -> None:
    import wfactor

    fam = INVALID / control
    with wfactor.open_family(fam) as lib:
        mine = {k: _as_numpy(v) for k, v in lib.state_dict("m").items()}
    ref = rr.open_family(fam)
    theirs = ref.state_dict("m")
    records = {r["name"]: r for r in ref.records("m")}
    assert list(mine) == list(theirs) == list(records)
    for name, a in mine.items():
        b = theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if any(t["codec"] == "lowrank" for t in records[name]["terms"]):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        else:
            assert a.tobytes() == b.tobytes(), name
    # the control exercises what the cases break
    codecs = {t["codec"] for r in records.values() for t in r["terms"]}
    v4 = {"rescale"} if control == "valid_low_precision" else set()
    assert codecs == {"dense", "lowrank", "sparse", "quant"} | v4
    if control == "valid_low_precision":
        assert {r["dtype"] for r in records.values()} >= {"F8_E4M3", "F8_E5M2", "U16"}
    encodings = {p["encoding"] for r in records.values() for t in r["terms"] for p in t["parts"].values()}
    # the bit-plane control stores the quant codes, its only zstd part, as planes
    want = {"raw", "zstd_planes", "bitplanes"} if control == "valid_bitplanes" else {"raw", "zstd", "zstd_planes"}
    assert encodings == want
    if control == "valid_towers":  # every name differs from its base's: the records' base names are followed
        assert all(name.startswith("lm.") for name in records)
        assert all(r["base"] is None or r["base"].startswith(("text/", "vision/")) for r in records.values())
        assert {n.split("/")[0] for n in ref.backbone().entries} == {"text", "vision"}
    assert any(r.get("same_as") for r in records.values()) and any(r.get("residual") for r in records.values())


# -- limits too large to commit as files ------------------------------------------------------------------
def _copy_valid(dst: Path) -> Path:
    import shutil

    shutil.copytree(INVALID / "valid", dst)
    return dst


def _rewrite_manifest(fam: Path, edit: Any) -> None:
    obj = json.loads((fam / "wfactor.json").read_text())
    edit(obj)
    (fam / "wfactor.json").write_text(json.dumps(obj))


def test_too_many_members_is_a_limit(tmp_path: Path) -> None:
    fam = _copy_valid(tmp_path / "fam")
    _rewrite_manifest(
        fam,
        lambda m: m.update(
            members=[{"name": f"m{i}", "delta": m["members"][0]["delta"], "tensors": []} for i in range(10_001)]
        ),
    )
    assert lib_code(fam, "m0") == "limit"
    assert ref_code(fam, "m0") == "limit"


def test_manifest_over_64_mib_is_refused_before_reading(tmp_path: Path) -> None:
    fam = _copy_valid(tmp_path / "fam")
    with open(fam / "wfactor.json", "r+b") as fh:
        fh.truncate(64 * 1024 * 1024 + 1)  # a sparse file: nothing is written, nothing must be read
    tracemalloc.start()
    try:
        assert lib_code(fam, "m") == "limit"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert ref_code(fam, "m") == "limit"


@pytest.mark.parametrize(
    "limit, lib_attr, ref_attr",
    [
        (8, "wfactor.format.safetensors_io.MAX_TENSORS", "MAX_TENSORS"),  # the delta holds 9 tensors
        (8, "wfactor.format.delta.MAX_TENSORS", "MAX_TENSORS"),  # and 9 records
        (4, "wfactor.format.manifest.MAX_TENSORS", "MAX_TENSORS"),  # the member lists 9 tensors
    ],
)
def test_count_limits_are_enforced(monkeypatch: pytest.MonkeyPatch, limit: int, lib_attr: str, ref_attr: str) -> None:
    """Counts of a million are too large for a fixture; the same check, with the limit lowered, is not."""
    fam = INVALID / "valid"
    assert lib_code(fam, "m") is None
    monkeypatch.setattr(lib_attr, limit)
    assert lib_code(fam, "m") == "limit"
    monkeypatch.setattr(rr, ref_attr, limit)
    assert ref_code(fam, "m") == "limit"


def test_header_declaring_a_huge_tensor_allocates_nothing(tmp_path: Path) -> None:
    from wfactor.errors import LimitError, NotSafetensorsError
    from wfactor.format.safetensors_io import SafetensorsFile

    cases = {
        "numel": ({"t": {"dtype": "F64", "shape": [1 << 30, 1 << 11], "data_offsets": [0, 8]}}, LimitError),
        "bytes": ({"t": {"dtype": "F64", "shape": [1 << 37], "data_offsets": [0, 1 << 40]}}, NotSafetensorsError),
        "header": (None, NotSafetensorsError),
    }
    for name, (header, err) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        if header is None:
            p.write_bytes(struct.pack("<Q", (1 << 63) + 5) + b"{}")
        else:
            raw = json.dumps(header).encode()
            p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
        tracemalloc.start()
        try:
            with pytest.raises(err):
                SafetensorsFile(p)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (name, peak)


# -- decompression: never more than the part needs --------------------------------------------------------
def _bomb(declared: int, real: int) -> bytes:
    """A frame that declares ``declared`` bytes and holds ``real`` (RLE blocks: a few bytes on disk)."""
    blocks, left = [], real
    while left:
        n = min(left, 1 << 17)
        blocks.append((0x41, n))
        left -= n
    return make_invalid.zframe(b"", declared, rle=blocks)


@pytest.mark.parametrize("declared", [0, 24, 4096])
def test_a_bomb_allocates_at_most_the_declared_size(declared: int) -> None:
    from wfactor.errors import CodecError
    from wfactor.format.parts import decode_zstd_frame

    frame = _bomb(declared, 64 << 20)  # 64 MiB of content behind a small declared size
    assert len(frame) < 4096
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode_zstd_frame(frame, declared, "t")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= declared + 64 * 1024, peak
    with pytest.raises(rr.RefError) as exc:  # the reference reader too refuses it
        rr._decode_part(
            {"key": "k", "dtype": "U8", "shape": [declared], "encoding": "zstd"},
            rr.SafetensorsFile(_single_u8("k", frame)),
        )
    assert exc.value.code == "codec"


def _single_u8(key: str, data: bytes) -> bytes:
    raw = json.dumps({key: {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_valid_frames_decode_into_one_buffer_of_the_declared_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode asks zstd for exactly the declared size as its output limit, and the peak allocation is
    that output plus a small constant."""
    import wfactor.format.parts as parts

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(parts.zstandard, "ZstdDecompressor", zstd_spy_class(calls))
    size = 8 << 20
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(size))
    tracemalloc.start()
    try:
        out = parts.decode_zstd_frame(frame, size, "t")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out) == size and calls == [(size, size)]
    assert peak <= size + (256 << 10), peak


def test_a_consistent_family_declaring_more_than_memory_is_one_line(tmp_path: Path) -> None:
    """A family within every limit of section 7 may still declare a tensor larger than the machine's memory
    (here a grown I64 tensor of 2^39 elements, 4 TiB): rebuilding it is a one-line `memory` error naming the
    file, the tensor and its size, on every path, never a traceback."""
    from wfactor.errors import MemoryLimitError

    f = make_invalid.valid()
    for r in f.records:
        if r["name"] == "ids_grown":
            r["shape"] = [1 << 39]
    fam = tmp_path / "fam"
    f.write(fam)
    with wfactor.open_family(fam) as family:
        with pytest.raises(MemoryLimitError, match=r"tensor 'ids_grown'.*\[549755813888\] x I64.*bytes"):
            family.state_dict("m")
        with pytest.raises(MemoryLimitError, match="ids_grown"):
            list(family.iter_tensors("m"))
    code, out, err = invoke("materialize", str(fam), "m", "-o", str(tmp_path / "out"))
    assert code == 2 and one_line_error(err, "memory"), err
    assert not (tmp_path / "out" / "model.safetensors").exists()
