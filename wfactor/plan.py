"""Per-tensor codec choice under an error budget: the cheapest record whose measured error meets it.

The budget bounds each rebuilt tensor's error relative to the member's drift from the backbone:

    ||Y - W||_F <= max(max_rel_error * ||W - B||_F,  ERROR_FLOOR * ||W||_F)

(Y rebuilt, W the member's tensor, B its base view). Measuring against the drift rather than the weight
keeps a fixed share of every fine-tune's change, whether it moved the weights by 0.1% or by 10%; the
floor accepts errors far below bf16 resolution. Errors are measured on the actual reconstruction, through
the reader's own code path, after rounding to the target dtype. ``lossless`` demands Y == W bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .codecs import dense, lowrank, quant, residual, sparse
from .codecs.base import Encoded
from .format.constants import MAX_BITS, MIN_BITS
from .format.parts import PartSpec, encode_part, read_part_array
from .format.records import Record, Term, rows_cols
from .reconstruct import base_view, predict, reconstruct
from .tensors import bitwise_equal, compute_torch_dtype, format_dtype, from_storage

# Default budget, relative to each tensor's drift. To first order a rebuilt model's output divergence from
# the member is max_rel_error**2 times the member's divergence from the base, so 0.1 keeps cosine >= 0.999
# for any fine-tune whose outputs are within cosine 0.9 of its base (bench/RESULTS.md, "Default budget",
# has the sweep on the fixture family).
DEFAULT_MAX_REL_ERROR = 0.1
ERROR_FLOOR = 1e-4
# Leave a margin below the budget when predicting a rank or a count from energies, because factors are
# stored in float16 and the result is rounded to the target dtype.
_MARGIN = 0.9


@dataclass
class Budget:
    lossless: bool = False
    max_rel_error: float = DEFAULT_MAX_REL_ERROR


@dataclass
class Planned:
    """A record with its stored arrays, ready to be written. ``nbytes`` counts stored bytes."""

    record: Record
    stored: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.stored.values())


def _no_parts(spec: PartSpec) -> torch.Tensor:
    raise AssertionError("a record without terms loads no parts")


def _part_key(tensor: str, slot: str, role: str) -> str:
    return f"{tensor}#{slot}.{role}"


def assemble(
    name: str, target: torch.Tensor, base_name: str | None, terms: list[Encoded], resid: Encoded | None
) -> Planned:
    stored: dict[str, np.ndarray] = {}
    rec_terms: list[Term] = []
    for k, enc in enumerate(terms):
        parts: dict[str, PartSpec] = {}
        for role, (arr, dtype, encoding) in enc.arrays.items():
            spec, data = encode_part(_part_key(name, str(k), role), arr, dtype, encoding)
            parts[role] = spec
            stored[spec.key] = data
        rec_terms.append(Term(enc.codec, dict(enc.params), parts))
    rspec = None
    if resid is not None:
        arr, dtype, encoding = resid.arrays["xor"]
        rspec, data = encode_part(_part_key(name, "r", "xor"), arr, dtype, encoding)
        stored[rspec.key] = data
    rec = Record(name, tuple(target.shape), format_dtype(target.dtype), base_name, rec_terms, rspec, {})
    return Planned(rec, stored)


def rebuild_planned(p: Planned, base: torch.Tensor | None) -> torch.Tensor:
    """Rebuild from the stored (encoded, compressed) arrays exactly as a reader would."""

    def load(spec: PartSpec) -> torch.Tensor:
        return from_storage(read_part_array(spec, p.stored[spec.key], spec.key), spec.dtype)

    return reconstruct(p.record, base, load)


def measure(y: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    if not target.is_floating_point():
        exact = bool(torch.equal(y, target))
        return {"rel_l2": 0.0 if exact else 1.0, "max_abs": 0.0 if exact else float("inf")}
    if bitwise_equal(y, target):
        return {"rel_l2": 0.0, "max_abs": 0.0}
    d = y.to(torch.float64) - target.to(torch.float64)
    nw = float(torch.linalg.vector_norm(target.to(torch.float64)))
    nd = float(torch.linalg.vector_norm(d))
    rel = nd / nw if nw > 0 else (0.0 if nd == 0 else math.inf)
    return {"rel_l2": rel, "max_abs": float(d.abs().max()) if d.numel() else 0.0}


class TensorPlanner:
    """Plans one tensor. ``plan()`` returns the cheapest Planned that meets the budget, error recorded."""

    def __init__(self, name: str, target: torch.Tensor, base_name: str | None, base: torch.Tensor | None, budget: Budget):
        self.name, self.target, self.base_name, self.base, self.budget = name, target, base_name, base, budget
        self.shape = tuple(target.shape)
        if base is not None and (base.dim() != target.dim() or base.is_floating_point() != target.is_floating_point()):
            self.base_name, self.base = None, None
        if base is not None and not target.is_floating_point() and base.dtype != target.dtype:
            self.base_name, self.base = None, None

    _drift = 0.0

    def _finish(self, p: Planned) -> Planned:
        y = rebuild_planned(p, self.base)
        p.record.error = self._errors(y)
        return p

    def _errors(self, y: torch.Tensor) -> dict[str, float]:
        err = measure(y, self.target)
        if self._drift > 0:
            err["rel_drift"] = err["rel_l2"] / self._drift
        return err

    def plan(self) -> Planned:
        t, b = self.target, self.base
        if b is None:
            return self._finish(assemble(self.name, t, None, [dense.encode(t)], None))
        cdtype = compute_torch_dtype(format_dtype(t.dtype)) if t.is_floating_point() else t.dtype
        pred0 = predict(Record(self.name, self.shape, format_dtype(t.dtype), self.base_name), b, _no_parts, b.device)
        if bitwise_equal(pred0, t):
            return self._finish(assemble(self.name, t, self.base_name, [], None))
        if self.budget.lossless or not t.is_floating_point():
            return self._finish(self._cheapest(self._lossless(pred0)))
        return self._lossy(cdtype, pred0)

    # -- lossless -------------------------------------------------------------------------------------
    def _lossless(self, pred0: torch.Tensor) -> list[Planned]:
        t = self.target
        return [
            assemble(self.name, t, self.base_name, [], residual.encode(t, pred0)),
            assemble(self.name, t, None, [dense.encode(t)], None),
        ]

    @staticmethod
    def _cheapest(cands: list[Planned]) -> Planned:
        return min(cands, key=lambda p: p.nbytes)  # min keeps the first of equals: deterministic

    # -- lossy ----------------------------------------------------------------------------------------
    def _ok(self, p: Planned, limit: float) -> bool:
        y = rebuild_planned(p, self.base)
        err = self._errors(y)
        p.record.error = err
        return err["rel_l2"] <= limit

    def _lossy(self, cdtype: torch.dtype, pred0: torch.Tensor) -> Planned:
        t = self.target
        assert self.base is not None
        bview = base_view(self.base, self.shape, cdtype)
        wc = t.to(cdtype)
        delta = wc - bview
        nw = float(torch.linalg.vector_norm(wc.to(torch.float64)))
        nd = float(torch.linalg.vector_norm(delta.to(torch.float64)))
        limit = max(self.budget.max_rel_error * nd, ERROR_FLOOR * nw) / nw  # relative to ||W||
        self._drift = nd / nw
        exact = self._lossless(pred0)
        best = self._cheapest(exact)
        if not math.isfinite(nw) or not math.isfinite(nd) or nw == 0.0 or nd >= nw:
            self._drift = 0.0
            # Nothing to gain from a lossy term: all-zero targets, non-finite values, or drift as large as
            # the tensor itself (an unrelated tensor). Store it exactly, as the cheaper of base+residual and dense.
            return self._finish(best)
        base_only = assemble(self.name, t, self.base_name, [], None)
        if self._ok(base_only, limit):
            return base_only
        cands: list[Planned] = []
        q = self._quant(delta, limit)
        if q is not None:
            cands.append(q)
        budget_bytes = min([best.nbytes] + [c.nbytes for c in cands])
        lr = self._lowrank(delta, limit, nw, budget_bytes)
        if lr is not None:
            cands.append(lr)
            budget_bytes = min(budget_bytes, lr.nbytes)
        sp = self._sparse(delta, limit, nw, budget_bytes)
        if sp is not None:
            cands.append(sp)
        if not cands:
            return self._finish(best)
        return self._cheapest(cands + [self._finish(best)])

    def _quant(self, delta: torch.Tensor, limit: float) -> Planned | None:
        """Smallest bit width meeting the budget (binary search: error falls as bits grow)."""
        lo, hi = MIN_BITS, MAX_BITS
        found: Planned | None = None
        while lo <= hi:
            bits = (lo + hi) // 2
            codes, scales = quant.best(delta, bits)
            p = assemble(self.name, self.target, self.base_name, [quant.encode(codes, scales, bits)], None)
            if self._ok(p, limit):
                found, hi = p, bits - 1
            else:
                lo = bits + 1
        return found

    def _lowrank(self, delta: torch.Tensor, limit: float, nw: float, budget_bytes: int) -> Planned | None:
        if len(self.shape) < 2:
            return None
        m, n = rows_cols(self.shape)
        max_rank = min(m, n, budget_bytes // (2 * (m + n)))
        if max_rank < 1:
            return None
        u, s, vh = lowrank.spectrum(delta, max_rank)
        total = float(torch.linalg.vector_norm(delta.to(torch.float64))) ** 2
        tail = total - np.cumsum(s.to(torch.float64).numpy() ** 2)
        allowed = (_MARGIN * limit * nw) ** 2
        ok = np.nonzero(tail <= allowed)[0]
        if ok.size == 0:
            return None
        rank = int(ok[0]) + 1
        while rank <= max_rank:
            p = assemble(self.name, self.target, self.base_name, [lowrank.encode(u, s, vh, rank)], None)
            if self._ok(p, limit):
                return p
            rank = max(rank + 1, int(rank * 1.25))
        return None

    def _sparse(self, delta: torch.Tensor, limit: float, nw: float, budget_bytes: int) -> Planned | None:
        flat = delta.reshape(-1).to(torch.float64)
        sq = torch.sort(flat * flat, descending=True, stable=True).values
        tail = float(sq.sum()) - torch.cumsum(sq, 0)
        allowed = (_MARGIN * limit * nw) ** 2
        hits = torch.nonzero(tail <= allowed)
        if hits.numel() == 0:
            return None
        count = int(hits[0]) + 1
        if count * 4 >= budget_bytes:  # at least ~4 bytes an entry (index + fp16 value, compressed)
            return None
        p = assemble(self.name, self.target, self.base_name, [sparse.encode(delta, count)], None)
        return p if self._ok(p, limit) else None


def plan_tensor(
    name: str, target: torch.Tensor, base_name: str | None, base: torch.Tensor | None, budget: Budget
) -> Planned:
    return TensorPlanner(name, target, base_name, base, budget).plan()
