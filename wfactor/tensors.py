"""Torch-side helpers: format dtype names <-> torch dtypes, numpy storage <-> torch, bit views."""

from __future__ import annotations

import numpy as np
import torch

from .format.constants import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
F8_TORCH = (torch.float8_e4m3fn, torch.float8_e5m2)
FORMAT_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def format_dtype(dtype: torch.dtype) -> str:
    try:
        return FORMAT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by the wfactor format") from None


def compute_torch_dtype(dtype: str) -> torch.dtype:
    return torch.float64 if dtype == "F64" else torch.float32


def from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """numpy storage array (BF16 as uint16) -> torch tensor of the format dtype. Shares memory."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype == "BF16":
        t = t.view(torch.int16).view(torch.bfloat16) if t.dtype != torch.int16 else t.view(torch.bfloat16)
    elif dtype in ("F8_E4M3", "F8_E5M2"):
        t = t.view(torch.uint8).view(TORCH_DTYPES[dtype])
    return t


def to_storage(t: torch.Tensor) -> np.ndarray:
    """torch tensor -> numpy storage array of the format's storage dtype (a copy on CPU)."""
    t = t.detach().to("cpu").contiguous()
    dtype = format_dtype(t.dtype)
    if dtype == "BF16":
        return t.view(torch.int16).numpy().view(DTYPES["BF16"][0]).copy()
    if t.dtype in F8_TORCH:
        return t.view(torch.uint8).numpy().copy()
    return t.numpy().copy()


def storage_view(t: torch.Tensor) -> np.ndarray:
    """Like ``to_storage`` but without the copy when ``t`` is already a contiguous CPU tensor: for encoders
    that only read the array (never keep or write it)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return to_storage(t)
    t = t.detach()
    if format_dtype(t.dtype) == "BF16":
        return t.view(torch.int16).numpy().view(DTYPES["BF16"][0])
    if t.dtype in F8_TORCH:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as an integer tensor of equal item size, for XOR and bitwise comparison."""
    return t.contiguous().view(_BITS[t.element_size()])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(bits_view(a), bits_view(b)))
