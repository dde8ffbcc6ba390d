"""Codec name -> module. The reader applies terms in record order (spec 5.1)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from ..errors import CodecError
from . import dense, lowrank, quant, sparse

CODECS: dict[str, ModuleType] = {m.NAME: m for m in (dense, lowrank, sparse, quant)}


def decode_term(
    codec: str, parts: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...], cdtype: torch.dtype
) -> torch.Tensor:
    try:
        mod = CODECS[codec]
    except KeyError:
        raise CodecError(f"unknown codec {codec!r}") from None
    out: torch.Tensor = mod.decode(parts, params, shape, cdtype)
    return out
