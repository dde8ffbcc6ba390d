"""sparse: + values at flat (row-major) indices. Good when a fine-tune touched few entries."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import CodecError
from ..tensors import to_storage
from .base import Encoded

NAME = "sparse"


def encode(delta: torch.Tensor, count: int) -> Encoded:
    flat = delta.reshape(-1)
    n = flat.numel()
    if count >= n:
        idx = torch.arange(n)
    else:
        # the count largest |entries|, ties broken by index (lower first) so the choice is deterministic:
        # tau is the count-th largest magnitude; keep every entry above it, then the first ones equal to it
        mags = flat.abs().to(torch.float32).numpy()  # a private copy
        tau = float(np.partition(mags, n - count)[n - count])
        above = torch.nonzero(flat.abs() > tau).reshape(-1)
        ties = torch.nonzero(flat.abs() == tau).reshape(-1)[: count - above.numel()]
        idx = torch.sort(torch.cat([above, ties])).values
    vals = flat[idx].to(torch.float16 if float(flat.abs().max() if flat.numel() else 0) < 60000 else torch.float32)
    fmt = "F16" if vals.dtype == torch.float16 else "F32"
    return Encoded(
        NAME,
        {"count": int(idx.numel())},
        {
            "indices": (idx.to(torch.int64).numpy().astype(np.int64), "I64", "zstd_planes"),
            "values": (to_storage(vals), fmt, "zstd_planes"),
        },
    )


def decode(
    parts: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...], cdtype: torch.dtype
) -> torch.Tensor:
    idx = parts["indices"]
    numel = 1
    for d in shape:
        numel *= d
    if idx.numel():
        if int(idx[0]) < 0 or int(idx[-1]) >= numel or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            raise CodecError(f"sparse indices must be strictly increasing and lie in 0..{numel - 1}")
    out = torch.zeros(numel, dtype=cdtype, device=idx.device)
    out[idx] = parts["values"].to(cdtype)
    return out.reshape(shape)
