"""Drift between one member tensor and its base tensor, and the relatedness verdict (spec/ANALYZE.md).

The numbers behind `wfactor analyze` and behind every relatedness decision of `factor`, `add` and the
alignment of towers (:mod:`wfactor.align`): per-tensor drift, cosine, effective rank and changed share;
per-member and per-block summaries; the verdict rule. Pure functions over tensors: no file I/O, no sources.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import bits, predict_base, values64
from .format.records import rows_cols

if TYPE_CHECKING:  # ranks only (effective_rank): the verdict and the drift numbers are numpy
    import torch

# Verdict (spec/ANALYZE.md, "Verdict"): a member is related to the base when at least RELATED_MIN_CLOSE_SHARE
# of its shared matrices, by bytes or by count, lie within RELATED_MAX_DRIFT of the base. Models trained from
# different random initialisations are uncorrelated, so their drift is sqrt(1 + (|W|/|B|)^2) >= 1 (about
# sqrt 2 at equal scale); fine-tunes measure well under 0.3.
RELATED_MAX_DRIFT = 0.5
RELATED_MIN_CLOSE_SHARE = 0.5
RANK_ENERGY = 0.99
# Effective rank: an exact SVD up to this smaller dimension, a randomised one (fixed seed) above it.
FULL_SVD_MAX_DIM = 2048
RANDOM_SVD_SEED = 0
_RANDOM_SVD_START = 64
_RANDOM_SVD_OVERSAMPLE = 16
_RANDOM_SVD_POWER_ITERS = 2
_RANDOM_SVD_MAX_K = 512
_CHUNK = 1 << 23  # elements per float64 chunk (64 MiB)

STATUSES = ("identical", "drift", "shape_changed", "dtype_changed", "only_in_member", "only_in_base")

Progress = Callable[[str, int, int], None]


# -- results ---------------------------------------------------------------------------------------------
@dataclass
class TensorAnalysis:
    """One tensor of a member compared with the base tensor of the same name.

    ``rel_drift``, ``cosine``, ``changed_fraction`` and ``rank99`` are None when nothing was compared (the
    tensor is on one side only, or the two differ in their number of dimensions); ``rank99`` is also None
    for 0-D and 1-D tensors, and when the analysis ran without ranks. With a shape mismatch they describe
    the overlapping leading block, and ``note`` says so.
    """

    name: str
    group: str
    status: str
    identical: bool
    shape: list[int] | None
    dtype: str | None
    base_shape: list[int] | None
    base_dtype: str | None
    nbytes: int  # bytes of the member's tensor (of the base's for only_in_base)
    compared: int = 0  # elements compared (the overlapping block)
    rel_drift: float | None = None
    cosine: float | None = None
    rank99: int | None = None
    changed_fraction: float | None = None
    delta_norm: float | None = None
    base_norm: float | None = None
    note: str | None = None
    base: str | None = None  # the backbone tensor it was compared with (its alignment), None if none

    @property
    def is_matrix(self) -> bool:
        return self.shape is not None and len(self.shape) >= 2

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "group": self.group,
            "status": self.status,
            "identical": self.identical,
            "shape": self.shape,
            "dtype": self.dtype,
            "base_shape": self.base_shape,
            "base_dtype": self.base_dtype,
            "bytes": self.nbytes,
            "rel_drift": json_number(self.rel_drift),
            "cosine": json_number(self.cosine),
            "rank99": self.rank99,
            "changed_fraction": json_number(self.changed_fraction),
            "delta_norm": json_number(self.delta_norm),
            "base_norm": json_number(self.base_norm),
            "note": self.note,
        }


@dataclass
class GroupSummary:
    """A layer block (``layers.3``) or a top-level module (``embed_tokens``) of one member.

    ``rel_drift`` is the mean rel_drift of the block's compared tensors weighted by their bytes (what the
    heatmap shows); ``max_rel_drift`` its largest.
    """

    name: str
    tensors: int = 0
    compared: int = 0
    identical: int = 0
    nbytes: int = 0
    rel_drift: float | None = None
    max_rel_drift: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": self.tensors,
            "compared": self.compared,
            "identical": self.identical,
            "bytes": self.nbytes,
            "rel_drift": json_number(self.rel_drift),
            "max_rel_drift": json_number(self.max_rel_drift),
        }


@dataclass
class MemberSummary:
    """Counts and drift statistics of one member against the base."""

    tensors: int = 0  # tensors of the member
    nbytes: int = 0  # bytes of the member
    shared: int = 0  # tensor names the base also has
    compared: int = 0  # shared tensors whose values were compared
    identical: int = 0
    identical_bytes: int = 0
    drift: int = 0
    shape_changed: int = 0
    dtype_changed: int = 0
    only_in_member: int = 0
    only_in_base: int = 0
    median_rel_drift: float | None = None  # over compared tensors, each counted once
    max_rel_drift: float | None = None
    max_rel_drift_tensor: str | None = None
    weighted_rel_drift: float | None = None  # mean over compared tensors, weighted by bytes
    # verdict inputs (spec/ANALYZE.md, "Verdict"): over the compared floating-point matrices (>= 2-D), or
    # over all compared floating-point tensors when the member has no such matrix
    verdict_basis: str = "matrices"
    verdict_tensors: int = 0
    verdict_median_drift: float | None = None  # byte-weighted median rel_drift
    close_share_bytes: float | None = None  # share of their bytes with rel_drift < RELATED_MAX_DRIFT
    close_share_count: float | None = None  # same, by count
    identical_share_bytes: float | None = None  # share of their bytes bit-identical to the base

    def to_json(self) -> dict[str, Any]:
        return {k: (json_number(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def json_number(x: float | None) -> float | None:
    """A JSON-safe number: None when non-finite, else 7 significant digits (stable across BLAS builds)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.7g}")


# -- grouping --------------------------------------------------------------------------------------------
def group_of(name: str) -> str:
    """The layer block of a tensor name: the prefix up to and including its first numeric component after
    the first (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``, ``blocks.12.attn.qkv`` ->
    ``blocks.12``). Other tensors group by their module, the name without its last component
    (``embed_tokens.weight`` -> ``embed_tokens``, ``model.norm.weight`` -> ``model.norm``); a one-component
    name is its own group."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def natural_key(s: str) -> tuple[Any, ...]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p != "")


# -- per-tensor numbers ----------------------------------------------------------------------------------
def _chunks(n: int) -> range:
    return range(0, n, _CHUNK)


def effective_rank(delta: torch.Tensor, energy: float = RANK_ENERGY, seed: int = RANDOM_SVD_SEED) -> int:
    """Smallest r whose top-r singular values hold ``energy`` of ``delta``'s squared Frobenius norm.

    ``delta`` is a 2-D float tensor. Exact (``svdvals``) when its smaller dimension is at most
    FULL_SVD_MAX_DIM; above, a randomised range finder with a fixed seed and power iterations, widened
    (64, 128, ... up to 512 + oversampling) until its leading values hold the energy, and exact past that.
    The randomised values never exceed the true ones, so the randomised estimate can only overstate r.
    """
    import torch

    from .linalg import range_finder

    total = float(torch.linalg.vector_norm(delta.to(torch.float64)) ** 2)
    if total == 0.0:
        return 0
    m, n = delta.shape
    small = min(m, n)
    if small > FULL_SVD_MAX_DIM:
        gen = torch.Generator().manual_seed(seed)
        a = delta.to(torch.float32)
        k = _RANDOM_SVD_START
        while k <= min(_RANDOM_SVD_MAX_K, small // 2):
            width = min(k + _RANDOM_SVD_OVERSAMPLE, small)
            q = range_finder(a, width, gen, _RANDOM_SVD_POWER_ITERS)
            s = torch.linalg.svdvals(q.T @ a).to(torch.float64)
            r = _rank_from(s, total, energy)
            if r is not None and r <= k:
                return r
            k *= 2
    s = torch.linalg.svdvals(delta.to(torch.float32)).to(torch.float64)
    r = _rank_from(s, total, energy)
    return r if r is not None else int(s.numel())


def _rank_from(s: torch.Tensor, total: float, energy: float) -> int | None:
    import torch

    cum = torch.cumsum(s * s, 0)
    hit = torch.nonzero(cum >= energy * total * (1 - 1e-9))
    return int(hit[0, 0]) + 1 if hit.numel() else None


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[slice, ...], str | None]:
    """The overlapping leading block of two shapes of equal rank, and a note when it is not all of them."""
    if tuple(a) == tuple(b):
        return (), None
    overlap = [min(x, y) for x, y in zip(a, b)]
    note = f"shape {list(a)} vs base {list(b)}: compared the overlapping leading block {overlap}"
    return tuple(slice(0, n) for n in overlap), note


def compare_tensor(
    name: str,
    w: np.ndarray,
    b: np.ndarray,
    *,
    member_dtype: str,
    base_dtype: str,
    ranks: bool = True,
    sample: int | None = None,
) -> TensorAnalysis:
    """Compare a member tensor ``w`` with its base tensor ``b`` (storage arrays of their stored dtypes,
    :mod:`wfactor.arrays`; numpy throughout, torch only for ranks). Sums are float64, in chunks, each in
    numpy's fixed order (no BLAS, no threads): the same numbers on every machine.

    ``sample``: estimate drift, cosine and changed share from at most about that many evenly strided
    elements (deterministic; ``compared`` says how many), as ``factor`` does for its relatedness verdict."""
    shape, bshape = list(w.shape), list(b.shape)
    status = "shape_changed" if shape != bshape else "dtype_changed" if member_dtype != base_dtype else "drift"
    ta = TensorAnalysis(name, group_of(name), status, False, shape, member_dtype, bshape, base_dtype, int(w.nbytes))
    if w.ndim != b.ndim:
        ta.note = f"{w.ndim}-D vs {b.ndim}-D in the base: not compared"
        return ta
    region, ta.note = _overlap(tuple(w.shape), tuple(b.shape))
    wb, bb = (w[region], b[region]) if region else (w, b)
    numel = int(wb.size)
    ta.compared = numel
    if numel == 0:
        ta.note = (ta.note + "; " if ta.note else "") + "no elements to compare"
        return ta
    wflat, bflat = (np.ascontiguousarray(x).reshape(-1) for x in (wb, bb))
    if sample is not None and numel > sample and not (ranks and w.ndim >= 2):
        step = -(-numel // sample)
        wflat, bflat = (np.ascontiguousarray(x[::step]) for x in (wflat, bflat))
        numel = ta.compared = int(wflat.size)
    # the base as the planner sees it: cast to the member's dtype, through the compute dtype, NaNs canonical
    # (elementwise: the compared elements only)
    cflat = predict_base(bflat, base_dtype, tuple(bflat.shape), member_dtype)
    wbits, cbits = bits(wflat), bits(cflat)
    changed = 0
    dd = ww = bn = wbdot = 0.0
    need_delta = ranks and w.ndim >= 2
    delta32 = np.empty(numel, dtype=np.float32) if need_delta else None
    with np.errstate(over="ignore", invalid="ignore"):  # infinities and NaNs are reported, not raised
        for i in _chunks(numel):
            j = min(i + _CHUNK, numel)
            changed += int(np.count_nonzero(wbits[i:j] != cbits[i:j]))
            wc = values64(wflat[i:j], member_dtype)
            bc = values64(bflat[i:j], base_dtype)
            dc = wc - bc
            dd += float(np.einsum("i,i->", dc, dc))
            ww += float(np.einsum("i,i->", wc, wc))
            bn += float(np.einsum("i,i->", bc, bc))
            wbdot += float(np.einsum("i,i->", wc, bc))
            if delta32 is not None:
                delta32[i:j] = dc
    ta.changed_fraction = changed / numel
    ta.identical = changed == 0 and shape == bshape
    if ta.identical and status == "drift":
        ta.status = "identical"
    ta.delta_norm, ta.base_norm = math.sqrt(dd), math.sqrt(bn)
    if not all(math.isfinite(x) for x in (dd, ww, bn, wbdot)):
        ta.note = (ta.note + "; " if ta.note else "") + "non-finite values (NaN or infinity): no drift, cosine or rank"
        return ta
    if bn > 0:
        ta.rel_drift = math.sqrt(dd) / math.sqrt(bn)
    elif dd == 0:
        ta.rel_drift = 0.0
    else:
        ta.note = (ta.note + "; " if ta.note else "") + "base tensor is all zeros: no relative drift"
    if ww > 0 and bn > 0:
        ta.cosine = max(-1.0, min(1.0, wbdot / math.sqrt(ww * bn)))
    if delta32 is not None:
        import torch

        rows, cols = rows_cols(tuple(wb.shape))
        ta.rank99 = 0 if dd == 0 else effective_rank(torch.from_numpy(delta32.reshape(rows, cols)))
    return ta


# -- summaries and verdict -------------------------------------------------------------------------------
def _weighted_median(pairs: list[tuple[float, int]]) -> float | None:
    pairs = sorted(pairs)
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    acc = 0
    for value, weight in pairs:
        acc += weight
        if acc * 2 >= total:
            return value
    return pairs[-1][0]


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def summarize(tensors: list[TensorAnalysis]) -> tuple[MemberSummary, list[GroupSummary]]:
    s = MemberSummary()
    groups: dict[str, GroupSummary] = {}
    weighted: dict[str, list[float]] = {}
    drifts: list[tuple[float, TensorAnalysis]] = []
    for t in tensors:
        if t.status == "only_in_base":
            s.only_in_base += 1
            continue
        s.tensors += 1
        s.nbytes += t.nbytes
        g = groups.setdefault(t.group, GroupSummary(t.group))
        g.tensors += 1
        g.nbytes += t.nbytes
        if t.status == "only_in_member":
            s.only_in_member += 1
            continue
        s.shared += 1
        setattr(s, t.status, getattr(s, t.status) + 1)
        if t.identical:
            s.identical_bytes += t.nbytes
            g.identical += 1
            if t.status != "identical":  # a dtype_changed tensor equal to the cast base
                s.identical += 1
        if t.rel_drift is None:
            continue
        s.compared += 1
        g.compared += 1
        drifts.append((t.rel_drift, t))
        acc = weighted.setdefault(t.group, [0.0, 0.0])
        acc[0] += t.rel_drift * t.nbytes
        acc[1] += t.nbytes
        g.max_rel_drift = t.rel_drift if g.max_rel_drift is None else max(g.max_rel_drift, t.rel_drift)
    for name, (num, den) in weighted.items():
        groups[name].rel_drift = num / den if den > 0 else groups[name].max_rel_drift
    if drifts:
        s.median_rel_drift = _median([d for d, _ in drifts])
        worst = max(drifts, key=lambda p: p[0])
        s.max_rel_drift, s.max_rel_drift_tensor = worst[0], worst[1].name
        wsum = sum(t.nbytes for _, t in drifts)
        s.weighted_rel_drift = sum(d * t.nbytes for d, t in drifts) / wsum if wsum else None
    # verdict population: shared floating-point matrices (1-D/0-D ones when a model has no matrix)
    pop = [t for _, t in drifts if t.is_matrix and _is_float(t)]
    if not pop:
        s.verdict_basis = "tensors"
        pop = [t for _, t in drifts if _is_float(t)]
    if pop:
        weights = [(t.rel_drift or 0.0, t.compared * _itemsize(t)) for t in pop]
        total = sum(w for _, w in weights)
        s.verdict_tensors = len(pop)
        s.verdict_median_drift = _weighted_median(weights)
        close = [t for t in pop if (t.rel_drift or 0.0) < RELATED_MAX_DRIFT]
        s.close_share_bytes = sum(t.compared * _itemsize(t) for t in close) / total if total else None
        s.close_share_count = len(close) / len(pop)
        s.identical_share_bytes = sum(t.compared * _itemsize(t) for t in pop if t.identical) / total if total else None
    ordered = [groups[k] for k in sorted(groups, key=natural_key)]
    return s, ordered


def component_summaries(tensors: list[TensorAnalysis]) -> list[GroupSummary]:
    """Per component of a pipeline (the ``<component>/`` namespace of its tensor names), the same figures as a
    layer block: tensors, identical ones, bytes, byte-weighted mean and largest drift. Tensors only in the
    base count in no component, as in blocks."""
    comps: dict[str, GroupSummary] = {}
    acc: dict[str, list[float]] = {}
    for t in tensors:
        if t.status == "only_in_base":
            continue
        c = comps.setdefault(t.name.split("/", 1)[0], GroupSummary(t.name.split("/", 1)[0]))
        c.tensors += 1
        c.nbytes += t.nbytes
        if t.identical:
            c.identical += 1
        if t.rel_drift is None:
            continue
        c.compared += 1
        a = acc.setdefault(c.name, [0.0, 0.0])
        a[0] += t.rel_drift * t.nbytes
        a[1] += t.nbytes
        c.max_rel_drift = t.rel_drift if c.max_rel_drift is None else max(c.max_rel_drift, t.rel_drift)
    for name, (num, den) in acc.items():
        comps[name].rel_drift = num / den if den > 0 else comps[name].max_rel_drift
    return [comps[k] for k in sorted(comps, key=natural_key)]


_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def _itemsize(t: TensorAnalysis) -> int:
    return _ITEMSIZE.get(t.dtype or "", 1)


def _is_float(t: TensorAnalysis) -> bool:
    return t.dtype in ("F64", "F32", "F16", "BF16") and t.base_dtype in ("F64", "F32", "F16", "BF16")


def verdict(s: MemberSummary, shares_nothing: bool) -> tuple[bool, str]:
    """related / reason from a member's summary (the rule of spec/ANALYZE.md, "Verdict")."""
    if shares_nothing:
        return (
            False,
            "no tensor has both a name and a shape in common with the base: a different architecture",
        )
    if s.verdict_median_drift is None or s.close_share_bytes is None or s.close_share_count is None:
        return False, "no floating-point tensor could be compared with the base"
    by_bytes = s.close_share_bytes >= RELATED_MIN_CLOSE_SHARE
    by_count = s.close_share_count >= RELATED_MIN_CLOSE_SHARE
    figures = f"median drift {s.verdict_median_drift:.3g} over {s.verdict_tensors} shared {s.verdict_basis}"
    close = f"{s.close_share_bytes:.0%} of their bytes"
    if by_count and not by_bytes:
        close += f" but {s.close_share_count:.0%} of them"
    close += f" within {RELATED_MAX_DRIFT:g} of the base"
    ident = s.identical_share_bytes or 0.0
    if by_bytes or by_count:
        kind = (
            "mostly bit-identical to the base"
            if ident >= 0.5
            else "a fine-tune of the base"
            if by_bytes
            else "partly derived from the base"
        )
        extra = f", {ident:.0%} bit-identical" if ident > 0 else ""
        return True, f"{kind}: {figures}, {close}{extra}"
    return False, (
        f"not derived from the base: {figures}, {close} (models from different random initialisations drift about 1.41)"
    )
