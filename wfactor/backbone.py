"""Choosing the backbone of a family when the user names no base, and telling related members apart.

Two candidates are built and the factoring keeps whichever family is smaller (measured, not guessed).
Which members are related is decided by the rule of `wfactor analyze` (spec/ANALYZE.md).

- the **medoid**: the member whose summed squared distance to the other related members is smallest
  (it then costs almost nothing as a member: every tensor is identical to the backbone);
- the **consensus**: per tensor, the element-wise mean of the related members that have it in its most
  common shape (every member then pays a delta, but each is smaller).

Distances stream tensor by tensor: one tensor of every member is in memory at a time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import values64
from .format.constants import FLOAT_DTYPES, FORMAT_VERSION, META_KIND, META_VERSION
from .format.safetensors_io import Entry, write_streaming
from .sources import Source


@dataclass
class Distances:
    names: list[str]
    sq: np.ndarray  # [N, N] summed squared differences over comparable tensors (+ norms of unmatched)
    norm_sq: np.ndarray  # [N] summed squared norms of each member's floating tensors

    def relative(self, i: int, j: int) -> float:
        """sqrt(d(i, j) / ||member j||^2): the distance as a share of member j's weights."""
        return math.sqrt(self.sq[i, j] / self.norm_sq[j]) if self.norm_sq[j] > 0 else 0.0


def _float(src: Source, key: str) -> np.ndarray | None:
    dtype = src.info(key).dtype
    return values64(src.array(key), dtype) if dtype in FLOAT_DTYPES else None


def _sq(x: np.ndarray) -> float:
    """Sum of squares in float64, in numpy's fixed order (no BLAS, no threads: the same on every machine)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    return float(np.einsum("i,i->", flat, flat))


def pairwise(sources: Sequence[Source]) -> Distances:
    """Squared distances between every pair of members, tensor by tensor. Tensors absent from one member or
    of another shape count their whole squared norm (they cannot be shared)."""
    n = len(sources)
    sq = np.zeros((n, n))
    norm_sq = np.zeros(n)
    keys = sorted({k for s in sources for k in s.keys()})
    for key in keys:
        ts = [(_float(s, key) if key in s else None) for s in sources]
        norms = [_sq(t) if t is not None else 0.0 for t in ts]
        norm_sq += norms
        for i in range(n):
            for j in range(i + 1, n):
                a, b = ts[i], ts[j]
                if a is None and b is None:
                    continue
                if a is None or b is None or a.ndim != b.ndim:
                    d = norms[i] + norms[j]
                elif a.shape != b.shape:
                    # a grown or shrunk tensor: the common leading block is compared, the rest counts whole,
                    # exactly as the zero-padded base view of the reconstruction sees it
                    region = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))
                    ar, br = a[region], b[region]
                    d = _sq(ar - br) + norms[i] - _sq(ar) + norms[j] - _sq(br)
                else:
                    d = _sq(a - b)
                sq[i, j] += d
                sq[j, i] += d
    return Distances([s.name for s in sources], sq, norm_sq)


def medoid(dist: Distances, related: Sequence[int], eligible: Sequence[int] | None = None) -> int:
    """The member of ``eligible`` (default: ``related``) closest in sum to all ``related`` members."""
    pool = list(eligible) if eligible is not None else list(related)
    return min(pool, key=lambda i: (sum(dist.sq[i, j] for j in related), i))


_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def widest(sources: Sequence[Source], among: Sequence[int]) -> list[int]:
    """Members stored at the widest floating-point precision found: a bf16 backbone would cost every fp32
    member a delta for its lost mantissa bits, so only the widest are medoid candidates."""

    def width(s: Source) -> int:
        return max((_WIDTH.get(s.info(k).dtype, 0) for k in s.keys()), default=0)

    top = max(width(sources[i]) for i in among)
    return [i for i in among if width(sources[i]) == top]


def write_consensus(sources: Sequence[Source], path: Path) -> None:
    """Per tensor, the element-wise mean (float32, or float64 if any member is float64) of the members that
    have it in its most common shape; non-floating tensors are taken from the first member that has them."""
    keys = sorted({k for s in sources for k in s.keys()})
    plan: list[tuple[str, tuple[int, ...], list[Source], str]] = []
    for key in keys:
        have = [s for s in sources if key in s]
        shape = Counter(s.info(key).shape for s in have).most_common(1)[0][0]
        same = [s for s in have if s.info(key).shape == shape]
        dtypes = {s.info(key).dtype for s in same}
        if dtypes <= {"F64", "F32", "F16", "BF16"}:
            dtype = "F64" if "F64" in dtypes else "F32"
        else:
            same, dtype = same[:1], same[0].info(key).dtype
        plan.append((key, shape, same, dtype))
    by_key = {k: (s, d) for k, _sh, s, d in plan}

    def produce(e: Entry) -> bytes:
        members, dtype = by_key[e.name]
        first = members[0]
        if len(members) == 1 or dtype not in ("F32", "F64"):
            a, have = first.array(e.name), first.info(e.name).dtype
            if have != dtype:  # a lone bf16/f16 member: its values, exactly, in float32
                a = values64(a, have).astype(np.float32)
            return np.ascontiguousarray(a).tobytes()
        acc = np.zeros(e.shape, dtype=np.float64)
        for s in members:
            acc += values64(s.array(e.name), s.info(e.name).dtype)
        acc /= len(members)
        return acc.astype(np.float64 if dtype == "F64" else np.float32).tobytes()

    entries = [Entry(k, d, sh) for k, sh, _s, d in plan]
    write_streaming(path, entries, produce, {META_KIND: "backbone", META_VERSION: str(FORMAT_VERSION)})
