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


class FactoredLinear(nn.Module):
    """``y = x @ W_base.T + (x @ V.T) @ U.T (+ bias)``: a Linear whose weight is W_base + U @ V."""

    def __init__(
        self, base_weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        out_f, in_f = base_weight.shape
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != out_f or v.shape[1] != in_f or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"FactoredLinear: U {list(u.shape)} and V {list(v.shape)} do not factor a "
                f"{list(base_weight.shape)} delta"
            )
        self.in_features = in_f
        self.out_features = out_f
        self.base_weight = base_weight if isinstance(base_weight, nn.Parameter) else _frozen(base_weight)
        self.u = u if isinstance(u, nn.Parameter) else _frozen(u)
        self.v = v if isinstance(v, nn.Parameter) else _frozen(v)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else _frozen(bias)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base_weight, self.bias)
        return y + F.linear(F.linear(x, self.v), self.u)

    def materialize(self) -> torch.Tensor:
        """W_base + U @ V, allocated on demand (for inspection; forward never builds it)."""
        return self.base_weight + self.u @ self.v

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, computed on each access (a new tensor, not a parameter)."""
        return self.materialize()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


class FactoredEmbedding(nn.Module):
    """``F.embedding(ids, W_base) + F.embedding(ids, U) @ V``: an Embedding whose table is W_base + U @ V."""

    def __init__(
        self, base_weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        num, dim = base_weight.shape
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != num or v.shape[1] != dim or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"FactoredEmbedding: U {list(u.shape)} and V {list(v.shape)} do not factor a "
                f"{list(base_weight.shape)} delta"
            )
        self.num_embeddings = num
        self.embedding_dim = dim
        self.padding_idx = padding_idx
        self.base_weight = base_weight if isinstance(base_weight, nn.Parameter) else _frozen(base_weight)
        self.u = u if isinstance(u, nn.Parameter) else _frozen(u)
        self.v = v if isinstance(v, nn.Parameter) else _frozen(v)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.base_weight, self.padding_idx)
        return y + F.embedding(ids, self.u, self.padding_idx) @ self.v

    def materialize(self) -> torch.Tensor:
        return self.base_weight + self.u @ self.v

    @property
    def weight(self) -> torch.Tensor:
        """The dense table, computed on each access (a new tensor, not a parameter)."""
        return self.materialize()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}"
