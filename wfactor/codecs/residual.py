"""residual: the member's bytes XOR the lossy prediction's bytes, stored as byte planes + zstd. Any
reproducible prediction plus this residual rebuilds the tensor bit for bit (spec 5.3). Encoded by
:func:`wfactor.exact.residual_term` (numpy); this module is its torch side."""

from __future__ import annotations

import torch

from ..exact import residual_term
from ..tensors import bits_view, format_dtype, storage_view
from .base import Encoded

NAME = "residual"


def encode(target: torch.Tensor, prediction: torch.Tensor) -> Encoded:
    return residual_term(storage_view(target), storage_view(prediction), format_dtype(target.dtype))


def apply(prediction: torch.Tensor, xor: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_xor(bits_view(prediction), bits_view(xor.to(prediction.device))).view(prediction.dtype)
