"""Exact records without torch: a member tensor stored bit for bit as its base alone (``identical``), as the
base plus an XOR residual (spec 5.3), or dense, whichever is smallest.

These are the ``identical`` and ``exact`` options of every planner (:class:`wfactor.plan.TensorPlanner`
builds them here) and the whole of a lossless factoring of float and integer checkpoints, which therefore
never imports torch (:func:`plan_stored`). Everything is numpy over storage arrays (:mod:`wfactor.arrays`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .arrays import bits, bits_equal, predict_base
from .codecs.base import Encoded
from .format.constants import DTYPES, FLOAT_DTYPES
from .format.parts import PartSpec, encode_part
from .format.records import Record, Term

if TYPE_CHECKING:
    from .sources import Source

# Dense is only tried when the residual compresses poorly (above this share of the raw bytes), where it can
# win (a tensor unrelated to its base); below that, the residual's mostly-zero high bytes beat the dense
# values' planes, and skipping the second compression saves a pass over the tensor.
EXACT_TRY_DENSE = 0.75
EXACT_ERROR = {"rel_l2": 0.0, "max_abs": 0.0}


@dataclass
class Planned:
    """A record with its stored arrays, ready to be written. ``nbytes`` counts stored bytes."""

    record: Record
    stored: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.stored.values())


def part_key(tensor: str, slot: str, role: str) -> str:
    return f"{tensor}#{slot}.{role}"


def assemble(
    name: str, shape: tuple[int, ...], dtype: str, base_name: str | None, terms: list[Encoded], resid: Encoded | None
) -> Planned:
    """The record of ``terms`` (and a residual) for tensor ``name``, its parts encoded (spec 4.3)."""
    stored: dict[str, np.ndarray] = {}
    rec_terms: list[Term] = []
    for k, enc in enumerate(terms):
        parts: dict[str, PartSpec] = {}
        for role, (arr, pdtype, encoding) in enc.arrays.items():
            spec, data = encode_part(part_key(name, str(k), role), arr, pdtype, encoding)
            parts[role] = spec
            stored[spec.key] = data
        rec_terms.append(Term(enc.codec, dict(enc.params), parts))
    rspec = None
    if resid is not None:
        arr, pdtype, encoding = resid.arrays["xor"]
        rspec, data = encode_part(part_key(name, "r", "xor"), arr, pdtype, encoding)
        stored[rspec.key] = data
    return Planned(Record(name, tuple(shape), dtype, base_name, rec_terms, rspec, {}), stored)


def rekey(p: Planned, prefix: str) -> Planned:
    """The same record with its parts keyed ``<prefix>#<slot>.<role>`` (the writer uses the record's index:
    short keys keep delta headers small; readers find parts through the record, never by convention)."""
    renamed: dict[str, str] = {}

    def new(spec: PartSpec) -> PartSpec:
        key = f"{prefix}#{spec.key.rsplit('#', 1)[1]}"
        renamed[spec.key] = key
        return dataclasses.replace(spec, key=key)

    rec = p.record
    terms = [Term(t.codec, t.params, {role: new(s) for role, s in t.parts.items()}) for t in rec.terms]
    resid = new(rec.residual) if rec.residual is not None else None
    out = Record(rec.name, rec.shape, rec.dtype, rec.base, terms, resid, rec.error, rec.same_as)
    return Planned(out, {renamed[k]: v for k, v in p.stored.items()})


def _encoding(dtype: str) -> str:
    return "zstd_planes" if DTYPES[dtype][1] > 1 else "zstd"


def dense_term(target: np.ndarray, dtype: str) -> Encoded:
    """The ``dense`` term: the values, byte planes + zstd (read only: encode_part compresses in chunks)."""
    return Encoded("dense", {}, {"values": (target, dtype, _encoding(dtype))})


def residual_term(target: np.ndarray, prediction: np.ndarray, dtype: str) -> Encoded:
    """The XOR residual (spec 5.1 step 4): the target's bytes XOR the prediction's."""
    x = np.bitwise_xor(bits(target), bits(prediction)).view(target.dtype)
    return Encoded("residual", {}, {"xor": (x, dtype, _encoding(dtype))})


def usable_base(dtype: str, shape: tuple[int, ...], bdtype: str, bshape: tuple[int, ...]) -> bool:
    """Whether a base tensor can predict this target at all: the same number of dimensions and kind (float
    or not), and for integer and BOOL targets the same dtype (spec 5.2: no casts)."""
    if len(bshape) != len(shape) or (bdtype in FLOAT_DTYPES) != (dtype in FLOAT_DTYPES):
        return False
    return dtype in FLOAT_DTYPES or bdtype == dtype


class Exact:
    """One tensor's exact options against its base: ``identical`` (the reader's base-only prediction is the
    target bit for bit) and ``exact`` (the cheaper of base + XOR residual and dense). ``target`` and
    ``base`` are storage arrays of ``dtype`` and ``bdtype``; ``base`` None (or unusable): dense."""

    def __init__(
        self,
        name: str,
        target: np.ndarray,
        dtype: str,
        base_name: str | None,
        base: np.ndarray | None,
        bdtype: str | None,
    ) -> None:
        self.name, self.target, self.dtype = name, target, dtype
        self.shape = tuple(target.shape)
        if base is None or bdtype is None or not usable_base(dtype, self.shape, bdtype, tuple(base.shape)):
            base_name, base = None, None
        self.base_name = base_name
        self.prediction = predict_base(base, bdtype, self.shape, dtype) if base is not None and bdtype else None
        self.identical = self.prediction is not None and bits_equal(self.prediction, target)

    def reference(self) -> Planned:
        """The record of the base alone (exact when ``identical``)."""
        return assemble(self.name, self.shape, self.dtype, self.base_name, [], None)

    def smallest(self) -> Planned:
        """Base + XOR residual, or dense, whichever is smaller (the first of equals), its error exact."""
        cands: list[Planned] = []
        if self.prediction is not None:
            resid = residual_term(self.target, self.prediction, self.dtype)
            cands.append(assemble(self.name, self.shape, self.dtype, self.base_name, [], resid))
        if not cands or cands[0].nbytes > EXACT_TRY_DENSE * self.target.nbytes:
            cands.append(assemble(self.name, self.shape, self.dtype, None, [dense_term(self.target, self.dtype)], None))
        p = min(cands, key=lambda c: c.nbytes)
        p.record.error = dict(EXACT_ERROR)
        return p

    def plan(self) -> Planned:
        if self.identical:
            p = self.reference()
            p.record.error = dict(EXACT_ERROR)
            return p
        return self.smallest()


def plain(member: Source, base: Source, key: str, bname: str | None) -> bool:
    """Whether this member tensor is planned exactly as it is stored, torch-free: not a quantised weight
    (requant and rescale records are planned with torch, :mod:`wfactor.plan`) and not against a quantised
    backbone view."""
    if bname is not None and base.rescaled_view:
        return False
    return member.packed(key) is None and not member.has_prescale(key)


def plan_stored(member: Source, base: Source, key: str, bname: str | None) -> Planned:
    """A member tensor planned lossless against backbone tensor ``bname`` (None: dense), from the tensors'
    stored bytes (memory maps, no copies)."""
    info = member.info(key)
    b = base.array(bname) if bname is not None else None
    bdtype = base.info(bname).dtype if bname is not None else None
    return Exact(key, member.array(key), info.dtype, bname, b, bdtype).plan()
