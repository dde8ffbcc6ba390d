"""lowrank: + U @ V, from a (randomised, for large matrices) SVD of the delta. Conv kernels are flattened
to (out, in*k*k). Exact for merged LoRAs, whose deltas have the LoRA's rank."""

from __future__ import annotations

from typing import Any

import torch

from ..format.records import rows_cols
from ..linalg import randomized_svd
from ..tensors import to_storage
from .base import Encoded

NAME = "lowrank"
FULL_SVD_MAX = 2048  # above this smaller dimension, a randomised SVD (wfactor.linalg)


def spectrum(delta: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the delta's matrix view, truncated to at most max_rank, in float32."""
    m, n = rows_cols(tuple(delta.shape))
    d2 = delta.reshape(m, n).to(torch.float32)
    if min(m, n) <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(d2, full_matrices=False)
        return u[:, :max_rank], s[:max_rank], vh[:max_rank]
    return randomized_svd(d2, max_rank, seed=0)  # seeded: same inputs, same factors


def factor_dtype(u: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    peak = max(float(u.abs().max()) if u.numel() else 0.0, float(v.abs().max()) if v.numel() else 0.0)
    return torch.float16 if peak < 60000.0 else torch.float32


def encode(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Encoded:
    root = s[:rank].sqrt()
    uu = u[:, :rank] * root[None, :]
    vv = root[:, None] * vh[:rank]
    dt = factor_dtype(uu, vv)
    fmt = "F16" if dt == torch.float16 else "F32"
    return Encoded(
        NAME,
        {"rank": rank},
        {"u": (to_storage(uu.to(dt)), fmt, "zstd_planes"), "v": (to_storage(vv.to(dt)), fmt, "zstd_planes")},
    )


def decode(
    parts: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...], cdtype: torch.dtype
) -> torch.Tensor:
    return (parts["u"].to(cdtype) @ parts["v"].to(cdtype)).reshape(shape)
