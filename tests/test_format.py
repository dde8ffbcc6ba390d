"""The format layer: safetensors limits, parts encodings, manifest and record validation."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from wfactor.errors import CodecError, FormatError, LimitError, NotSafetensorsError, VersionError
from wfactor.format.constants import DTYPES, MAX_NDIM
from wfactor.format.manifest import parse_manifest, resolve_inside
from wfactor.format.parts import PartSpec, decode_zstd_frame, encode_part, read_part_array
from wfactor.format.records import record_from_json
from wfactor.format.safetensors_io import Entry, SafetensorsFile, header_bytes, write_streaming


def raw_file(path: Path, header: object, data: bytes = b"", hlen: int | None = None) -> Path:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(h) if hlen is None else hlen) + h + data)
    return path


def test_streaming_writer_roundtrip_and_alignment(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(5, dtype=np.int8)
    c = np.arange(3, dtype=np.float64)
    arrays = {"a": (a, "F32"), "b": (b, "I8"), "c": (c, "F64")}
    entries = [Entry(k, d, v.shape) for k, (v, d) in arrays.items()]
    p = tmp_path / "x.safetensors"
    write_streaming(p, entries, lambda e: arrays[e.name][0].tobytes(), {"k": "v"})
    with SafetensorsFile(p) as f:
        assert f.metadata == {"k": "v"}
        assert f.data_start % 8 == 0
        assert [i.name for i in sorted(f.tensors.values(), key=lambda i: i.begin)] == ["c", "a", "b"]
        for k, (v, _d) in arrays.items():
            np.testing.assert_array_equal(f.numpy(k), v)
    import safetensors.numpy

    loaded = safetensors.numpy.load_file(str(p))  # any safetensors reader accepts what we write
    np.testing.assert_array_equal(loaded["a"], a)


@pytest.mark.parametrize(
    "header,data,hlen,fragment",
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "do not fit"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "after the last tensor"),
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"\0" * 3,
            None,
            "contiguous and non-overlapping",
        ),
        ({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "dtype 'Q4'"),
        ({}, b"", 1 << 40, "header declares"),
        (b'{"a": 1, "a": 2}', b"", None, "duplicate key"),
        (b"not json", b"", None, "not valid JSON"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"", None, "do not fit"),
    ],
)
def test_safetensors_reader_rejects(
    tmp_path: Path, header: object, data: bytes, hlen: int | None, fragment: str
) -> None:
    p = raw_file(tmp_path / "bad.safetensors", header, data, hlen)
    with pytest.raises(NotSafetensorsError, match=fragment) as exc:
        SafetensorsFile(p)
    assert exc.value.code == "not_safetensors"
    assert str(p) in str(exc.value)


def test_safetensors_reader_limits(tmp_path: Path) -> None:
    shape = [1] * (MAX_NDIM + 1)
    p = raw_file(tmp_path / "dims.safetensors", {"t": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(LimitError, match="at most 8 dimensions"):
        SafetensorsFile(p)
    p = raw_file(
        tmp_path / "numel.safetensors",
        {"t": {"dtype": "U8", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 1]}},
        b"\0",
    )
    with pytest.raises(LimitError, match="more than"):
        SafetensorsFile(p)
    p = raw_file(
        tmp_path / "name.safetensors", {"x" * 2000: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
    )
    with pytest.raises(LimitError, match="tensor names"):
        SafetensorsFile(p)
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(NotSafetensorsError, match="shorter than 8 bytes"):
        SafetensorsFile(tmp_path / "short")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("encoding", ["raw", "zstd", "zstd_planes"])
def test_parts_roundtrip_every_dtype(dtype: str, encoding: str) -> None:
    rng = np.random.default_rng(0)
    storage = DTYPES[dtype][0]
    # compressible: a few distinct byte values, repeated, so that zstd beats raw and the frame is kept
    arr = rng.integers(0, 3, size=(64, 16 * storage.itemsize), dtype=np.uint8).view(storage)
    if dtype == "BOOL":
        arr = arr.view(np.uint8) % 2 == 1
    spec, stored = encode_part("k", arr, dtype, encoding)
    assert spec.shape == arr.shape and spec.encoding == encoding
    out = read_part_array(spec, stored, "test")
    assert out.dtype == storage and out.tobytes() == arr.tobytes()


def test_incompressible_parts_are_stored_raw() -> None:
    arr = np.random.default_rng(1).integers(0, 255, size=(8, 8), dtype=np.uint8)
    spec, stored = encode_part("k", arr, "U8", "zstd")
    assert spec.encoding == "raw" and stored.tobytes() == arr.tobytes()


def test_zstd_planes_layout_is_as_specified() -> None:
    arr = np.array([0x0102, 0x0304] * 64, dtype="<i2")
    spec, stored = encode_part("k", arr, "I16", "zstd_planes")
    assert spec.encoding == "zstd_planes"
    plain = zstandard.ZstdDecompressor().decompress(stored.tobytes())
    assert plain == bytes([0x02, 0x04] * 64 + [0x01, 0x03] * 64)  # plane 0 = low bytes, plane 1 = high bytes


def test_zstd_frame_size_is_checked_before_decoding() -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (1 << 20))
    with pytest.raises(LimitError, match="declares 1048576 decoded bytes, the part needs 16"):
        decode_zstd_frame(bomb, 16, "t")
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 16)
    with pytest.raises(LimitError):
        decode_zstd_frame(nosize, 16, "t")
    good = zstandard.ZstdCompressor(write_content_size=True).compress(b"\1" * 16)
    assert decode_zstd_frame(good, 16, "t") == b"\1" * 16
    with pytest.raises(CodecError, match="trailing"):
        decode_zstd_frame(good + b"xx", 16, "t")
    with pytest.raises(CodecError):
        decode_zstd_frame(good[:-2], 16, "t")
    with pytest.raises(CodecError, match="not a zstd frame"):
        decode_zstd_frame(b"garbage!", 16, "t")


def manifest_obj(**over: object) -> dict[str, object]:
    ref = {"path": "backbone.safetensors", "sha256": "0" * 64, "size": 1}
    m = {"name": "a", "delta": {"path": "deltas/a.safetensors", "sha256": "1" * 64, "size": 2}, "tensors": []}
    obj: dict[str, object] = {"format": "wfactor.family", "format_version": 1, "backbone": ref, "members": [m]}
    obj.update(over)
    return obj


def test_manifest_parses_and_ignores_unknown_keys() -> None:
    man = parse_manifest(json.dumps(manifest_obj(future_key={"x": 1})), "m")
    assert man.members[0].name == "a" and man.backbone.size == 1


def test_manifest_rejects_newer_version() -> None:
    with pytest.raises(VersionError, match="file is v6; this reader supports up to v5"):
        parse_manifest(json.dumps(manifest_obj(format_version=6)), "m")


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a\\b", "./a", "a//b"])
def test_manifest_rejects_escaping_paths(path: str) -> None:
    obj = manifest_obj(backbone={"path": path, "sha256": "0" * 64, "size": 1})
    with pytest.raises(FormatError, match="path"):
        parse_manifest(json.dumps(obj), "m")


def test_symlink_out_of_family_is_refused(tmp_path: Path) -> None:
    (tmp_path / "fam").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "fam" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(FormatError, match="leads outside"):
        resolve_inside(tmp_path / "fam", "link", "t")


def test_manifest_rejects_bad_member_names_and_duplicates() -> None:
    obj = manifest_obj()
    obj["members"][0]["name"] = "../evil"  # type: ignore[index]
    with pytest.raises(FormatError, match="member name"):
        parse_manifest(json.dumps(obj), "m")
    obj = manifest_obj()
    obj["members"] = obj["members"] * 2  # type: ignore[operator]
    with pytest.raises(FormatError, match="appears twice"):
        parse_manifest(json.dumps(obj), "m")


def part(key: str, dtype: str, shape: list[int], encoding: str = "raw") -> dict[str, object]:
    return {"key": key, "dtype": dtype, "shape": shape, "encoding": encoding}


BASES = {"w": ((4, 6), "F32"), "ids": ((4, 6), "I64")}


def rec(**over: object) -> dict[str, object]:
    r: dict[str, object] = {"name": "w", "shape": [4, 6], "dtype": "F32", "base": "w", "terms": [], "residual": None}
    r.update(over)
    return r


@pytest.mark.parametrize(
    "over,fragment",
    [
        (
            {
                "terms": [
                    {
                        "codec": "lowrank",
                        "params": {"rank": 5},
                        "parts": {"u": part("u", "F16", [4, 5]), "v": part("v", "F16", [5, 6])},
                    }
                ]
            },
            "rank 5 must lie in 1..4",
        ),
        (
            {
                "terms": [
                    {
                        "codec": "lowrank",
                        "params": {"rank": 2},
                        "parts": {"u": part("u", "F16", [4, 3]), "v": part("v", "F16", [2, 6])},
                    }
                ]
            },
            "part 'u' must be",
        ),
        (
            {
                "terms": [
                    {
                        "codec": "quant",
                        "params": {"bits": 9},
                        "parts": {"codes": part("c", "I8", [4, 6]), "scales": part("s", "F32", [4])},
                    }
                ]
            },
            "bits 9",
        ),
        (
            {
                "terms": [
                    {
                        "codec": "sparse",
                        "params": {"count": 25},
                        "parts": {"indices": part("i", "I64", [25]), "values": part("v", "F16", [25])},
                    }
                ]
            },
            "count 25",
        ),
        ({"terms": [{"codec": "magic", "params": {}, "parts": {}}]}, "unknown codec 'magic'"),
        ({"base": "nope"}, "not in the backbone"),
        ({"base": None}, "needs a dense term"),
        ({"base": "ids"}, "cannot be predicted"),
        (
            {
                "terms": [
                    {
                        "codec": "lowrank",
                        "params": {"rank": 1},
                        "parts": {"u": part("u", "F16", [4, 1]), "v": part("v", "F16", [1, 6])},
                    }
                ],
                "residual": part("r", "F32", [4, 6], "zstd_planes"),
            },
            "residual cannot follow a lowrank",
        ),
        (
            {"terms": [{"codec": "dense", "params": {}, "parts": {"values": part("d", "F32", [4, 6])}}]},
            "dense term must be the only term, with base null",
        ),
    ],
)
def test_records_are_validated(over: dict[str, object], fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        record_from_json(rec(**over), BASES, "d")


def test_valid_record_parses() -> None:
    r = record_from_json(
        rec(
            terms=[
                {
                    "codec": "quant",
                    "params": {"bits": 3},
                    "parts": {"codes": part("c", "I8", [4, 6], "zstd"), "scales": part("s", "F32", [4])},
                }
            ]
        ),
        BASES,
        "d",
    )
    assert r.codec == "quant" and r.part_specs()[0] == PartSpec("c", "I8", (4, 6), "zstd")


def test_header_is_deterministic() -> None:
    e = [Entry("b", "F32", (2,)), Entry("a", "F32", (2,))]
    assert header_bytes(e, {"x": "1"}) == header_bytes(list(e), {"x": "1"})


def test_every_error_code_is_listed_in_the_spec() -> None:
    from wfactor.errors import ERROR_CODES

    spec = (Path(__file__).resolve().parents[1] / "spec" / "FORMAT.md").read_text()
    section = spec[spec.index("## 10. Error codes") : spec.index("## 11.")]
    missing = [code for code in ERROR_CODES if code != "error" and f"| `{code}` |" not in section]
    assert not missing, missing


def test_a_written_file_is_hashed_as_written_and_rehashed_once_changed(tmp_path: Path) -> None:
    """Writers hash what they write (no second read for the manifest's digest); a file changed afterwards, even
    rewritten with the same size, is hashed again from disk by FileRef.of."""
    import time

    from wfactor.format.manifest import FileRef, sha256_file
    from wfactor.format.safetensors_io import Entry, write_streaming, written_digest

    path = tmp_path / "t.safetensors"
    data = bytes(range(256)) * 4096
    digest = write_streaming(path, [Entry("x", "U8", (len(data),))], lambda e: data, {"k": "v"})
    assert digest == sha256_file(path) == written_digest(path) == FileRef.of(tmp_path, "t.safetensors").sha256
    time.sleep(0.01)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))  # same size, same inode, new content
    assert written_digest(path) is None
    assert FileRef.of(tmp_path, "t.safetensors").sha256 == sha256_file(path) != digest
