"""dense: the whole tensor, stored losslessly (byte planes + zstd). Used with no base: new heads, unrelated
members, tensors whose structure differs too much to predict."""

from __future__ import annotations

from typing import Any

import torch

from ..exact import dense_term
from ..tensors import format_dtype, storage_view
from .base import Encoded

NAME = "dense"


def encode(target: torch.Tensor) -> Encoded:
    """:func:`wfactor.exact.dense_term` of a torch tensor."""
    return dense_term(storage_view(target), format_dtype(target.dtype))


def decode(
    parts: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...], cdtype: torch.dtype
) -> torch.Tensor:
    values = parts["values"]
    return values.to(cdtype) if values.is_floating_point() else values
