"""Layers that keep a member's weight factored: W = W_base + U @ V + diag(s) Q.

W_base is the family's cached backbone tensor itself (shared by every member that uses it). The member's
own delta is a low-rank pair U [out, r], V [r, in], and/or k-bit codes Q [out, in] with one scale per row
s [out] (the ``quant`` codec). Codes of b < 8 bits are kept **packed in b bit planes** (b/8 byte per weight,
about what their zstd-coded part costs on disk), int8 otherwise. No float tensor of size [out, in] is kept
per member: a Linear's forward unpacks Q and converts it to the backbone's dtype transiently (one matrix at
a time), an Embedding unpacks only the rows it looks up. The arithmetic runs in the backbone tensor's dtype
and the result is cast to the member's (the input's, for a Linear): a bf16 member of an fp32 backbone
computes in fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..codecs.quant import codes_in_range
from ..format import bitplanes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """k-bit codes (int8 in [-(2^(b-1) - 1), 2^(b-1) - 1], shape [rows, cols]) as b bit planes, uint8
    [b, rows, ceil(cols / 8)], the layout of the format's ``bitplanes`` encoding (``wfactor.format.bitplanes``):
    plane k holds bit k of (code + 2^(b-1) - 1), eight codes per byte, lowest bit first. Rows stay rows, so
    a gather of rows works on the packed form. On CPU numpy does the work; elsewhere torch ops on the device
    (same bytes)."""
    q = (1 << (bits - 1)) - 1
    if not codes_in_range(codes, bits):
        raise ValueError(f"codes exceed +-{q}, the range of {bits} bits")
    if codes.device.type == "cpu":
        return torch.from_numpy(bitplanes.pack(codes.numpy(), bits))
    return _pack_torch(codes, bits, q)


def _pack_torch(codes: torch.Tensor, bits: int, q: int) -> torch.Tensor:
    n = codes.shape[-1]
    t = (codes.to(torch.int16) + q).to(torch.uint8)
    if n % 8:
        t = F.pad(t, (0, (-n) % 8))
    t = t.reshape(*t.shape[:-1], t.shape[-1] // 8, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=codes.device)
    return torch.stack([(((t >> k) & 1) * weights).sum(-1, dtype=torch.uint8) for k in range(bits)])


def unpack_codes(planes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The int8 codes [..., n] that :func:`pack_codes` packed into ``planes`` [b, ..., ceil(n / 8)]."""
    if planes.device.type == "cpu":
        return torch.from_numpy(bitplanes.unpack(planes.numpy(), n))
    return _unpack_torch(planes, bits, n, (1 << (bits - 1)) - 1)


def _unpack_torch(planes: torch.Tensor, bits: int, n: int, q: int) -> torch.Tensor:
    if planes.numel() == 0:
        return torch.zeros((*planes.shape[1:-1], n), dtype=torch.int8, device=planes.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    u = torch.zeros((*planes.shape[1:], 8), dtype=torch.uint8, device=planes.device)
    for k in range(bits):
        u |= ((planes[k].unsqueeze(-1) >> shifts) & 1) << k
    u = u.reshape(*u.shape[:-2], -1)[..., :n]
    return (u.to(torch.int16) - q).to(torch.int8)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A parameter over the same storage as ``t`` (no copy), excluded from autograd."""
    return nn.Parameter(t, requires_grad=False)


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else _frozen(t)


class _Factored(nn.Module):
    """What both factored layers share: W = W_base + U @ V, with W_base the backbone's own tensor."""

    def __init__(
        self,
        kind: str,
        base_weight: torch.Tensor,
        u: torch.Tensor | None,
        v: torch.Tensor | None,
        codes: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        bits: int | None = None,
        planes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        rows, cols = base_weight.shape
        if planes is not None:  # codes already packed (a `bitplanes` part as stored): kept as they are
            if codes is not None:
                raise ValueError(f"{kind}: give codes or planes, not both")
            b = int(planes.shape[0]) if planes.dim() == 3 else 0
            if planes.dtype != torch.uint8 or tuple(planes.shape[1:]) != (rows, (cols + 7) // 8) or not 2 <= b <= 8:
                raise ValueError(
                    f"{kind}: planes {list(planes.shape)} x {planes.dtype} do not pack a {list(base_weight.shape)} "
                    f"delta (uint8 [b, {rows}, {(cols + 7) // 8}], b in 2..8)"
                )
        quantised = codes is not None or planes is not None
        if (u is None) != (v is None) or quantised != (scales is not None) or (u is None and not quantised):
            raise ValueError(f"{kind}: give U and V, or codes and scales, or both")
        if (
            u is not None
            and v is not None
            and (u.dim() != 2 or v.dim() != 2 or u.shape[0] != rows or v.shape[1] != cols or u.shape[1] != v.shape[0])
        ):
            raise ValueError(
                f"{kind}: U {list(u.shape)} and V {list(v.shape)} do not factor a {list(base_weight.shape)} delta"
            )
        if (
            codes is not None
            and scales is not None
            and (tuple(codes.shape) != (rows, cols) or codes.dtype != torch.int8 or tuple(scales.shape) != (rows,))
        ):
            raise ValueError(
                f"{kind}: codes {list(codes.shape)} x {codes.dtype} and scales {list(scales.shape)} do not "
                f"quantise a {list(base_weight.shape)} delta (int8 codes of its shape, one scale per row)"
            )
        if bits is not None and not 2 <= bits <= 8:
            raise ValueError(f"{kind}: bits must be 2..8, found {bits}")
        self.base_weight = _param(base_weight)
        self.u: nn.Parameter | None = _param(u) if u is not None else None
        self.v: nn.Parameter | None = _param(v) if v is not None else None
        self.bits = bits if codes is not None and bits is not None and bits < 8 else None
        self.code_planes: torch.Tensor | None
        self.codes_int8: torch.Tensor | None
        self.scales: torch.Tensor | None
        packed = pack_codes(codes, self.bits) if codes is not None and self.bits is not None else None
        if planes is not None:
            packed, self.bits = planes, int(planes.shape[0])
        self.register_buffer("code_planes", packed, persistent=False)
        self.register_buffer("codes_int8", codes if packed is None else None, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @property
    def codes(self) -> torch.Tensor | None:
        """The int8 codes Q [out, in] (unpacked on each access when kept packed), or None."""
        if self.code_planes is not None and self.bits is not None:
            return unpack_codes(self.code_planes, self.bits, int(self.base_weight.shape[1]))
        return self.codes_int8

    def _code_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of Q (any shape of ids; the result has a last dimension of ``in``)."""
        if self.code_planes is not None and self.bits is not None:
            return unpack_codes(self.code_planes[:, ids], self.bits, int(self.base_weight.shape[1]))
        assert self.codes_int8 is not None
        return F.embedding(ids, self.codes_int8)

    @property
    def quantised(self) -> bool:
        return self.scales is not None

    @property
    def rank(self) -> int:
        return int(self.u.shape[1]) if self.u is not None else 0

    def materialize(self) -> torch.Tensor:
        """The dense weight, allocated on demand (for inspection; forward never builds it)."""
        w: torch.Tensor = self.base_weight
        if self.u is not None and self.v is not None:
            w = w + self.u @ self.v
        codes = self.codes
        if codes is not None and self.scales is not None:
            w = w + (codes.to(w.dtype) * self.scales.to(w.dtype)[:, None])
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, computed on each access (a new tensor, not a parameter)."""
        return self.materialize()


class FactoredLinear(_Factored):
    """``y = x @ W_base.T + (x @ V.T) @ U.T + (x @ Q.T) * s (+ bias)``: a Linear whose weight is
    W_base + U @ V + diag(s) Q."""

    def __init__(
        self,
        base_weight: torch.Tensor,
        u: torch.Tensor | None,
        v: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        bits: int | None = None,
        planes: torch.Tensor | None = None,
    ) -> None:
        super().__init__("FactoredLinear", base_weight, u, v, codes, scales, bits, planes)
        self.out_features, self.in_features = base_weight.shape
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.base_weight.dtype  # computed in the backbone's dtype (a bf16 member of an fp32 base: fp32)
        xc = x.to(cd)
        y = F.linear(xc, self.base_weight, self.bias.to(cd) if self.bias is not None else None)
        if self.u is not None and self.v is not None:
            y = y + F.linear(F.linear(xc, self.v), self.u)
        codes = self.codes
        if codes is not None and self.scales is not None:
            y = y + F.linear(xc, codes.to(cd)) * self.scales.to(cd)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"quant={self.quantised}, bits={self.bits}, bias={self.bias is not None}"
        )


class FactoredEmbedding(_Factored):
    """``F.embedding(ids, W_base) + F.embedding(ids, U) @ V + Q[ids] * s[ids]``: an Embedding whose table is
    W_base + U @ V + diag(s) Q."""

    def __init__(
        self,
        base_weight: torch.Tensor,
        u: torch.Tensor | None,
        v: torch.Tensor | None,
        padding_idx: int | None = None,
        codes: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        bits: int | None = None,
        planes: torch.Tensor | None = None,
    ) -> None:
        super().__init__("FactoredEmbedding", base_weight, u, v, codes, scales, bits, planes)
        self.dtype = dtype or base_weight.dtype  # the member's dtype: looked-up rows are returned in it
        self.num_embeddings, self.embedding_dim = base_weight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.base_weight, self.padding_idx)
        if self.u is not None and self.v is not None:
            y = y + F.embedding(ids, self.u, self.padding_idx) @ self.v
        if self.scales is not None:
            rows = self._code_rows(ids).to(y.dtype) * self.scales.to(y.dtype)[ids].unsqueeze(-1)
            y = y + rows
        return y.to(self.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, quant={self.quantised}, bits={self.bits}, "
            f"padding_idx={self.padding_idx}"
        )
