"""rescale (format version 4): X <- X / s, one float32 scale per row of the matrix view, before the other
terms. A member stored as round(W / s) (the fp8 weights of a compressed-tensors checkpoint, one scale per
output channel) is then predicted by round(B / s) from its float base: a quantised copy of the base needs
no residual at all, and a quantised fine-tune a sparse one. IEEE division is correctly rounded, so the
prediction is the same on every device (spec 5.1)."""

from __future__ import annotations

import torch

from ..format.records import rows_cols

NAME = "rescale"


def apply(x: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` divided row by row by ``scales`` (a new tensor), in ``x``'s dtype."""
    m, n = rows_cols(shape)
    return (x.reshape(m, n) / scales.to(x.dtype).reshape(m, 1)).reshape(shape)
