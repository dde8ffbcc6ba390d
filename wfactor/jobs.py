"""One member tensor planned and encoded: the unit of work of every executor (threads in
:mod:`wfactor.factoring`, Ray tasks in :mod:`wfactor.distributed`), so that every executor writes the same
bytes. A tensor kept bit for bit as it is stored (a lossless budget) is planned torch-free
(:mod:`wfactor.exact`); everything else with torch (:func:`wfactor.plan.plan_with_torch`), imported then."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .budget import Budget
from .exact import Planned, plain, plan_stored, rekey

if TYPE_CHECKING:
    from .sources import Source


def torch_free(member: Source, base: Source, key: str, bname: str | None, budget: Budget, option: str | None) -> bool:
    """Whether this tensor is planned without torch: a lossless budget (no family allocation), and a tensor
    stored as it is (not a quantised weight, not against a quantised backbone)."""
    return budget.lossless and option is None and plain(member, base, key, bname)


def plan_member_tensor(
    member: Source,
    base: Source,
    key: str,
    bname: str | None,
    budget: Budget,
    option: str | None,
    fast_load: bool,
    pos: int,
    device: str = "cpu",
) -> Planned:
    """One member tensor planned and encoded against its aligned backbone tensor ``bname`` (None: dense), its
    parts keyed by its record position ``pos``. ``fast_load`` changes quant codes only, which exact records
    do not have; lossless records are the same bytes on every ``device`` (planned here, on the CPU)."""
    if torch_free(member, base, key, bname, budget, option):
        return rekey(plan_stored(member, base, key, bname), str(pos))
    from .plan import plan_with_torch

    return plan_with_torch(member, base, key, bname, budget, option, fast_load, pos, device)
