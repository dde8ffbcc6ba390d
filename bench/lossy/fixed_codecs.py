"""The fixed-codec baselines: each applied to every member tensor that differs from the base, encoded with
wfactor's own codec modules and ``wfactor.plan.assemble`` and rebuilt with ``wfactor.plan.rebuild_planned``
(the reader's code path), so bytes are counted as the planner's are: the stored, compressed part bytes.
BitDelta-style and DARE-style are rebuilt here (sign bits + one scale; a seeded random share kept and
rescaled, stored with the sparse codec)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import FAMILY, MODEL_FILE
from safetensors.torch import load_file

from wfactor.codecs import dense, lowrank, quant, residual, sparse
from wfactor.format.records import rows_cols
from wfactor.plan import Planned, assemble, rebuild_planned
from wfactor.reconstruct import base_view
from wfactor.tensors import bitwise_equal, compute_torch_dtype, format_dtype

DARE_SEED = 1234


@dataclass
class Item:
    """One member tensor, classified once; ``delta`` is W - cast(base view) in the compute dtype."""

    name: str
    target: torch.Tensor
    base: torch.Tensor | None
    kind: str  # identical | dense (absent in base) | grown (shape differs) | delta | exact (not floating)
    fixed: tuple[int, torch.Tensor] | None = None  # (bytes, rebuilt) where the setting does not matter
    dense_fixed: tuple[int, torch.Tensor] | None = None  # grown tensors stored dense (the brief's rule)
    delta: torch.Tensor | None = None
    bview: torch.Tensor | None = None
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _build(p: Planned, base: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    return p.nbytes, rebuild_planned(p, base)


def exact_store(name: str, t: torch.Tensor, base: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """Lossless: the cheaper of dense and base + XOR residual (the planner's exact path)."""
    cands = [assemble(name, t, None, [dense.encode(t)], None)]
    if base is not None and base.shape == t.shape and base.is_floating_point() == t.is_floating_point():
        pred0 = rebuild_planned(assemble(name, t, name, [], None), base)
        cands.append(assemble(name, t, name, [], residual.encode(t, pred0)))
    best = min(cands, key=lambda p: p.nbytes)
    y = rebuild_planned(best, base if best.record.base else None)
    assert bitwise_equal(y, t), name
    return best.nbytes, y


def prepare(member: str, base_sd: dict[str, torch.Tensor], family: Path = FAMILY) -> list[Item]:
    sd = load_file(str(family / member / MODEL_FILE))
    items = []
    for name, t in sd.items():
        b = base_sd.get(name)
        if b is None or b.dim() != t.dim() or not t.is_floating_point() or not b.is_floating_point():
            kind = "dense" if (b is None or b.dim() != t.dim()) else "exact"
            it = Item(name, t, b, kind)
            if kind == "dense":
                it.fixed = _build(assemble(name, t, None, [dense.encode(t)], None), None)
            else:
                it.fixed = exact_store(name, t, b)
            items.append(it)
            continue
        if tuple(b.shape) == tuple(t.shape):
            p0 = assemble(name, t, name, [], None)
            y0 = rebuild_planned(p0, b)
            if bitwise_equal(y0, t):
                items.append(Item(name, t, b, "identical", fixed=(0, y0)))
                continue
            kind = "delta"
        else:
            kind = "grown"
        cdtype = compute_torch_dtype(format_dtype(t.dtype))
        bview = base_view(b, tuple(t.shape), cdtype)
        it = Item(name, t, b, kind, delta=t.to(cdtype) - bview, bview=bview)
        if kind == "grown":
            it.dense_fixed = _build(assemble(name, t, None, [dense.encode(t)], None), None)
        if t.dim() >= 2:
            m, n = rows_cols(tuple(t.shape))
            it.svd = lowrank.spectrum(it.delta, min(m, n))
        items.append(it)
    return items


Encoder = Callable[[str, Item], tuple[int, torch.Tensor]]


def _planned(member: str, it: Item, enc: Any) -> tuple[int, torch.Tensor]:
    terms = [] if enc is None else [enc]
    return _build(assemble(it.name, it.target, it.name, terms, None), it.base)


def enc_quant(bits: int) -> Encoder:
    def f(member: str, it: Item) -> tuple[int, torch.Tensor]:
        assert it.delta is not None
        codes, scales = quant.best(it.delta, bits)
        return _planned(member, it, quant.encode(codes, scales, bits))

    return f


def enc_lowrank(rank: int) -> Encoder:
    q8 = enc_quant(8)

    def f(member: str, it: Item) -> tuple[int, torch.Tensor]:
        if it.svd is None:  # 1-D tensors: low rank does not apply; 8-bit quant instead
            return q8(member, it)
        m, n = rows_cols(tuple(it.target.shape))
        u, s, vh = it.svd
        return _planned(member, it, lowrank.encode(u, s, vh, min(rank, m, n)))

    return f


def enc_sparse(density: float) -> Encoder:
    def f(member: str, it: Item) -> tuple[int, torch.Tensor]:
        assert it.delta is not None
        count = max(1, round(density * it.delta.numel()))
        return _planned(member, it, sparse.encode(it.delta, count))

    return f


def enc_dare(keep: float) -> Encoder:
    """DARE-style: keep a random share of the entries (seeded per member and tensor), rescale by 1/keep."""

    def f(member: str, it: Item) -> tuple[int, torch.Tensor]:
        assert it.delta is not None
        g = torch.Generator().manual_seed(DARE_SEED + zlib.crc32(f"{member}/{it.name}".encode()))
        mask = torch.rand(it.delta.shape, generator=g) < keep
        dropped = torch.where(mask, it.delta / keep, torch.zeros_like(it.delta))
        count = int(mask.sum())
        return _planned(member, it, sparse.encode(dropped, count) if count else None)

    return f


def enc_bitdelta(member: str, it: Item) -> tuple[int, torch.Tensor]:
    """BitDelta-style without distillation: sign bits (packed) + one float32 scale, mean |delta|, per tensor."""
    assert it.delta is not None and it.bview is not None
    scale = it.delta.abs().mean()
    sign = torch.where(it.delta >= 0, 1.0, -1.0).to(it.delta.dtype)
    y = (it.bview + scale * sign).to(it.target.dtype)
    return math.ceil(it.delta.numel() / 8) + 4, y


def encode_member(member: str, items: list[Item], enc: Encoder, grown: str) -> tuple[int, dict[str, torch.Tensor]]:
    total, sd = 0, {}
    for it in items:
        if it.fixed is not None:
            nb, y = it.fixed
        elif it.kind == "grown" and grown == "dense":
            assert it.dense_fixed is not None
            nb, y = it.dense_fixed
        else:
            nb, y = enc(member, it)
        total += nb
        sd[it.name] = y
    return total, sd


def enc_none(member: str, it: Item) -> tuple[int, torch.Tensor]:
    """No delta at all: the base (its view, for grown tensors) stands in for the member."""
    return _planned(member, it, None)
