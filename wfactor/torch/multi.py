"""MultiModel: several attached members over one shared backbone, and mixed-member batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from ..family import Family
from .attach import attach


class MultiModel(nn.Module):
    """One attached module per member, all over the family's cached backbone on ``device``.

    ``forward(inputs, members)`` takes a batch (dim 0 = rows) and, per row, the member that runs it: a
    sequence of member names or a LongTensor of indices into ``names``. Rows are grouped per member
    (stable order), each member's module runs once on its rows, and the outputs are put back into the
    original row order. Each member's module must return one tensor whose dim 0 is its rows, or a mapping
    (a transformers ``ModelOutput``) holding one under ``output_key`` (default ``"logits"``).
    """

    def __init__(
        self,
        family: Family,
        names: Sequence[str],
        build: Callable[[str], nn.Module],
        device: str | torch.device = "cpu",
        output_key: str = "logits",
    ) -> None:
        super().__init__()
        self.output_key = output_key
        names = list(names)
        if not names:
            raise InputError("MultiModel: no members given")
        if len(set(names)) != len(names):
            dup = next(n for i, n in enumerate(names) if n in names[:i])
            raise InputError(f"MultiModel: member {dup!r} is given twice")
        self.family = family
        self.names = names
        self.device = torch.device(device)
        self.index = {n: i for i, n in enumerate(names)}
        self.models = nn.ModuleList(attach(build(n), family, n, self.device) for n in names)

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self.index:
            raise InputError(f"MultiModel: {name!r} is not one of its members {self.names}")
        return self.models[self.index[name]]

    def member_indices(self, members: Sequence[str] | torch.Tensor, rows: int) -> torch.Tensor:
        """The per-row member indices (a CPU LongTensor of length ``rows``)."""
        if isinstance(members, torch.Tensor):
            idx = members.detach().to("cpu")
            if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise InputError(f"MultiModel: member indices must be an integer tensor, found {idx.dtype}")
            idx = idx.long().reshape(-1)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self.names)):
                raise InputError(f"MultiModel: member index out of range 0..{len(self.names) - 1}")
        else:
            if isinstance(members, str):
                members = [members] * rows
            bad = next((m for m in members if m not in self.index), None)
            if bad is not None:
                raise InputError(f"MultiModel: {bad!r} is not one of its members {self.names}")
            idx = torch.tensor([self.index[m] for m in members], dtype=torch.long)
        if idx.numel() != rows:
            raise InputError(f"MultiModel: {idx.numel()} member entries for a batch of {rows} rows")
        return idx

    def forward(self, inputs: torch.Tensor, members: Sequence[str] | torch.Tensor) -> torch.Tensor:
        rows = inputs.shape[0]
        idx = self.member_indices(members, rows)
        groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k in torch.unique(idx).tolist():  # sorted member order; rows keep their order within a member
            sel = torch.nonzero(idx == k, as_tuple=False).reshape(-1)
            out = self.models[k](inputs[sel.to(inputs.device)])
            if isinstance(out, Mapping):  # a transformers ModelOutput, or a dict
                out = out.get(self.output_key)
            if not isinstance(out, torch.Tensor) or out.shape[:1] != (sel.numel(),):
                raise InputError(
                    f"MultiModel: member {self.names[k]!r} must return one tensor with one row per input row "
                    f"(or a mapping holding one under {self.output_key!r})"
                )
            groups.append((sel, out))
        if not groups:
            raise InputError("MultiModel: empty batch")
        tail = groups[0][1].shape[1:]
        dtype = groups[0][1].dtype
        for _sel, out in groups[1:]:
            if out.shape[1:] != tail:
                raise InputError(
                    f"MultiModel: members' outputs differ in shape ({list(tail)} vs {list(out.shape[1:])}); "
                    "run them separately"
                )
            dtype = torch.promote_types(dtype, out.dtype)
        result = torch.empty((rows, *tail), dtype=dtype, device=groups[0][1].device)
        for sel, out in groups:
            result[sel.to(result.device)] = out.to(dtype)
        return result
