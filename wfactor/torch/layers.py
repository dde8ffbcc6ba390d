"""Layers that keep a member's weight factored as backbone + low-rank delta: W = W_base + U @ V.

W_base is the family's cached backbone tensor itself (shared by every member that uses it); U [out, r]
and V [r, in] are the member's own. Nothing of size [out, in] is allocated per member.
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

    def __init__(self, kind: str, base_weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        rows, cols = base_weight.shape
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != rows or v.shape[1] != cols or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"{kind}: U {list(u.shape)} and V {list(v.shape)} do not factor a {list(base_weight.shape)} delta"
            )
        self.base_weight = _param(base_weight)
        self.u = _param(u)
        self.v = _param(v)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def materialize(self) -> torch.Tensor:
        """W_base + U @ V, allocated on demand (for inspection; forward never builds it)."""
        return self.base_weight + self.u @ self.v

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, computed on each access (a new tensor, not a parameter)."""
        return self.materialize()


class FactoredLinear(_Factored):
    """``y = x @ W_base.T + (x @ V.T) @ U.T (+ bias)``: a Linear whose weight is W_base + U @ V."""

    def __init__(
        self, base_weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__("FactoredLinear", base_weight, u, v)
        self.out_features, self.in_features = base_weight.shape
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base_weight, self.bias)
        return y + F.linear(F.linear(x, self.v), self.u)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


class FactoredEmbedding(_Factored):
    """``F.embedding(ids, W_base) + F.embedding(ids, U) @ V``: an Embedding whose table is W_base + U @ V."""

    def __init__(
        self, base_weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, padding_idx: int | None = None
    ) -> None:
        super().__init__("FactoredEmbedding", base_weight, u, v)
        self.num_embeddings, self.embedding_dim = base_weight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.base_weight, self.padding_idx)
        return y + F.embedding(ids, self.u, self.padding_idx) @ self.v

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}"
