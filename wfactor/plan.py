"""Per-tensor codec choice under an error budget: the cheapest record whose measured error meets it.

The budget bounds each rebuilt tensor's error relative to the member's drift from the backbone:

    ||Y - W||_F <= max(max_rel_error * ||W - B||_F,  ERROR_FLOOR * ||W||_F)

(Y rebuilt, W the member's tensor, B its base view). Measuring against the drift rather than the weight
keeps a fixed share of every fine-tune's change, whether it moved the weights by 0.1% or by 10%; the
floor accepts errors far below bf16 resolution. Errors are measured on the actual reconstruction, through
the reader's own code path, after rounding to the target dtype. ``lossless`` demands Y == W bit for bit.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import exact
from .budget import DEFAULT_MAX_REL_ERROR, Budget  # noqa: F401  (the planner's options; re-exported)
from .codecs import dense, lowrank, quant, requant, residual, sparse
from .codecs.base import Encoded
from .errors import InputError
from .exact import EXACT_TRY_DENSE, Planned, part_key, rekey  # noqa: F401  (re-exported)
from .format.constants import MAX_BITS, MIN_BITS
from .format.parts import PartSpec, encode_part, read_part_array
from .format.records import Record, Term, rows_cols
from .reconstruct import base_view, predict, reconstruct
from .tensors import bitwise_equal, compute_torch_dtype, format_dtype, from_storage, storage_view

if TYPE_CHECKING:
    from .sources import Source

ERROR_FLOOR = 1e-4
# Leave a margin below the budget when predicting a rank or a count from energies, because factors are
# stored in float16 and the result is rounded to the target dtype.
_MARGIN = 0.9


def assemble(
    name: str, target: torch.Tensor, base_name: str | None, terms: list[Encoded], resid: Encoded | None
) -> Planned:
    """The record of ``terms`` (and a residual) for tensor ``target`` (:func:`wfactor.exact.assemble`)."""
    return exact.assemble(name, tuple(target.shape), format_dtype(target.dtype), base_name, terms, resid)


def rebuild_planned(p: Planned, base: torch.Tensor | None) -> torch.Tensor:
    """Rebuild from the stored (encoded, compressed) arrays exactly as a reader would."""

    def load(spec: PartSpec) -> torch.Tensor:
        return from_storage(read_part_array(spec, p.stored[spec.key], spec.key), spec.dtype)

    return reconstruct(p.record, base, load)


MEASURE_CHUNK = 1 << 20


def sumsq64(x: torch.Tensor) -> float:
    """Sum of squares in float64, a chunk at a time (no float64 copy of the whole tensor)."""
    flat = x.reshape(-1)
    chunks = range(0, flat.numel(), MEASURE_CHUNK)
    return sum(float(flat[i : i + MEASURE_CHUNK].to(torch.float64).square().sum()) for i in chunks)


def measure(y: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    if not target.is_floating_point():
        exact = bool(torch.equal(y, target))
        return {"rel_l2": 0.0 if exact else 1.0, "max_abs": 0.0 if exact else float("inf")}
    if bitwise_equal(y, target):
        return {"rel_l2": 0.0, "max_abs": 0.0}
    # float64 arithmetic in chunks: the memory stays bounded whatever the tensor's size
    yf, tf = y.reshape(-1), target.reshape(-1)
    sw = sd = mx = 0.0
    for i in range(0, tf.numel(), MEASURE_CHUNK):
        tc = tf[i : i + MEASURE_CHUNK].to(torch.float64)
        dc = yf[i : i + MEASURE_CHUNK].to(torch.float64) - tc
        sw += float(tc.square().sum())
        sd += float(dc.square().sum())
        mx = max(mx, float(dc.abs().max()))
    nw, nd = math.sqrt(sw), math.sqrt(sd)
    rel = nd / nw if nw > 0 else (0.0 if nd == 0 else math.inf)
    return {"rel_l2": rel, "max_abs": mx}


class TensorPlanner:
    """Plans one tensor as a choice among *options*, each a reproducible recipe named by a string:

    ``identical``, ``exact`` (the cheaper of base + XOR residual and dense), ``base`` (the base alone,
    lossy), ``quant:k``, ``lowrank:r``, ``lowrank+quant:r:k``, ``sparse:count``.

    ``plan()`` returns the cheapest option meeting the per-tensor budget; ``ladder()`` lists the
    (option, bytes, squared relative error) trade-offs for a family-wide byte budget, and ``build(option)``
    re-creates any of them deterministically.
    """

    def __init__(
        self, name: str, target: torch.Tensor, base_name: str | None, base: torch.Tensor | None, budget: Budget
    ):
        self.name, self.target, self.base_name, self.base, self.budget = name, target, base_name, base, budget
        self.shape = tuple(target.shape)
        self.dtype = format_dtype(target.dtype)
        if base is not None and not exact.usable_base(self.dtype, self.shape, format_dtype(base.dtype), base.shape):
            self.base_name, self.base = None, None
        self._drift = 0.0
        self._prepared = False
        self._cache: dict[str, Planned] = {}

    # -- shared state ---------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Classify the tensor once: identical, exact-only (no useful lossy option), or lossy."""
        if self._prepared:
            return
        self._prepared = True
        t, b = self.target, self.base
        # the exact options, torch-free (wfactor.exact): the reader's base-only prediction and its residual
        self.exact = exact.Exact(
            self.name,
            storage_view(t),
            self.dtype,
            self.base_name,
            storage_view(b) if b is not None else None,
            format_dtype(b.dtype) if b is not None else None,
        )
        self.kind = "exact"
        if b is None:
            return
        if self.exact.identical:
            self.kind = "identical"
            return
        if self.budget.lossless or not t.is_floating_point():
            return
        cdtype = compute_torch_dtype(format_dtype(t.dtype))
        self.bview = base_view(b, self.shape, cdtype)
        wc = t.to(cdtype)
        self.delta = wc - self.bview
        self.nw = math.sqrt(sumsq64(wc))
        self.nd = math.sqrt(sumsq64(self.delta))
        # Nothing to gain from a lossy term: all-zero targets, non-finite values, or drift as large as the
        # tensor itself (an unrelated tensor). Those are stored exactly.
        if math.isfinite(self.nw) and math.isfinite(self.nd) and 0.0 < self.nd < self.nw:
            self.kind = "lossy"
            self._drift = self.nd / self.nw

    def _errors(self, y: torch.Tensor) -> dict[str, float]:
        err = measure(y, self.target)
        if self._drift > 0:
            err["rel_drift"] = err["rel_l2"] / self._drift
        return err

    def build(self, option: str) -> Planned:
        """Encode ``option``, rebuild it through the reader's code path and record its measured error."""
        if option in self._cache:
            return self._cache[option]
        self._prepare()
        t = self.target
        kind, *args = option.split(":")
        if option == "identical" and self.exact.identical:  # bit for bit by construction: nothing to measure
            p = self.exact.plan()
            self._cache[option] = p
            return p
        if option == "identical":
            p = self.exact.reference()
        elif option == "exact":
            # base + XOR residual, or the tensor dense, whichever is smaller (wfactor.exact): exact by
            # construction (XOR restores every bit; dense is the bytes), nothing to measure
            p = self.exact.smallest()
            p.record.error |= {"rel_drift": 0.0} if self._drift > 0 else {}
            self._cache[option] = p
            return p
        elif option == "base":
            p = assemble(self.name, t, self.base_name, [], None)
        elif kind == "quant":
            bits = int(args[0])
            p = assemble(self.name, t, self.base_name, [quant.encode(*quant.best(self.delta, bits), bits)], None)
        elif kind == "lowrank":
            p = assemble(self.name, t, self.base_name, [self._lowrank_term(int(args[0]))], None)
        elif kind == "lowrank+quant":
            rank, bits = int(args[0]), int(args[1])
            lr = self._lowrank_term(rank)
            rest = self.delta - self._spectrum_product(rank).reshape(self.shape)
            q = quant.encode(*quant.best(rest, bits), bits)
            del rest  # before the rebuild below: keep one tensor-sized temporary at a time
            p = assemble(self.name, t, self.base_name, [lr, q], None)
        elif kind == "sparse":
            p = assemble(self.name, t, self.base_name, [sparse.encode(self.delta, int(args[0]))], None)
        else:
            raise AssertionError(f"unknown option {option!r}")
        p.record.error = self._errors(rebuild_planned(p, self.base))
        self._cache[option] = p
        return p

    # -- low rank helpers -----------------------------------------------------------------------------
    def _max_rank(self, budget_bytes: int) -> int:
        if len(self.shape) < 2:
            return 0
        m, n = rows_cols(self.shape)
        return int(min(m, n, budget_bytes // (2 * (m + n))))

    def _spectrum(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        have = getattr(self, "_svd", None)
        if have is None or have[1].numel() < rank:
            m, n = rows_cols(self.shape)
            want = min(m, n, max(rank, 2 * (have[1].numel() if have else 0), 8))
            self._svd = lowrank.spectrum(self.delta, want)
        u, s, vh = self._svd
        return u, s, vh

    def _lowrank_term(self, rank: int) -> Encoded:
        u, s, vh = self._spectrum(rank)
        return lowrank.encode(u, s, vh, rank)

    def _spectrum_product(self, rank: int) -> torch.Tensor:
        """What the stored factors of rank ``rank`` rebuild to, in float32 (factors rounded as stored)."""
        enc = self._lowrank_term(rank)
        u = from_storage(enc.arrays["u"][0], enc.arrays["u"][1]).to(torch.float32)
        v = from_storage(enc.arrays["v"][0], enc.arrays["v"][1]).to(torch.float32)
        return (u @ v).to(self.delta.dtype)

    # -- per-tensor budget ----------------------------------------------------------------------------
    def plan(self) -> Planned:
        self._prepare()
        if self.kind != "lossy":
            return self.build(self.kind)
        limit = max(self.budget.max_rel_error * self.nd, ERROR_FLOOR * self.nw) / self.nw  # relative to ||W||
        base_only = self.build("base")
        if base_only.record.error["rel_l2"] <= limit:
            return base_only
        # the exact option caps every search; only its size is kept meanwhile (it is rebuilt, identically, in
        # the rare case it wins), so that its stored bytes do not sit in memory through the searches
        exact_bytes = self.build("exact").nbytes
        del self._cache["exact"]
        cands: list[Planned] = []
        q = self._search_bits("quant:{}", limit)
        if q is not None:
            cands.append(q)
        budget_bytes = min([exact_bytes] + [c.nbytes for c in cands])
        lr = self._search_rank(limit, budget_bytes)
        if lr is not None:
            cands.append(lr)
            budget_bytes = min(budget_bytes, lr.nbytes)
        for combo in self._combos(limit, budget_bytes):
            cands.append(combo)
            budget_bytes = min(budget_bytes, combo.nbytes)
        sp = self._search_sparse(limit, budget_bytes)
        if sp is not None:
            cands.append(sp)
        chosen = min(cands, key=lambda c: c.nbytes) if cands else None  # min keeps the first of equals
        return chosen if chosen is not None and chosen.nbytes <= exact_bytes else self.build("exact")

    def _fits(self, option: str, limit: float) -> Planned | None:
        p = self.build(option)
        return p if p.record.error["rel_l2"] <= limit else None

    def _search_bits(self, pattern: str, limit: float) -> Planned | None:
        """Smallest bit width meeting the budget (binary search: error falls as bits grow)."""
        lo, hi = MIN_BITS, MAX_BITS
        found: Planned | None = None
        while lo <= hi:
            bits = (lo + hi) // 2
            p = self._fits(pattern.format(bits), limit)
            if p is not None:
                found, hi = p, bits - 1
            else:
                lo = bits + 1
        return found

    def _search_rank(self, limit: float, budget_bytes: int) -> Planned | None:
        max_rank = self._max_rank(budget_bytes)
        if max_rank < 1:
            return None
        # the spectrum grows only as far as needed (a merged LoRA is found from its first singular values)
        want = min(max_rank, 32)
        while True:
            _u, s, _vh = self._spectrum(want)
            s = s[:want]
            tail = self.nd**2 - np.cumsum(s.to(torch.float64).numpy() ** 2)
            ok = np.nonzero(tail <= (_MARGIN * limit * self.nw) ** 2)[0]
            if ok.size or want >= max_rank:
                break
            want = min(max_rank, want * 4)
        if ok.size == 0:
            return None
        rank = int(ok[0]) + 1
        while rank <= max_rank:
            p = self._fits(f"lowrank:{rank}", limit)
            if p is not None:
                return p
            rank = max(rank + 1, int(rank * 1.25))
        return None

    def _combos(self, limit: float, budget_bytes: int) -> list[Planned]:
        """Low rank for the dominant directions plus a quantised remainder (a merged LoRA on top of a full
        fine-tune, say): tried when a few directions hold a large share of the drift."""
        max_rank = min(self._max_rank(budget_bytes), 16)
        if max_rank < 1:
            return []
        _u, s, _vh = self._spectrum(max_rank)
        energy = np.cumsum(s[:max_rank].to(torch.float64).numpy() ** 2) / self.nd**2
        out = []
        rank = 1
        while rank <= max_rank:
            if energy[rank - 1] >= 0.5:
                p = self._search_bits(f"lowrank+quant:{rank}:{{}}", limit)
                if p is not None:
                    out.append(p)
                break
            rank *= 2
        return out

    def _search_sparse(self, limit: float, budget_bytes: int) -> Planned | None:
        """The fewest largest entries whose omission leaves at most the budget's squared error, if that count
        is affordable (~4 bytes an entry: index + fp16 value, compressed). Only the affordable largest entries
        are ever sorted (a partition finds them), so time and memory stay linear in the tensor."""
        n = self.delta.numel()
        max_count = min(n, (budget_bytes - 1) // 4)
        if max_count < 1:
            return None
        sq = self.delta.reshape(-1).to(torch.float32).square().numpy()  # a private float32 copy
        thr = (_MARGIN * limit * self.nw) ** 2
        total = float(sq.sum(dtype=np.float64))
        if max_count < n:
            sq.partition(n - max_count)  # in place: the max_count largest end up in sq[n - max_count:]
        top = sq[n - max_count :]
        rest = total - float(top.sum(dtype=np.float64))  # the error left when all affordable entries are kept
        if rest > thr:
            return None
        top.sort()  # ascending: dropping top[:j] as well adds cs[j - 1] to the error
        cs = np.cumsum(top, dtype=np.float64)
        j = int(np.searchsorted(cs, thr - rest, side="right"))
        count = max(1, max_count - j)
        return self._fits(f"sparse:{count}", limit)

    # -- family-wide byte budget ----------------------------------------------------------------------
    def ladder(self) -> list[tuple[str, int, float]]:
        """Pareto-efficient (option, stored bytes, squared error ||Y - W||^2) trade-offs, cheapest first.

        Errors are absolute, so that a family-wide allocation minimises the total squared error of all the
        family's weights: measured on the fixture family this keeps outputs far better per byte than
        weighting each tensor's error by its own norm or by its drift (bench/RESULTS.md).

        The last entry always meets the per-tensor budget (so a byte budget never does worse than the
        default where it can afford it), and the exact option closes the ladder."""
        self._prepare()
        if self.kind != "lossy":
            p = self.build(self.kind)
            return [(self.kind, p.nbytes, 0.0)]
        opts = ["base"] + [f"quant:{k}" for k in range(MIN_BITS, MAX_BITS + 1)]
        exact = self.build("exact")
        max_rank = self._max_rank(exact.nbytes)
        r = 1
        while r <= max_rank:
            opts.append(f"lowrank:{r}")
            r *= 2
        numel = self.target.numel()
        for frac in (0.01, 0.05):
            count = int(numel * frac)
            if 0 < count and count * 4 < exact.nbytes:
                opts.append(f"sparse:{count}")
        scale = self.nw**2  # rel_l2 is relative to ||W||
        points = [(o, self.build(o).nbytes, self.build(o).record.error["rel_l2"] ** 2 * scale) for o in opts]
        chosen = self.plan()
        points.append((self._option_of(chosen), chosen.nbytes, chosen.record.error["rel_l2"] ** 2 * scale))
        points.append(("exact", exact.nbytes, 0.0))
        points.sort(key=lambda x: (x[1], x[2], x[0]))
        frontier: list[tuple[str, int, float]] = []
        for o, b, e in points:
            if not frontier or e < frontier[-1][2]:
                frontier.append((o, b, e))
        self._cache.clear()  # keep memory bounded: pass 2 re-encodes only the chosen option
        return frontier

    def _option_of(self, p: Planned) -> str:
        for o, q in self._cache.items():
            if q is p:
                return o
        raise AssertionError("planned record without an option")


def plan_tensor(
    name: str,
    target: torch.Tensor,
    base_name: str | None,
    base: torch.Tensor | None,
    budget: Budget,
    option: str | None = None,
) -> Planned:
    """The cheapest record meeting ``budget``, or the given ``option`` (from a family-wide allocation)."""
    planner = TensorPlanner(name, target, base_name, base, budget)
    return planner.build(option) if option is not None else planner.plan()


def allocate(ladders: list[list[tuple[str, int, float]]], spend: int) -> tuple[list[str], int]:
    """Choose one option per ladder so that the total bytes stay within ``spend`` while the sum of squared
    errors is as small as a greedy walk along each ladder's lower convex hull can make it:
    every step buys the largest error reduction per byte available anywhere in the family.

    Returns the options and the bytes they use. Deterministic: ties go to the earlier ladder."""
    hulls = []
    for pts in ladders:
        hull = [pts[0]]
        for p in pts[1:]:
            while len(hull) >= 2:
                (_o1, b1, e1), (_o2, b2, e2) = hull[-2], hull[-1]
                if (e1 - e2) / max(b2 - b1, 1) <= (e2 - p[2]) / max(p[1] - b2, 1):
                    hull.pop()  # the middle point is not on the lower convex hull
                else:
                    break
            hull.append(p)
        hulls.append(hull)
    pos = [0] * len(hulls)
    used = sum(h[0][1] for h in hulls)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h, k = hulls[i], pos[i]
        if k + 1 < len(h):
            gain = (h[k][2] - h[k + 1][2]) / max(h[k + 1][1] - h[k][1], 1)
            heapq.heappush(heap, (-gain, i))

    for i in range(len(hulls)):
        push(i)
    while heap:
        _g, i = heapq.heappop(heap)
        h, k = hulls[i], pos[i]
        step = h[k + 1][1] - h[k][1]
        if used + step <= spend:
            used += step
            pos[i] = k + 1
            push(i)
    return [h[k][0] for h, k in zip(hulls, pos)], used


def plan_prescaled(
    name: str, target: torch.Tensor, base_name: str, base: torch.Tensor, scales: torch.Tensor
) -> Planned:
    """A quantised member tensor ``target`` = round(W / s) (one float32 scale per row, ``scales``), stored
    lossless against its float base: the prediction round(B / s) (a ``rescale`` term, spec 4.2) plus the XOR
    residual of the codes that differ (none for a plain quantised copy of the base), or the tensor dense
    when that is smaller. The member's own scales are a tensor of the member as well (stored as they are)."""
    s = scales.to(torch.float32).reshape(-1).contiguous()
    rescale = Encoded("rescale", {}, {"scales": (storage_view(s), "F32", "zstd_planes")})
    probe = assemble(name, target, base_name, [rescale], None)

    def load(spec: PartSpec) -> torch.Tensor:
        return from_storage(read_part_array(spec, probe.stored[spec.key], spec.key), spec.dtype)

    pred = predict(probe.record, base, load, base.device)
    same = bitwise_equal(pred, target)
    p = probe if same else assemble(name, target, base_name, [rescale], residual.encode(target, pred))
    if not same and p.nbytes > EXACT_TRY_DENSE * target.numel() * target.element_size():
        d = assemble(name, target, None, [dense.encode(target)], None)
        p = d if d.nbytes < p.nbytes else p
    p.record.error = {"rel_l2": 0.0, "max_abs": 0.0}
    return p


def plan_requant(
    name: str,
    target: torch.Tensor,
    base_name: str,
    base: torch.Tensor,
    params: dict[str, Any],
    scales: torch.Tensor,
    groups: torch.Tensor | None,
) -> Planned:
    """A packed integer weight ``target`` (int4/int8 codes in the member's layout, ``params`` of a requant
    term) stored lossless against its float base: the codes of the base quantised with the member's own
    ``scales`` (a requant term, spec 4.2 and 5.4), plus a code correction where they differ (all zero, and
    almost free, for a plain quantised copy of the base), or the tensor dense when that is smaller. The
    prediction is checked bit for bit through the reader's path; what it misses (padding bits) goes into an
    XOR residual."""
    bits, layout, rows, inputs = int(params["bits"]), str(params["layout"]), base.shape[0], base.shape[1]
    s, gidx = requant.grouping(params, rows, inputs, scales, groups, base.device)
    correction = requant.unpack(target, bits, inputs, layout)
    correction.sub_(requant.quantize(base, s, gidx, bits, int(params["zero"])))
    term = Encoded("requant", dict(params), {"correction": (storage_view(correction.to(torch.int8)), "I8", "zstd")})
    del correction
    p = assemble(name, target, base_name, [term], None)

    def load(spec: PartSpec) -> torch.Tensor:
        return from_storage(read_part_array(spec, p.stored[spec.key], spec.key), spec.dtype)

    named = {params["scales"]: scales} | ({params["groups"]: groups} if groups is not None else {})

    def others(key: str) -> torch.Tensor:  # the member's own scales / groups: stored lossless beside it
        return named[key]

    pred = predict(p.record, base, load, base.device, others)
    if not bitwise_equal(pred, target):
        p = assemble(name, target, base_name, [term], residual.encode(target, pred))
    d = assemble(name, target, None, [dense.encode(target)], None)
    p = d if d.nbytes < p.nbytes else p
    p.record.error = {"rel_l2": 0.0, "max_abs": 0.0}
    return p


def planning_pair(
    member: Source, base: Source, key: str, bname: str | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(the member tensor to plan, the backbone tensor to plan it against, the rescale scales of a quantised
    backbone or None). On a quantised backbone (:class:`wfactor.quantized.Fp8Backbone`) the member is planned
    against the backbone's view V ~= B, as its change from the base carried over onto it: W' = W + (V - B),
    so that a tensor the member left unchanged is the view itself (no bytes)."""
    target = member.tensor(key)
    if bname is None:
        return target, None, None
    view, original, t = base.planning_view(bname)
    if t is None or original is None or not target.is_floating_point():
        return target, view, None
    if member.prescale(key) is not None or member.packed(key) is not None:
        raise InputError(
            f"{member.path}: tensor {key!r} is a quantised weight; --backbone-dtype fp8 factors float members "
            "only (factor quantised checkpoints against a float backbone)"
        )
    shape, cd = tuple(target.shape), compute_torch_dtype(format_dtype(target.dtype))
    moved = target.to(cd) + (base_view(view, shape, cd) - base_view(original, shape, cd))
    return moved.to(target.dtype), view, t


def with_rescale(p: Planned, t: torch.Tensor) -> Planned:
    """``p`` (planned against a quantised backbone's view B / t) with the ``rescale`` term by ``t`` in front,
    so that the reader's prediction starts from that view (spec 5.1 step 1a); rows the base does not have
    (a grown vocabulary) are zeros whatever their scale, 1."""
    rec = p.record
    m = rows_cols(rec.shape)[0]
    scales = torch.ones(m, dtype=torch.float32)
    k = min(m, t.numel())
    scales[:k] = t.reshape(-1)[:k]
    spec, data = encode_part(part_key(rec.name, "s", "scales"), storage_view(scales), "F32", "zstd_planes")
    terms = [Term("rescale", {}, {"scales": spec})] + list(rec.terms)
    out = Record(rec.name, rec.shape, rec.dtype, rec.base, terms, rec.residual, rec.error, rec.same_as)
    return Planned(out, {**p.stored, spec.key: data})


def plan_with_torch(
    member: Source,
    base: Source,
    key: str,
    bname: str | None,
    budget: Budget,
    option: str | None,
    fast_load: bool,
    pos: int,
    device: str = "cpu",
) -> Planned:
    """One member tensor planned and encoded against its aligned backbone tensor ``bname`` (None: dense), its
    parts keyed by its record position ``pos``, with torch: what :func:`wfactor.jobs.plan_member_tensor` does
    not plan torch-free (lossy budgets, quantised weights, a quantised backbone)."""
    target, base_t, carried = planning_pair(member, base, key, bname)
    if device != "cpu":  # --device cuda: SVDs, searches and error measurements run there; stored parts come back
        target = target.to(device)
        base_t = base_t.to(device) if base_t is not None else None
    if carried is not None:  # a quantised backbone (--backbone-dtype fp8): its view is B / t, a rescale term
        planned = plan_tensor(key, target, bname, base_t, budget, option)
        planned = with_rescale(planned, carried) if planned.record.base is not None else planned
        planned = rekey(planned, str(pos))
        return codes_as_planes(planned) if fast_load else planned
    scales = member.prescale(key) if base_t is not None else None
    packed = member.packed(key) if base_t is not None else None
    if packed is not None and base_t is not None and bname is not None and tuple(base_t.shape) == (
        packed.rows,
        packed.inputs,
    ):  # a packed integer weight: its codes predicted from the float base, lossless
        groups = member.tensor(packed.groups) if packed.groups is not None else None
        planned = plan_requant(key, target, bname, base_t, packed.params(), member.tensor(packed.scales), groups)
    elif scales is not None and base_t is not None and bname is not None:
        planned = plan_prescaled(key, target, bname, base_t, scales)  # a quantised weight: lossless
    else:
        planned = plan_tensor(key, target, bname, base_t, budget, option)
    planned = rekey(planned, str(pos))
    return codes_as_planes(planned) if fast_load else planned


def codes_as_planes(p: Planned) -> Planned:
    """``p`` with the codes of its quant terms stored as bit planes (same values, no decoding on load)."""
    stored = dict(p.stored)
    terms = []
    for t in p.record.terms:
        parts = dict(t.parts)
        spec = parts.get("codes")
        if t.codec == "quant" and spec is not None and spec.encoding != "bitplanes":
            codes = read_part_array(spec, stored.pop(spec.key), f"{p.record.name}: codes")
            parts["codes"], stored[spec.key] = encode_part(spec.key, codes, "I8", "bitplanes")
        terms.append(Term(t.codec, t.params, parts))
    rec = p.record
    return Planned(
        Record(rec.name, rec.shape, rec.dtype, rec.base, terms, rec.residual, rec.error, rec.same_as), stored
    )
