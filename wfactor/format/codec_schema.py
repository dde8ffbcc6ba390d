"""What each codec's term holds (spec/FORMAT.md section 4.2), as data: its integer parameters and their
ranges, and its parts with their shapes and dtypes. One table, read by record validation here, by the
codecs that encode and decode terms (:mod:`wfactor.codecs`), and by the factored runtime
(:mod:`wfactor.torch.attach`), so that a codec's layout is written down once. Torch-free.

Shapes are written in the record's matrix view (spec 4.1): ``m`` rows (first dimension) and ``n`` columns
(the product of the others; a 1-D tensor is one row), the record's own ``shape``, and the term's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .constants import MAX_BITS, MIN_BITS

FACTOR_DTYPES = ("F16", "BF16", "F32")

Dims = Callable[[int, int, tuple[int, ...], dict[str, int]], tuple[int, ...]]
Bound = Callable[[int, int], int]


@dataclass(frozen=True)
class Param:
    name: str
    low: Bound  # inclusive, as a function of (m, n)
    high: Bound
    range_text: Callable[[int, int, tuple[int, ...]], str]  # how the error message states the range


@dataclass(frozen=True)
class PartSchema:
    role: str
    dims: Dims
    dtypes: tuple[str, ...] | None  # None: the record's own dtype


@dataclass(frozen=True)
class CodecSchema:
    name: str
    params: tuple[Param, ...]
    parts: tuple[PartSchema, ...]
    min_ndim: int = 0  # lowrank needs a matrix
    floating_only: bool = True  # integer and BOOL records may use only dense (spec 4.1)
    first_only: bool = False  # rescale: divides the base view, so it comes before every added term
    version: int = 1  # the format version that introduced it (spec 8)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(p.role for p in self.parts)

    def part(self, role: str) -> PartSchema:
        return next(p for p in self.parts if p.role == role)


def _whole(m: int, n: int, shape: tuple[int, ...], p: dict[str, int]) -> tuple[int, ...]:
    return shape


SCHEMAS: dict[str, CodecSchema] = {
    "dense": CodecSchema("dense", (), (PartSchema("values", _whole, None),), floating_only=False),
    "lowrank": CodecSchema(
        "lowrank",
        (Param("rank", lambda m, n: 1, lambda m, n: min(m, n), lambda m, n, s: f"1..{min(m, n)} for shape {list(s)}"),),
        (
            PartSchema("u", lambda m, n, s, p: (m, p["rank"]), FACTOR_DTYPES),
            PartSchema("v", lambda m, n, s, p: (p["rank"], n), FACTOR_DTYPES),
        ),
        min_ndim=2,
    ),
    "sparse": CodecSchema(
        "sparse",
        (Param("count", lambda m, n: 0, lambda m, n: m * n, lambda m, n, s: f"0..{m * n}"),),
        (
            PartSchema("indices", lambda m, n, s, p: (p["count"],), ("I64",)),
            PartSchema("values", lambda m, n, s, p: (p["count"],), FACTOR_DTYPES),
        ),
    ),
    "quant": CodecSchema(
        "quant",
        (Param("bits", lambda m, n: MIN_BITS, lambda m, n: MAX_BITS, lambda m, n, s: f"{MIN_BITS}..{MAX_BITS}"),),
        (
            PartSchema("codes", lambda m, n, s, p: (m, n), ("I8",)),
            PartSchema("scales", lambda m, n, s, p: (m,), ("F32",)),
        ),
    ),
    # version 4: X <- X / s, row by row, before any other term (a member stored as round(W / s), e.g. the
    # fp8 weights of a compressed-tensors checkpoint with one scale per output channel)
    "rescale": CodecSchema(
        "rescale", (), (PartSchema("scales", lambda m, n, s, p: (m,), ("F32",)),), first_only=True, version=4
    ),
    # version 5: packed integer codes (int4/int8 checkpoints) predicted by quantising the base with the member's
    # own scales (another record, named by the string parameter `scales`); its own check is
    # records.check_requant: integer parameters, layout and the base's [rows, inputs] (spec 4.2, 5.4)
    "requant": CodecSchema(
        "requant",
        (),
        (PartSchema("correction", lambda m, n, s, p: (p["rows"], p["inputs"]), ("I8",)),),
        floating_only=False,
        first_only=True,
        version=5,
    ),
}
CODEC_NAMES = tuple(SCHEMAS)
REQUANT_LAYOUTS = ("rows", "columns", "codes")


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix view of a tensor: rows = first dimension, cols = product of the rest (1-D: one row)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def check_params(schema: CodecSchema, params: dict[str, Any], shape: tuple[int, ...], where: str) -> dict[str, int]:
    """The term's integer parameters, each within its range; raises ValueError with a one-line reason."""
    m, n = matrix_view(shape)
    out: dict[str, int] = {}
    for p in schema.params:
        v = params.get(p.name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{where}: parameter {p.name!r} must be an integer, found {v!r}")
        if not p.low(m, n) <= v <= p.high(m, n):
            raise ValueError(f"{where}: {schema.name} {p.name} {v} must lie in {p.range_text(m, n, shape)}")
        out[p.name] = v
    return out
