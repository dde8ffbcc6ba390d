"""Layers that keep a member's weight factored: W = W_base + U @ V + diag(s) Q.

W_base is the family's cached backbone tensor itself (shared by every member that uses it). The member's
own delta is a low-rank pair U [out, r], V [r, in], and/or k-bit codes Q [out, in] (int8) with one scale per
row s [out] (the ``quant`` codec, kept as stored). No float tensor of size [out, in] is kept per member: a
Linear's forward converts Q to the backbone's dtype transiently (one matrix at a time), an Embedding
gathers only the rows it looks up. The arithmetic runs in the backbone tensor's dtype and the result is cast
to the member's (the input's, for a Linear): a bf16 member of an fp32 backbone computes in fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    ) -> None:
        super().__init__()
        rows, cols = base_weight.shape
        if (u is None) != (v is None) or (codes is None) != (scales is None) or (u is None and codes is None):
            raise ValueError(f"{kind}: give U and V, or codes and scales, or both")
        if u is not None and v is not None and (
            u.dim() != 2 or v.dim() != 2 or u.shape[0] != rows or v.shape[1] != cols or u.shape[1] != v.shape[0]
        ):
            raise ValueError(
                f"{kind}: U {list(u.shape)} and V {list(v.shape)} do not factor a {list(base_weight.shape)} delta"
            )
        if codes is not None and scales is not None and (
            tuple(codes.shape) != (rows, cols) or codes.dtype != torch.int8 or tuple(scales.shape) != (rows,)
        ):
            raise ValueError(
                f"{kind}: codes {list(codes.shape)} x {codes.dtype} and scales {list(scales.shape)} do not "
                f"quantise a {list(base_weight.shape)} delta (int8 codes of its shape, one scale per row)"
            )
        self.base_weight = _param(base_weight)
        self.u: nn.Parameter | None = _param(u) if u is not None else None
        self.v: nn.Parameter | None = _param(v) if v is not None else None
        self.codes: torch.Tensor | None
        self.scales: torch.Tensor | None
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1]) if self.u is not None else 0

    def materialize(self) -> torch.Tensor:
        """The dense weight, allocated on demand (for inspection; forward never builds it)."""
        w: torch.Tensor = self.base_weight
        if self.u is not None and self.v is not None:
            w = w + self.u @ self.v
        if self.codes is not None and self.scales is not None:
            w = w + (self.codes.to(w.dtype) * self.scales.to(w.dtype)[:, None])
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
    ) -> None:
        super().__init__("FactoredLinear", base_weight, u, v, codes, scales)
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
        if self.codes is not None and self.scales is not None:
            y = y + F.linear(xc, self.codes.to(cd)) * self.scales.to(cd)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"quant={self.codes is not None}, bias={self.bias is not None}"
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
    ) -> None:
        super().__init__("FactoredEmbedding", base_weight, u, v, codes, scales)
        self.dtype = dtype or base_weight.dtype  # the member's dtype: looked-up rows are returned in it
        self.num_embeddings, self.embedding_dim = base_weight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.base_weight, self.padding_idx)
        if self.u is not None and self.v is not None:
            y = y + F.embedding(ids, self.u, self.padding_idx) @ self.v
        if self.codes is not None and self.scales is not None:
            rows = F.embedding(ids, self.codes).to(y.dtype) * self.scales.to(y.dtype)[ids].unsqueeze(-1)
            y = y + rows
        return y.to(self.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, quant={self.codes is not None}, "
            f"padding_idx={self.padding_idx}"
        )
