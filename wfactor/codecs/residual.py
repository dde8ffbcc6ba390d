"""residual: the member's bytes XOR the lossy prediction's bytes, stored as byte planes + zstd. Any
reproducible prediction plus this residual rebuilds the tensor bit for bit (spec 5.3)."""

from __future__ import annotations

import torch

from ..tensors import bits_view, format_dtype, storage_view
from .base import Encoded

NAME = "residual"


def encode(target: torch.Tensor, prediction: torch.Tensor) -> Encoded:
    x = torch.bitwise_xor(bits_view(target), bits_view(prediction)).view(target.dtype)
    encoding = "zstd_planes" if target.element_size() > 1 else "zstd"
    return Encoded(NAME, {}, {"xor": (storage_view(x), format_dtype(target.dtype), encoding)})  # x is ours


def apply(prediction: torch.Tensor, xor: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_xor(bits_view(prediction), bits_view(xor.to(prediction.device))).view(prediction.dtype)
