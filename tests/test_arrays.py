"""The torch-free numerics (wfactor.arrays) against the torch reader, bit for bit: the base-only prediction
of every pair of float dtypes (casts through the compute dtype, ties to even, overflow, saturation,
subnormals, NaN payloads, signed zeros), grown and cropped shapes, and integer bases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wfactor.arrays import (
    FINGERPRINT_BLOCK,
    FINGERPRINT_BLOCKS,
    bits_equal,
    f8_values,
    fingerprint,
    predict_base,
    to_compute,
)
from wfactor.format.constants import DTYPES
from wfactor.format.records import Record
from wfactor.reconstruct import predict
from wfactor.tensors import from_storage, to_storage

FLOATS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]


def _no_parts(spec):  # pragma: no cover - a record without terms loads none
    raise AssertionError


@np.errstate(invalid="ignore")
def _values_of(dtype: str) -> np.ndarray:
    """Every value of a narrow dtype (all 2^16 or 2^8 bit patterns), as float64 (NaN included)."""
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return f8_values(dtype)
    if dtype == "F16":
        return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    return to_compute(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16), "BF16").astype(np.float64)


def _hard_values(rng: np.random.Generator) -> np.ndarray:
    """float64 values that stress every narrower rounding: each narrow dtype's values, the midpoints between
    neighbours (ties) and values just beside them, beyond the largest finite values, specials."""
    out = [np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300, -1e-300, 3.4e38, 1e39, -1e39, 448.0, 464.0, 480.0,
                     481.0, 57344.0, 61440.0, 61439.0, 65504.0, 65520.0, 70000.0])]
    for d in ("F16", "BF16", "F8_E4M3", "F8_E5M2"):
        v = np.unique(_values_of(d)[np.isfinite(_values_of(d))])
        mid = (v[:-1] + v[1:]) / 2
        out += [v, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf)]
    out.append(rng.standard_normal(4000) * 10.0 ** rng.integers(-10, 10, 4000))
    return np.concatenate(out)


def _storage(values: np.ndarray, dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Storage of ``dtype`` holding ``values`` as torch rounds them, plus random bit patterns (NaN payloads)."""
    t = torch.from_numpy(values).to(torch.float32 if dtype != "F64" else torch.float64)
    base = to_storage(t.to(from_storage(np.zeros(1, DTYPES[dtype][0]), dtype).dtype))
    size = DTYPES[dtype][1]
    noise = rng.integers(0, 256, 2048 * size, dtype=np.uint8).view(DTYPES[dtype][0])
    return np.concatenate([base.reshape(-1), noise])


@pytest.mark.parametrize("bdtype", FLOATS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_predict_base_matches_torch(bdtype: str, dtype: str) -> None:
    rng = np.random.default_rng(FLOATS.index(bdtype) * 7 + FLOATS.index(dtype))
    b = _storage(_hard_values(rng), bdtype, rng)
    rec = Record("w", tuple(b.shape), dtype, "w")
    want = to_storage(predict(rec, from_storage(b.copy(), bdtype), _no_parts, "cpu"))
    got = predict_base(b, bdtype, tuple(b.shape), dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = np.flatnonzero(got.view(f"u{got.dtype.itemsize}") != want.view(f"u{want.dtype.itemsize}"))
    assert diff.size == 0, (bdtype, dtype, diff[:5], b[diff[:5]], got[diff[:5]], want[diff[:5]])
    assert np.shares_memory(got, b) is False or bdtype == dtype  # never a cast written into the source


@pytest.mark.parametrize(("bshape", "shape"), [((3, 4), (5, 4)), ((5, 4), (3, 6)), ((4,), (4,))])
@pytest.mark.parametrize(("bdtype", "dtype"), [("F32", "BF16"), ("BF16", "BF16"), ("I64", "I64")])
def test_predict_base_views_match_torch(bshape, shape, bdtype, dtype) -> None:
    rng = np.random.default_rng(1)
    b = rng.standard_normal(bshape).astype(np.float32)
    b = to_storage(from_storage(b, "F32").to(from_storage(np.zeros(1, DTYPES[bdtype][0]), bdtype).dtype))
    want = to_storage(predict(Record("w", shape, dtype, "w"), from_storage(b.copy(), bdtype), _no_parts, "cpu"))
    got = predict_base(b, bdtype, shape, dtype)
    assert got.shape == tuple(shape) and bytes(got.tobytes()) == bytes(want.tobytes())


def test_f8_tables_match_torch() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for d, td in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        want = codes.view(td).to(torch.float64).numpy()
        got = f8_values(d)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
        assert np.array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)]))


def test_fingerprint_is_a_candidate_key_that_bits_equal_confirms() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 256)).astype(np.float32)  # 256 KiB: sampled, not hashed whole
    starts = np.arange(FINGERPRINT_BLOCKS) * (a.nbytes - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1)
    gap = int(starts[1]) + FINGERPRINT_BLOCK  # the first byte after the second sampled block
    assert gap + 4 <= starts[2]
    b = a.copy()
    b.reshape(-1).view(np.uint8)[gap] ^= 1  # one bit no sample sees
    c = a.copy()
    c.reshape(-1).view(np.uint8)[-1] ^= 1  # the last byte is always sampled
    assert fingerprint(a) == fingerprint(b) and not bits_equal(a, b)
    assert fingerprint(a) != fingerprint(c) and not bits_equal(a, c)
    assert bits_equal(a, a.copy()) and not bits_equal(a, a.reshape(-1)) and not bits_equal(a, a.view(np.int32)[:1])
    small = a[:8].copy()  # up to 64 KiB: every byte hashed
    small2 = small.copy()
    small2.reshape(-1).view(np.uint8)[100] ^= 1
    assert fingerprint(small) != fingerprint(small2)
    # the same bytes of another length (a prefix) or another dtype of the same bytes: lengths are hashed,
    # dtypes and shapes are in Source.content's key
    assert fingerprint(a) != fingerprint(a.reshape(-1)[:-1])
    # bits_equal stops at the first differing chunk and compares every chunk otherwise
    big = rng.integers(0, 255, 3 * (1 << 18) + 5, dtype=np.uint8)
    late = big.copy()
    late[-1] ^= 1
    assert not bits_equal(big, late) and bits_equal(big, big.copy())
