"""The ``bitplanes`` part encoding (spec/FORMAT.md section 4.3): small signed integers stored as b bit planes.

An I8 part whose values lie in [-(2^(b-1) - 1), 2^(b-1) - 1] (a k-bit quantised delta's codes) is stored
as a U8 array of shape [b, m, ceil(n / 8)], (m, n) the part's matrix view: plane k holds bit k of
u = value + 2^(b-1) - 1, eight elements of a row per byte, lowest bit first; bits past the row's end are 0.
It costs b/8 byte an element, about what zstd gets from such codes, and needs no decoding to be used:
a loader can keep the planes as they are (``wfactor.torch`` layers unpack rows on the fly) or copy them to
a GPU and unpack there. numpy only, like the rest of the format package.
"""

from __future__ import annotations

import numpy as np

from ..errors import CodecError

MIN_PLANES, MAX_PLANES = 2, 8

# byte -> its 8 bits as 8 bytes (lowest bit first), as one little-endian uint64: a plane's byte unpacks with
# one table lookup, and b planes combine with b shifted ORs of 64-bit words
_BITS64 = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").view("<u8").ravel()


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n): m = shape[0] and n = the product of the rest for 2 or more dimensions; (1, shape[0]) for one;
    (1, 1) for a scalar (spec 4.2)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return int(shape[0]), n


def bits_needed(values: np.ndarray) -> int | None:
    """The fewest planes b (2..8) whose range +-(2^(b-1) - 1) holds every value; None if -128 occurs."""
    if values.size == 0:
        return MIN_PLANES
    top = max(-int(values.min()), int(values.max()))
    for b in range(MIN_PLANES, MAX_PLANES + 1):
        if top <= (1 << (b - 1)) - 1:
            return b
    return None


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """int8 ``values`` (any shape, matrix view (m, n)) as planes, uint8 [bits, m, ceil(n / 8)]."""
    m, n = matrix_view(values.shape)
    q = (1 << (bits - 1)) - 1
    u = (values.reshape(m, n).astype(np.int16) + q).astype(np.uint8)
    out = np.empty((bits, m, (n + 7) // 8), dtype=np.uint8)
    for k in range(bits):
        out[k] = np.packbits((u >> k) & 1, axis=-1, bitorder="little")
    return out


def check(planes: np.ndarray, n: int, where: str) -> None:
    """Refuse planes that no valid array packs to: padding bits set past a row's end, or an element whose
    u is all ones (2^b - 1, one past the largest code). Error ``codec``."""
    bits = planes.shape[0]
    if n % 8 and planes.size:
        pad = np.uint8((0xFF << (n % 8)) & 0xFF)
        if np.any(planes[:, :, -1] & pad):
            raise CodecError(f"{where}: bitplanes padding bits past the row's end must be 0")
    if planes.size:
        ones = planes[0].copy()
        for k in range(1, bits):
            np.bitwise_and(ones, planes[k], out=ones)
        if n % 8:
            ones[:, -1] &= np.uint8((1 << (n % 8)) - 1)
        if np.any(ones):
            raise CodecError(
                f"{where}: a bitplanes value is {(1 << bits) - 1 - ((1 << (bits - 1)) - 1)}, outside "
                f"+-{(1 << (bits - 1)) - 1}, the range of {bits} planes"
            )


def unpack(planes: np.ndarray, n: int) -> np.ndarray:
    """The int8 values [..., n] packed in ``planes`` [b, ..., ceil(n / 8)] (rows may be any leading shape)."""
    bits = planes.shape[0]
    q = (1 << (bits - 1)) - 1
    lead = planes.shape[1:-1]
    if planes[0].size == 0 or n == 0:
        return np.zeros((*lead, n), dtype=np.int8)
    # two buffers for the whole call (a plane's lookup, the sum), not three temporaries per plane
    acc = np.take(_BITS64, planes[0], mode="clip")
    tmp = np.empty_like(acc)
    for k in range(1, bits):
        np.take(_BITS64, planes[k], out=tmp, mode="clip")  # a byte indexes all 256 entries: clip never clips
        np.left_shift(tmp, np.uint64(k), out=tmp)
        np.bitwise_or(acc, tmp, out=acc)
    values = acc.view(np.int8).reshape(*lead, -1)[..., :n]
    np.subtract(values, np.int8(q), out=values)  # u - q modulo 256 in int8: exact, the result is within +-127
    return values
