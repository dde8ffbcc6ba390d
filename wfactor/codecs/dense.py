"""dense: the whole tensor, stored losslessly (byte planes + zstd). Used with no base: new heads, unrelated
members, tensors whose structure differs too much to predict."""

from __future__ import annotations

from typing import Any

import torch

from ..tensors import format_dtype, storage_view
from .base import Encoded

NAME = "dense"


def encode(target: torch.Tensor) -> Encoded:
    dtype = format_dtype(target.dtype)
    encoding = "zstd_planes" if target.element_size() > 1 else "zstd"
    # read only: encode_part compresses it in chunks, and copies it if it has to store it raw
    return Encoded(NAME, {}, {"values": (storage_view(target), dtype, encoding)})


def decode(
    parts: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...], cdtype: torch.dtype
) -> torch.Tensor:
    values = parts["values"]
    return values.to(cdtype) if values.is_floating_point() else values
