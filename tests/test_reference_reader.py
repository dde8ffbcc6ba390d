"""The spec is complete: an independent reader written from spec/FORMAT.md alone (tests/reference_reader.py)
rebuilds every member of the fixture family exactly as the library does."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
FAMILY = ROOT / "fixtures" / "family"
MEMBERS = ["full_ft", "top_ft", "lora", "bf16", "vocab_grown", "unrelated", "sparse_ft"]
LOWRANK_TOL = 1e-5  # FORMAT.md 5.3: relative to the tensor's norm

for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import reference_reader as rr  # noqa: E402


def _factor(src: Path, out: Path, lossless: bool) -> Path:
    import wfactor

    budget = wfactor.Budget(lossless=True) if lossless else wfactor.Budget()
    wfactor.factor([f"{n}={src / n}" for n in MEMBERS], base=str(src / "base"), out=out, budget=budget)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of fixtures/family: the families are factored from it and compared with it, so that a
    concurrent `make fixtures` cannot change the originals between factoring and comparing."""
    dst = tmp_path_factory.mktemp("ref_sources") / "family"
    shutil.copytree(FAMILY, dst)
    # a member that changed a few dozen entries of one matrix, so that the sparse codec is exercised
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(dst / "base" / "model.safetensors"))
    w = sd["layers.0.mlp.up_proj.weight"].clone()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(w.numel(), generator=g)[:40]
    w.view(-1)[idx] += torch.randn(40, generator=g)
    sd["layers.0.mlp.up_proj.weight"] = w
    (dst / "sparse_ft").mkdir()
    save_file(sd, str(dst / "sparse_ft" / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def families(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "lossless": _factor(sources, tmp_path_factory.mktemp("ref_lossless") / "fam", lossless=True),
        "lossy": _factor(sources, tmp_path_factory.mktemp("ref_lossy") / "fam", lossless=False),
    }


def _lib_numpy(t: object) -> np.ndarray:
    import torch

    assert isinstance(t, torch.Tensor)
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _as_f64(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        a = (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.astype(np.float64)


@pytest.mark.parametrize("kind", ["lossless", "lossy"])
@pytest.mark.parametrize("member", MEMBERS)
def test_reference_reader_matches_library(families: dict[str, Path], sources: Path, kind: str, member: str) -> None:
    import wfactor

    fam = families[kind]
    ref = rr.open_family(fam)
    assert ref.members == MEMBERS
    records = {r["name"]: r for r in ref.records(member)}
    mine = ref.state_dict(member)
    theirs = {k: _lib_numpy(v) for k, v in wfactor.open_family(fam).state_dict(member).items()}

    assert list(mine) == list(theirs)
    assert list(mine) == list(records)
    for name, a in mine.items():
        b = theirs[name]
        rec = records[name]
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape == tuple(rec["shape"]), name
        assert a.dtype == rr.DTYPES[rec["dtype"]][1], name
        if any(t["codec"] == "lowrank" for t in rec["terms"]):
            x, y = _as_f64(a, rec["dtype"]), _as_f64(b, rec["dtype"])
            assert np.all(np.isfinite(x)) and np.all(np.isfinite(y)), name
            assert np.linalg.norm(x - y) <= LOWRANK_TOL * np.linalg.norm(y), name
        else:
            assert a.tobytes() == b.tobytes(), f"{kind}/{member}/{name}: not bit-identical"

    if kind == "lossless":
        _, orig = rr.read_safetensors(sources / member / "model.safetensors")
        assert list(mine) == list(orig)
        for name, a in mine.items():
            assert a.dtype == orig[name].dtype and a.shape == orig[name].shape, name
            assert a.tobytes() == orig[name].tobytes(), f"{member}/{name} differs from the original"


def test_codecs_and_encodings_are_exercised(families: dict[str, Path]) -> None:
    """The comparison above is only as strong as the fixture's coverage of the format."""
    codecs, encodings, residuals, padded = set(), set(), 0, 0
    for fam in families.values():
        ref = rr.open_family(fam)
        bb = ref.backbone()
        for m in ref.members:
            for r in ref.records(m):
                codecs |= {t["codec"] for t in r["terms"]}
                if not r["terms"]:
                    codecs.add("identical")
                encodings |= {p["encoding"] for t in r["terms"] for p in t["parts"].values()}
                if r.get("residual"):
                    residuals += 1
                    encodings.add(r["residual"]["encoding"])
                if r["base"] is not None and bb.entries[r["base"]][1] != r["shape"]:
                    padded += 1
    assert codecs == {"identical", "dense", "lowrank", "sparse", "quant"}
    assert {"zstd", "zstd_planes"} <= encodings
    assert residuals > 0 and padded > 0


def _copy(fam: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "fam"
    shutil.copytree(fam, dst)
    return dst


def test_refuses_replaced_backbone(families: dict[str, Path], sources: Path, tmp_path: Path) -> None:
    fam = _copy(families["lossy"], tmp_path)
    # Another valid safetensors file: a member's original weights.
    shutil.copyfile(sources / "full_ft" / "model.safetensors", fam / "backbone.safetensors")
    rr.read_safetensors(fam / "backbone.safetensors")  # it is valid
    with pytest.raises(rr.RefError) as e:
        ref = rr.open_family(fam)
        ref.state_dict("full_ft")
    assert e.value.code in ("backbone_mismatch", "integrity")


def test_refuses_flipped_delta_byte(families: dict[str, Path], tmp_path: Path) -> None:
    fam = _copy(families["lossy"], tmp_path)
    ref = rr.open_family(fam)
    delta = next((fam / "deltas").glob("full_ft*"))
    data = bytearray(delta.read_bytes())
    data[len(data) - 10] ^= 0x01
    delta.write_bytes(bytes(data))
    with pytest.raises(rr.RefError) as e:
        rr.open_family(fam).state_dict("full_ft")
    assert e.value.code in ("backbone_mismatch", "integrity")
    # The other members still open.
    assert ref.state_dict("top_ft")


def test_reader_imports_only_stdlib_numpy_zstandard() -> None:
    tree = ast.parse((TESTS / "reference_reader.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add((node.module or "").split(".")[0])
    assert not roots & {"torch", "wfactor", "safetensors"}, roots
    allowed = set(sys.stdlib_module_names) | {"numpy", "zstandard"}
    assert roots <= allowed, roots - allowed


# ----------------------------------------------------------------------------------------------------
# The reader's own checks: mutated copies of the lossy family must be refused with the spec's codes.


def _write_st(path: Path, metadata: dict[str, str], tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A minimal safetensors writer (decreasing dtype size, then name; header padded to 8)."""
    order = sorted(tensors, key=lambda k: (-rr.DTYPES[tensors[k][0]][0], k))
    header: dict[str, object] = {"__metadata__": metadata}
    blobs, pos = [], 0
    for k in order:
        dtype, a = tensors[k]
        b = np.ascontiguousarray(a).tobytes()
        header[k] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def _manifest(fam: Path) -> dict:
    return json.loads((fam / "wfactor.json").read_text())


def _set_manifest(fam: Path, man: dict) -> None:
    (fam / "wfactor.json").write_text(json.dumps(man))


def _rewrite_delta(fam: Path, member: str, mutate) -> None:
    """Rewrite ``member``'s delta through ``mutate(metadata, records, tensors)``; update its FileRef."""
    man = _manifest(fam)
    mem = next(m for m in man["members"] if m["name"] == member)
    path = fam / mem["delta"]["path"]
    st = rr.SafetensorsFile(path.read_bytes())
    meta = dict(st.metadata)
    records = json.loads(meta["wfactor.records"])
    tensors = {k: (st.entries[k][0], st.array(k)) for k in st.entries}
    mutate(meta, records, tensors)
    meta["wfactor.records"] = json.dumps(records)
    _write_st(path, meta, tensors)
    data = path.read_bytes()
    mem["delta"]["size"] = len(data)
    mem["delta"]["sha256"] = hashlib.sha256(data).hexdigest()
    _set_manifest(fam, man)


def _parts(records: list, encodings: set[str], codec: str | None = None):
    for r in records:
        for t in r["terms"]:
            if codec is None or t["codec"] == codec:
                for role, p in t["parts"].items():
                    if p["encoding"] in encodings:
                        yield r, t, role, p


def _reframe(extra: int = 0, trailing: bytes = b"", sized: bool = True):
    def mutate(meta: dict, records: list, tensors: dict) -> None:
        _, _, _, p = next(_parts(records, {"zstd", "zstd_planes"}))
        n = int(np.prod(p["shape"], dtype=np.int64)) * rr.DTYPES[p["dtype"]][0] + extra
        frame = zstandard.ZstdCompressor(write_content_size=sized).compress(b"\0" * n) + trailing
        tensors[p["key"]] = ("U8", np.frombuffer(frame, np.uint8))

    return mutate


def _unknown_codec(meta: dict, records: list, tensors: dict) -> None:
    rec = next(r for r in records if r["terms"] and r["terms"][0]["codec"] != "dense")
    rec["terms"][0]["codec"] = "fancy"


def _unsorted_indices(meta: dict, records: list, tensors: dict) -> None:
    _, t, _, _ = next(_parts(records, {"raw", "zstd", "zstd_planes"}, "sparse"))
    p = t["parts"]["indices"]
    idx = np.zeros(p["shape"], np.int64)  # k >= 1 equal indices: not strictly increasing
    assert idx.size >= 2
    p["encoding"] = "raw"
    tensors[p["key"]] = ("I64", idx)


def _stray_tensor(meta: dict, records: list, tensors: dict) -> None:
    tensors["stray"] = ("U8", np.zeros(3, np.uint8))


def _other_backbone(meta: dict, records: list, tensors: dict) -> None:
    meta["wfactor.backbone_sha256"] = "0" * 64


def _newer_delta(meta: dict, records: list, tensors: dict) -> None:
    meta["wfactor.format_version"] = "99"


@pytest.mark.parametrize(
    "mutate, member, codes",
    [
        (_reframe(extra=1), "full_ft", {"limit", "codec"}),
        (_reframe(extra=-1), "full_ft", {"limit", "codec"}),
        (_reframe(sized=False), "full_ft", {"limit", "codec"}),
        (_reframe(trailing=b"\0"), "full_ft", {"codec"}),
        (_unknown_codec, "full_ft", {"codec"}),
        (_unsorted_indices, "sparse_ft", {"codec"}),
        (_stray_tensor, "full_ft", {"format"}),
        (_other_backbone, "full_ft", {"backbone_mismatch"}),
        (_newer_delta, "full_ft", {"version"}),
    ],
    ids=[
        "frame-larger",
        "frame-smaller",
        "frame-unsized",
        "frame-trailing",
        "unknown-codec",
        "sparse-indices",
        "stray-tensor",
        "backbone-digest",
        "delta-version",
    ],
)
def test_refuses_bad_delta(families: dict[str, Path], tmp_path: Path, mutate, member: str, codes: set[str]) -> None:
    fam = _copy(families["lossy"], tmp_path)
    _rewrite_delta(fam, member, lambda *a: None)
    assert rr.open_family(fam).state_dict(member)  # the rewriting itself is sound
    _rewrite_delta(fam, member, mutate)
    with pytest.raises(rr.RefError) as e:
        rr.open_family(fam).state_dict(member)
    assert e.value.code in codes, e.value
    if e.value.code == "version":
        assert "file is v99; this reader supports up to v5" in str(e.value)


def _dup_key(fam: Path) -> None:
    text = (fam / "wfactor.json").read_text()
    (fam / "wfactor.json").write_text(text.replace("{", '{"format": "wfactor.family", ', 1))


def _escape(fam: Path) -> None:
    man = _manifest(fam)
    man["backbone"]["path"] = "deltas/../backbone.safetensors"
    _set_manifest(fam, man)


def _symlink_escape(fam: Path) -> None:
    outside = fam.parent / "outside.safetensors"
    shutil.copyfile(fam / "backbone.safetensors", outside)
    (fam / "backbone.safetensors").unlink()
    (fam / "backbone.safetensors").symlink_to(outside)


def _newer_manifest(fam: Path) -> None:
    man = _manifest(fam)
    man["format_version"] = 99
    _set_manifest(fam, man)


def _bad_member_name(fam: Path) -> None:
    man = _manifest(fam)
    man["members"][0]["name"] = "-bad"
    _set_manifest(fam, man)


@pytest.mark.parametrize(
    "mutate, code",
    [
        (_dup_key, "format"),
        (_escape, "format"),
        (_symlink_escape, "format"),
        (_newer_manifest, "version"),
        (_bad_member_name, "format"),
    ],
)
def test_refuses_bad_manifest(families: dict[str, Path], tmp_path: Path, mutate, code: str) -> None:
    fam = _copy(families["lossy"], tmp_path)
    mutate(fam)
    with pytest.raises(rr.RefError) as e:
        rr.open_family(fam).state_dict("top_ft")
    assert e.value.code == code, e.value
