"""Reconstruction of one member tensor from its backbone tensor and its record (spec/FORMAT.md section 5).

    X = cast_C(view(B));  X = X + term_1 ... + term_k;  Y = round_T(X);  Y = Y XOR R  (if a residual)

``view`` copies the overlapping leading block of B into zeros of the target's shape (a grown vocabulary
shares the base's rows). Everything runs on the device of the base tensor / the requested device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .codecs import requant, rescale
from .codecs import residual as residual_codec
from .codecs.registry import decode_term
from .errors import CodecError
from .format.parts import PartSpec
from .format.records import Record
from .tensors import F8_TORCH, TORCH_DTYPES, compute_torch_dtype

PartLoader = Callable[[PartSpec], torch.Tensor]
RecordLoader = Callable[[str], torch.Tensor]  # another record of the same delta, rebuilt (requant's scales)

# codecs whose decoded term is always a new tensor (never a view of a cached part): safe to sum into in place
FRESH_TERMS = frozenset({"quant", "sparse"})


def base_view(base: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """cast(B) resized to ``shape``: the common leading block is B's, the rest is zero."""
    if tuple(base.shape) == tuple(shape):
        return base.to(dtype)
    out = torch.zeros(shape, dtype=dtype, device=base.device)
    region = tuple(slice(0, min(a, b)) for a, b in zip(base.shape, shape))
    out[region] = base[region].to(dtype)
    return out


_CANONICAL_NAN = {
    torch.float64: (torch.int64, 0x7FF8000000000000),
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float16: (torch.int16, 0x7E00),
    torch.bfloat16: (torch.int16, 0x7FC0),
}


def canonical_nan(y: torch.Tensor) -> torch.Tensor:
    """Every NaN becomes the canonical quiet NaN of its dtype (spec 5.1 step 3): NaN payloads after
    arithmetic and casts differ between devices and libraries; the residual restores the original ones."""
    if not y.is_floating_point():
        return y
    if y.dtype in F8_TORCH:  # 8-bit floats: no arithmetic on them in torch; the canonical NaN is 0x7F
        nan = torch.isnan(y)
        if not bool(nan.any()):
            return y
        raw = y.view(torch.uint8).clone()
        raw[nan] = 0x7F
        return raw.view(y.dtype)
    # Cheap prefilter: a NaN anywhere makes the sum NaN; a NaN-free tensor sums to a number or, on
    # overflow, to an infinity or (inf - inf) a NaN, and only then is the elementwise scan needed.
    if not bool(torch.isnan(y.sum())):
        return y
    nan = torch.isnan(y)
    if not bool(nan.any()):
        return y
    ity, bits = _CANONICAL_NAN[y.dtype]
    canon = torch.tensor(bits, dtype=ity, device=y.device).view(y.dtype)
    return torch.where(nan, canon, y)


def predict(
    record: Record,
    base: torch.Tensor | None,
    load: PartLoader,
    device: torch.device | str,
    others: RecordLoader | None = None,
) -> torch.Tensor:
    """round_T(cast_C(view(B)) + terms): the record's prediction in the target dtype, before any residual.
    ``others`` rebuilds another record of the delta by name (a requant term's scales and groups, spec 5.4)."""
    target = TORCH_DTYPES[record.dtype]
    if record.terms and record.terms[0].codec == "requant":
        term = record.terms[0]
        if base is None or others is None:
            raise CodecError("a requant record needs its base and the delta's other records")
        groups = term.params.get("groups")
        return requant.decode(
            base.to(device),
            term.params,
            load(term.parts["correction"]),
            others(str(term.params["scales"])),
            others(str(groups)) if groups is not None else None,
        )
    cdtype = compute_torch_dtype(record.dtype) if target.is_floating_point else target
    if not record.terms:
        assert base is not None
        if base.dtype == target:  # exact: no cast at all, and the backbone's own storage when shapes agree
            return base_view(base.to(device), record.shape, target)
        return canonical_nan(base_view(base.to(device), record.shape, cdtype).to(target))
    if record.terms[0].codec == "dense":  # Y = values, bit for bit (spec 5.1): no arithmetic at all
        spec = record.terms[0].parts["values"]
        return load(spec).reshape(record.shape)
    x: torch.Tensor | None = None
    owned = False  # x may be the backbone's own tensor (or a part) until the first sum makes a new one
    if base is not None:
        x = base_view(base.to(device), record.shape, cdtype)
    terms = record.terms
    if terms[0].codec == "rescale":  # X <- X / s before the added terms (spec 5.1; validated: it has a base)
        assert x is not None
        x, owned, terms = rescale.apply(x, load(terms[0].parts["scales"]), record.shape), True, terms[1:]
    for term in terms:
        parts = {role: load(spec) for role, spec in term.parts.items()}
        if term.codec == "lowrank" and x is not None and not owned:
            # X + U V in one pass over X (the product's summation order is the implementation's: spec 5.3)
            u, v = parts["u"].to(cdtype), parts["v"].to(cdtype)
            x, owned = torch.addmm(x.reshape(u.shape[0], v.shape[1]), u, v).reshape(record.shape), True
            continue
        t = decode_term(term.codec, parts, term.params, record.shape, cdtype)
        if x is None:
            x = t
        elif owned:
            x.add_(t)  # the same IEEE sums as x + t, without another tensor-sized buffer
        elif term.codec in FRESH_TERMS:
            x, owned = t.add_(x), True  # t + x == x + t exactly (IEEE addition commutes); t is ours to reuse
        else:
            x, owned = x + t, True
        del t, parts
    assert x is not None
    return canonical_nan(x.to(target))


def reconstruct(
    record: Record,
    base: torch.Tensor | None,
    load: PartLoader,
    device: torch.device | str = "cpu",
    others: RecordLoader | None = None,
) -> torch.Tensor:
    y = predict(record, base, load, device, others)
    if record.residual is not None:
        y = residual_codec.apply(y, load(record.residual))
    if y.dtype == torch.bool and bool((y.view(torch.uint8) > 1).any()):  # spec 5.2, whatever the source
        raise CodecError("a BOOL tensor would hold bytes other than 0 and 1")
    return y
