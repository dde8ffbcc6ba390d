"""Torch-free numerics over storage arrays: numpy arrays of a format dtype's storage (spec 6: BF16 as its
uint16 bit patterns, F8 as uint8), as sources read them and as parts store them.

What lossless factoring (:mod:`wfactor.exact`) and the relatedness verdict (:mod:`wfactor.drift`) compute
needs no torch: the reader's prediction of a record without terms (spec 5.1 steps 0, 1 and 3: the base
view, the casts through the compute dtype, rounding to nearest with ties to even, the canonical NaN), bit
views and float64 values. Tested bit for bit against the torch reader (:func:`wfactor.reconstruct.predict`)
for every pair of float dtypes, specials included (tests/test_arrays.py).
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any

import numpy as np

from .format.constants import DTYPES, F8_DTYPES, FLOAT_DTYPES

_UINT: dict[int, np.dtype[Any]] = {1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
# spec 5.1 step 3: the canonical NaN of each float dtype, as a bit pattern
CANONICAL_NAN = {"F64": 0x7FF8000000000000, "F32": 0x7FC00000, "F16": 0x7E00, "BF16": 0x7FC0}
CANONICAL_NAN.update({d: 0x7F for d in F8_DTYPES})
_CHUNK = 1 << 20  # elements per float64 temporary in the 8-bit float rounding


def storage_dtype(dtype: str) -> np.dtype:
    return np.dtype(DTYPES[dtype][0])


def bits(a: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned integers of the same item size (for XOR and bitwise comparison)."""
    return np.ascontiguousarray(a).view(_UINT[a.dtype.itemsize])


_EQUAL_CHUNK = 1 << 18  # elements compared at a time: two different tensors rarely get past the first chunk


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold the same bits (same shape and item size), compared chunk by chunk: it stops at
    the first chunk that differs, and makes no temporary larger than a chunk."""
    if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize:
        return False
    x, y = bits(a).reshape(-1), bits(b).reshape(-1)
    return all(np.array_equal(x[i : i + _EQUAL_CHUNK], y[i : i + _EQUAL_CHUNK]) for i in range(0, x.size, _EQUAL_CHUNK))


FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 1024, 64  # bytes sampled by fingerprint(): 64 KiB of every tensor


def fingerprint(a: np.ndarray) -> str:
    """A cheap identity of an array's bytes: the SHA-256 of FINGERPRINT_BLOCKS blocks of FINGERPRINT_BLOCK
    bytes at evenly spaced offsets (the first and last bytes included), or of all of them for a small
    array. Equal bytes give equal fingerprints; equal fingerprints are only candidates, confirmed by
    :func:`bits_equal` (a fine-tune may change a few elements between the samples)."""
    u = bits(a).reshape(-1).view(np.uint8)
    if u.size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
        return hashlib.sha256(u.data).hexdigest()
    starts = np.arange(FINGERPRINT_BLOCKS, dtype=np.int64) * (u.size - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1)
    sample = u[starts[:, None] + np.arange(FINGERPRINT_BLOCK, dtype=np.int64)]
    h = hashlib.sha256(str(u.size).encode())
    h.update(sample.data)
    return h.hexdigest()


def compute_dtype(dtype: str) -> str:
    """Spec 5: F64 for an F64 target, else F32."""
    return "F64" if dtype == "F64" else "F32"


@cache
def f8_values(dtype: str) -> np.ndarray:
    """The value of every code 0..255 of an 8-bit float (spec 6), as float64 (NaN where the code is NaN)."""
    exp_bits, bias = (4, 7) if dtype == "F8_E4M3" else (5, 15)
    man_bits = 7 - exp_bits
    codes = np.arange(256)
    e = (codes >> man_bits) & ((1 << exp_bits) - 1)
    m = (codes & ((1 << man_bits) - 1)).astype(np.float64)
    mag = np.where(e == 0, m * 2.0 ** (1 - bias - man_bits), (1 + m / (1 << man_bits)) * 2.0 ** (e - bias))
    top = e == (1 << exp_bits) - 1
    if dtype == "F8_E4M3":
        mag = np.where(top & (m == (1 << man_bits) - 1), np.nan, mag)  # E4M3FN: only 0x7F / 0xFF are NaN
    else:
        mag = np.where(top, np.where(m == 0, np.inf, np.nan), mag)
    return np.where(codes & 0x80, -mag, mag)


def to_compute(a: np.ndarray, dtype: str) -> np.ndarray:
    """cast_C (spec 5.1 step 1, exact): storage of a float dtype -> float32 (float64 for F64) values."""
    if dtype in ("F64", "F32"):
        return a
    if dtype == "F16":
        return a.astype(np.float32)
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if dtype in F8_DTYPES:
        return f8_values(dtype).astype(np.float32)[a]
    raise AssertionError(f"{dtype} is not a float dtype")


def values64(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values of a storage array of any dtype (floats exactly, integers and BOOL as numbers)."""
    if dtype in F8_DTYPES:
        return f8_values(dtype)[a]
    if dtype == "BF16":
        return to_compute(a, dtype).astype(np.float64)
    return a.astype(np.float64)


def _round_f8(x: np.ndarray, dtype: str) -> np.ndarray:
    """round_T to an 8-bit float (spec 5.1 step 3): to nearest, ties to even; F8_E5M2 overflows to infinity,
    F8_E4M3 saturates at +-448. NaN -> 0x7F. Over the sorted table of positive finite values, whose codes are
    their positions."""
    table = f8_values(dtype)[:0x80]
    finite = table[np.isfinite(table)]  # codes 0 .. max finite, increasing
    top = len(finite) - 1
    # one more step above the largest finite value: where overflow begins (E5M2's infinity is that code)
    upper = np.append(finite, 2 * finite[-1] - finite[-2] if dtype == "F8_E4M3" else 2.0 ** 16)
    out = np.empty(x.shape, np.uint8)
    flat, res = x.reshape(-1), out.reshape(-1)
    for i in range(0, flat.size, _CHUNK):
        v = flat[i : i + _CHUNK].astype(np.float64)
        a = np.abs(v)
        hi = np.searchsorted(upper, a, side="left").clip(1, len(upper) - 1)  # upper[hi-1] < a <= upper[hi]
        lo = hi - 1
        d_lo, d_hi = a - upper[lo], upper[hi] - a
        code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
        code = np.where(a > upper[-1], len(upper) - 1, code)  # beyond the table: overflow
        if dtype == "F8_E4M3":
            code = np.minimum(code, top)  # saturate (infinity included)
        else:
            code = np.where(np.isinf(a), top + 1, code)  # 0x7C: infinity
        code = code.astype(np.uint8) | np.where(np.signbit(v), 0x80, 0).astype(np.uint8)
        res[i : i + _CHUNK] = np.where(np.isnan(v), 0x7F, code)
    return out


def from_compute(x: np.ndarray, dtype: str) -> np.ndarray:
    """round_T (spec 5.1 step 3) of float32/float64 values to a float dtype's storage, before the NaN rule."""
    if dtype == "F64":
        return x.astype(np.float64)
    if dtype == "F32":
        return x.astype(np.float32)  # float64 -> float32 rounds to nearest, ties to even
    if dtype == "F16":
        return x.astype(np.float16)
    if dtype == "BF16":
        x32 = x.astype(np.float32)
        u = x32.view(np.uint32)
        y = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
        return np.where(np.isnan(x32), np.uint16(CANONICAL_NAN["BF16"]), y)  # a NaN's payload could carry
    if dtype in F8_DTYPES:
        return _round_f8(x, dtype)
    raise AssertionError(f"{dtype} is not a float dtype")


def is_nan(a: np.ndarray, dtype: str) -> np.ndarray:
    """Which elements of a float storage array are NaN."""
    if dtype in ("F64", "F32", "F16"):
        return np.isnan(a)
    if dtype == "BF16":
        return (a & 0x7FFF) > 0x7F80
    return (a & 0x7F) == 0x7F if dtype == "F8_E4M3" else (a & 0x7F) > 0x7C


def canonical_nan(y: np.ndarray, dtype: str) -> np.ndarray:
    """Every NaN of ``y`` (a float storage array, modified in place when it has any) -> its canonical NaN."""
    nan = is_nan(y, dtype)
    if nan.any():
        bits(y)[nan] = CANONICAL_NAN[dtype]
    return y


def base_view(b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``b`` resized to ``shape``: the common leading block is b's, the rest zeros (spec 5.1 step 1)."""
    if tuple(b.shape) == tuple(shape):
        return b
    out = np.zeros(shape, dtype=b.dtype)
    region = tuple(slice(0, min(x, y)) for x, y in zip(b.shape, shape))
    out[region] = b[region]
    return out


def predict_base(b: np.ndarray, bdtype: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The reader's prediction of a record without terms from base ``b`` (spec 5.1 steps 0, 1, 3; 5.2):
    the base view, in the target dtype ``dtype`` (B's bytes when the dtypes agree, else cast through the
    compute dtype, rounded, NaNs canonical). A storage array; it may be ``b`` itself."""
    if bdtype == dtype:
        return base_view(b, shape)
    assert bdtype in FLOAT_DTYPES and dtype in FLOAT_DTYPES, (bdtype, dtype)
    c = compute_dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to infinity and NaNs are the rule here
        x = to_compute(b, bdtype)  # exact; B itself for F32 and F64
        if x.dtype != storage_dtype(c):
            x = from_compute(x, c)  # F64 -> F32 rounds; F32 -> F64 is exact
        y = from_compute(x, dtype) if dtype != c else x  # a new array: the dtypes differ
    return base_view(canonical_nan(np.ascontiguousarray(y), dtype), shape)
