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


def codes_in_range(codes: torch.Tensor, bits: int) -> bool:
    """Whether every code lies in +-qmax(bits), the range of ``bits``-bit codes (one pass over the codes)."""
    if not codes.numel():
        return True
    lo, hi = torch.aminmax(codes)
    return -qmax(bits) <= int(lo) and int(hi) <= qmax(bits)


def quantize(delta: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = rows_cols(tuple(delta.shape))
    d2 = delta.reshape(m, n).to(torch.float32)
    q = qmax(bits)
    scales = (d2.abs().amax(dim=1) * clip / q).to(torch.float32) if n else torch.zeros(m)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    x = d2 / safe[:, None]  # one float temporary, rounded and clamped in place
    codes = x.round_().clamp_(-q, q).to(torch.int8)
    del x
    codes.masked_fill_(~(scales > 0)[:, None], 0)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    # Two separately rounded IEEE operations (no fused multiply-add) keep this bit-reproducible (spec 5.2).
    out = codes.to(cdtype)
    s = scales.to(cdtype)[:, None]
    return out.mul_(s) if out.data_ptr() != codes.data_ptr() else out * s  # in place on our own copy


SEARCH_ROWS = 256  # the clip is chosen on at most this many evenly spaced rows, then applied to all


def best(delta: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise with the clip factor (of a few) that has the least squared error; ties go to the larger clip.

    Scales are per row, so a clip's error is a sum over rows: on a large tensor it is estimated on
    ``SEARCH_ROWS`` evenly spaced rows (deterministic), and only the chosen clip quantises the whole tensor."""
    m, n = rows_cols(tuple(delta.shape))
    d2 = delta.reshape(m, n).to(torch.float32)
    sample = d2 if m <= SEARCH_ROWS else d2[torch.linspace(0, m - 1, SEARCH_ROWS).round().long()]
    chosen: tuple[float, float] | None = None
    for clip in CLIPS:
        codes, scales = quantize(sample, bits, clip)
        err = float(((dequantize(codes, scales, torch.float32) - sample) ** 2).sum())
        if chosen is None or err < chosen[0]:
            chosen = (err, clip)
    assert chosen is not None
    return quantize(d2, bits, chosen[1])


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
    if not codes_in_range(codes, int(params["bits"])):
        raise CodecError(f"quant codes exceed +-{qmax(int(params['bits']))}, the range of {params['bits']} bits")
    return dequantize(codes, parts["scales"], cdtype).reshape(shape)
