"""quant: + a k-bit (2..8) symmetric quantisation of the delta with one float32 scale per row; the codes are
stored as int8 and entropy-coded with zstd, so a 3-bit delta costs about its entropy, not 8 bits."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CodecError
from ..format.records import rows_cols
from ..tensors import to_storage
from .base import Encoded

NAME = "quant"
CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize(delta: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = rows_cols(tuple(delta.shape))
    d2 = delta.reshape(m, n).to(torch.float32)
    q = qmax(bits)
    scales = (d2.abs().amax(dim=1) * clip / q).to(torch.float32) if n else torch.zeros(m)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.clamp(torch.round(d2 / safe[:, None]), -q, q).to(torch.int8)
    codes = torch.where(scales[:, None] > 0, codes, torch.zeros_like(codes))
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    # Two separately rounded IEEE operations (no fused multiply-add) keep this bit-reproducible (spec 5.2).
    return codes.to(cdtype) * scales.to(cdtype)[:, None]


def best(delta: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip factor (of a few) with the least squared error; ties go to the larger clip."""
    m, n = rows_cols(tuple(delta.shape))
    d2 = delta.reshape(m, n).to(torch.float32)
    chosen = None
    for clip in CLIPS:
        codes, scales = quantize(d2, bits, clip)
        err = float(((dequantize(codes, scales, torch.float32) - d2) ** 2).sum())
        if chosen is None or err < chosen[0]:
            chosen = (err, codes, scales)
    assert chosen is not None
    return chosen[1], chosen[2]


def encode(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> Encoded:
    return Encoded(
        NAME,
        {"bits": bits},
        {"codes": (to_storage(codes), "I8", "zstd"), "scales": (to_storage(scales), "F32", "zstd_planes")},
    )


def decode(
    parts: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...], cdtype: torch.dtype
) -> torch.Tensor:
    codes = parts["codes"]
    q = qmax(int(params["bits"]))
    if codes.numel() and int(codes.abs().max()) > q:
        raise CodecError(f"quant codes exceed +-{q}, the range of {params['bits']} bits")
    return dequantize(codes, parts["scales"], cdtype).reshape(shape)
