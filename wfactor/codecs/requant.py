"""requant (format version 5): a member's packed integer codes predicted from its float base.

An int4/int8 checkpoint (compressed-tensors ``pack-quantized``/``int-quantized``, GPTQ) holds, per Linear,
unsigned codes u = clamp(round(W / s) + z, 0, 2^b - 1) with grouped scales s and a zero point z, packed into
int32 words. The term quantises the float base B with the member's **own** scales (another record of the
delta, named by the ``scales`` parameter), adds a code ``correction`` (zero for a plain quantised copy of the
base; the few codes a fine-tune or GPTQ's error compensation moved), and packs the codes in the member's
layout, so that the record rebuilds the member's words bit for bit (spec/FORMAT.md 4.2 and 5.4):

- ``rows``: each output row's codes form a little-endian bit stream (code j is bits j*b .. j*b+b-1, bit t
  of the stream is bit t mod 32 of word t // 32), zero-padded to whole words: [m, ceil(n*b/32)] int32, as
  compressed-tensors' ``weight_packed``;
- ``columns``: the same stream per output column, the words down the rows: [ceil(n*b/32), m] int32, GPTQ's
  ``qweight``;
- ``codes``: no packing, u - 2^(b-1) as int8 [m, n] (compressed-tensors ``int-quantized``).

All arithmetic is float32 division (correctly rounded) and rounding half to even, so the prediction is the
same on every device.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CodecError

NAME = "requant"
LAYOUTS = ("rows", "columns", "codes")
CHUNK = 1 << 22  # elements per slice of rows: bounds the int64/float temporaries of (un)packing


def words(n: int, bits: int) -> int:
    """int32 words that hold ``n`` codes of ``bits`` bits as one bit stream."""
    return -(-n * bits // 32)


def _row_slices(m: int, n: int) -> list[slice]:
    step = max(1, CHUNK // max(1, n))
    return [slice(i, min(m, i + step)) for i in range(0, m, step)]


def _to_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 of the same 32 bits."""
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


def pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [m, n] (0 <= u < 2^bits) -> [m, words(n, bits)] int32, each row one little-endian bit stream."""
    m, n = u.shape
    w = words(n, bits)
    out = torch.empty((m, w), dtype=torch.int32, device=u.device)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=u.device) * bits
        for sl in _row_slices(m, n):
            block = torch.zeros((sl.stop - sl.start, w * per), dtype=torch.int64, device=u.device)
            block[:, :n] = u[sl]
            out[sl] = _to_i32((block.view(-1, w, per) << shifts).sum(dim=2))
        return out
    planes = torch.arange(bits, dtype=torch.int64, device=u.device)
    shifts = torch.arange(32, dtype=torch.int64, device=u.device)
    for sl in _row_slices(m, n * bits):
        r = sl.stop - sl.start
        stream = torch.zeros((r, w * 32), dtype=torch.int64, device=u.device)
        stream[:, : n * bits] = ((u[sl].to(torch.int64)[:, :, None] >> planes) & 1).reshape(r, n * bits)
        out[sl] = _to_i32((stream.view(r, w, 32) << shifts).sum(dim=2))
    return out


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[m, words] int32 -> codes [m, n] (int16), the inverse of :func:`pack_rows` (padding bits ignored)."""
    m, w = packed.shape
    if w != words(n, bits):
        raise CodecError(f"{w} words cannot hold {n} codes of {bits} bits (expected {words(n, bits)})")
    out = torch.empty((m, n), dtype=torch.int16, device=packed.device)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
        for sl in _row_slices(m, w * per):
            x = packed[sl].to(torch.int64) & 0xFFFFFFFF
            out[sl] = ((x[:, :, None] >> shifts) & mask).reshape(x.shape[0], w * per)[:, :n].to(torch.int16)
        return out
    planes = torch.arange(bits, dtype=torch.int64, device=packed.device)
    shifts = torch.arange(32, dtype=torch.int64, device=packed.device)
    for sl in _row_slices(m, w * 32):
        x = packed[sl].to(torch.int64) & 0xFFFFFFFF
        r = x.shape[0]
        stream = ((x[:, :, None] >> shifts) & 1).reshape(r, w * 32)[:, : n * bits].reshape(r, n, bits)
        out[sl] = (stream << planes).sum(dim=2).to(torch.int16)
    return out


def pack(u: torch.Tensor, bits: int, layout: str) -> torch.Tensor:
    """Codes [m, n] in the member's layout (see the module docstring)."""
    if layout == "rows":
        return pack_rows(u, bits)
    if layout == "columns":
        return pack_rows(u, bits).t().contiguous()
    return (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def unpack(t: torch.Tensor, bits: int, n: int, layout: str) -> torch.Tensor:
    """The member tensor ``t`` -> its codes [m, n] (int16, 0 <= u < 2^bits)."""
    if layout == "rows":
        return unpack_rows(t, bits, n)
    if layout == "columns":
        return unpack_rows(t.t().contiguous(), bits, n)
    return t.to(torch.int16) + (1 << (bits - 1))


def group_index(
    n: int, group_size: int, groups: torch.Tensor | None, ngroups: int, device: torch.device
) -> torch.Tensor:
    """Each input column's group: ``groups`` (GPTQ's g_idx) when given, else j // group_size."""
    if groups is None:
        return torch.arange(n, device=device) // group_size
    g = groups.reshape(-1).to(device=device, dtype=torch.int64)
    if g.numel() != n:
        raise CodecError(f"requant groups list {g.numel()} inputs, the base has {n}")
    if n and (int(g.min()) < 0 or int(g.max()) >= ngroups):
        raise CodecError(f"requant groups must lie in [0, {ngroups}), found {int(g.min())}..{int(g.max())}")
    return g


def scale_matrix(scales: torch.Tensor, m: int, layout: str) -> torch.Tensor:
    """The scales record's values as [m, G] float32 (GPTQ's ``scales`` are [G, m]: ``columns``)."""
    s = scales.to(torch.float32).reshape(-1)
    if s.numel() == 1:
        return s.reshape(1, 1).expand(m, 1)
    if s.numel() % max(1, m):
        raise CodecError(f"requant scales hold {s.numel()} values, not a multiple of the base's {m} rows")
    g = s.numel() // max(1, m)
    return s.reshape(g, m).t() if layout == "columns" else s.reshape(m, g)


def quantize(
    base: torch.Tensor, scales: torch.Tensor, gidx: torch.Tensor, bits: int, zero: int
) -> torch.Tensor:
    """u = clamp(round_half_even(B / s[i, g(j)]) + zero, 0, 2^bits - 1) in float32, NaN -> zero (int16)."""
    m, n = base.shape
    out = torch.empty((m, n), dtype=torch.int16, device=base.device)
    hi = float((1 << bits) - 1)
    for sl in _row_slices(m, n):
        x = base[sl].to(torch.float32)
        s = scales[sl].index_select(1, gidx) if scales.shape[1] > 1 else scales[sl].expand(-1, n)
        q = torch.div(x, s).round_().add_(float(zero))
        q = torch.nan_to_num_(q, nan=float(zero), posinf=hi, neginf=0.0).clamp_(0.0, hi)
        out[sl] = q.to(torch.int16)
    return out


def dequantize(u: torch.Tensor, scales: torch.Tensor, gidx: torch.Tensor, zero: int) -> torch.Tensor:
    """(u - zero) * s in float32: the member's float weight as its checkpoint means it."""
    m, n = u.shape
    s = scales.index_select(1, gidx) if scales.shape[1] > 1 else scales.expand(-1, n)
    return (u.to(torch.float32) - float(zero)) * s


def grouping(
    params: dict[str, Any],
    m: int,
    n: int,
    scales: torch.Tensor,
    groups: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales as [m, G] float32, each input's group) of a requant term over an [m, n] base (spec 5.4 steps
    1 and 2), checked: G is 1 or ceil(n / group_size) unless ``groups`` says each input's group."""
    s = scale_matrix(scales.to(device), m, str(params["layout"]))
    size = int(params["group_size"])
    if groups is None and s.shape[1] not in (1, -(-n // size)):
        raise CodecError(
            f"requant scales have {s.shape[1]} groups per row; group_size {size} over {n} inputs needs "
            f"{-(-n // size)}"
        )
    return s, group_index(n, size, groups, s.shape[1], device)


def dequantize_packed(
    t: torch.Tensor, params: dict[str, Any], scales: torch.Tensor, groups: torch.Tensor | None
) -> torch.Tensor:
    """A packed member tensor ``t`` (a requant record's layout, ``params``) as float32 weights (u - z) * s."""
    bits, n, layout = int(params["bits"]), int(params["inputs"]), str(params["layout"])
    m = t.shape[1] if layout == "columns" else t.shape[0]
    s, gidx = grouping(params, m, n, scales, groups, t.device)
    return dequantize(unpack(t, bits, n, layout), s, gidx, int(params["zero"]))


def decode(
    base: torch.Tensor,
    params: dict[str, Any],
    correction: torch.Tensor,
    scales: torch.Tensor,
    groups: torch.Tensor | None,
) -> torch.Tensor:
    """The record's tensor: pack(quantize(B) + correction) (spec 5.4)."""
    bits, zero, layout = int(params["bits"]), int(params["zero"]), str(params["layout"])
    m, n = base.shape
    s, gidx = grouping(params, m, n, scales, groups, base.device)
    u = quantize(base, s, gidx, bits, zero)
    u.add_(correction.to(device=u.device, dtype=torch.int16).reshape(m, n))
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > (1 << bits) - 1):
        raise CodecError(f"requant codes after the correction leave [0, {(1 << bits) - 1}]")
    return pack(u, bits, layout)
