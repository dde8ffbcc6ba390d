"""Factoring on a Ray cluster (``factor --executor ray``; the ``ray`` extra): the per-tensor planning of every
member runs as Ray tasks, and the driver writes the family from their results, in order, exactly as a local
run does (the same function plans each tensor: :func:`wfactor.jobs.plan_member_tensor`).

Deployment: every node sees the members, the base and the family's output directory at the same paths
(shared storage: NFS, a parallel file system, or a single machine); wfactor is installed on every node.
Start a head node (``ray start --head``) and workers (``ray start --address HEAD:6379``), then run
``wfactor factor ... --executor ray --ray-address HEAD:6379`` on any node. What crosses the network: each
task's arguments (a few strings: how to open the member and the backbone, the tensor's name, the budget)
and its result (the tensor's encoded parts, about the size of its share of the delta file). Tensors are read
by the workers from the shared storage; none is sent by the driver. Without ``--ray-address`` (and no
``RAY_ADDRESS``), a local Ray instance is started with this machine's cores.

Each task plans one tensor on one thread with one torch thread, so the family is byte-identical to a local
run's, whatever the cluster (tested against a local run on a 2-CPU local cluster).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import DependencyError

if TYPE_CHECKING:
    from .budget import Budget
    from .exact import Planned
    from .format.records import Record  # noqa: F401
    from .sources import Source

_OPENED: dict[tuple[Any, ...], Any] = {}  # per worker process: sources opened by origin


def _open(origin: tuple[Any, ...]) -> Source:
    src = _OPENED.get(origin)
    if src is None:
        from .inputs import open_bases, open_source

        if origin[0] == "source":
            _kind, arg, name, base = origin
            src = open_source(arg, name=name, base=base)
        else:
            _kind, specs, name = origin
            src = open_bases(list(specs), name=name)[0]
        _OPENED[origin] = src
    return src


def plan_task(
    member: tuple[Any, ...],
    base: tuple[Any, ...],
    key: str,
    bname: str | None,
    budget: Budget,
    option: str | None,
    fast_load: bool,
    pos: int,
) -> Planned:
    """One tensor planned on a worker: the sources are opened there (once per worker process)."""
    from .executor import bounded_heap, one_torch_thread
    from .jobs import plan_member_tensor

    if not budget.lossless:
        import torch  # noqa: F401  (lossy planning: torch, one thread)
    bounded_heap(streaming=budget.lossless)
    one_torch_thread()
    return plan_member_tensor(_open(member), _open(base), key, bname, budget, option, fast_load, pos)


class RayExecutor:
    """Runs per-tensor planning as Ray tasks (one CPU each); results come back in submission order."""

    def __init__(self, address: str | None = None, window: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise DependencyError(
                "--executor ray needs Ray, which is not installed: pip install 'wfactor[ray]'"
            ) from None
        self.ray = ray
        if not ray.is_initialized():
            addr = address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            ray.init(address=addr, **kwargs) if addr else ray.init(**kwargs)
        self.remote = ray.remote(num_cpus=1)(plan_task)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = window or max(2, 2 * cpus)

    def plans(
        self,
        member: Source,
        base: Source,
        jobs: Sequence[tuple[int, str, str | None, Budget, str | None, bool]],
    ) -> Iterator[Planned | None]:
        """For each (position, tensor, aligned base tensor or None, budget, option, fast_load) job: its Planned,
        or None for a job of None (a tied tensor, written by the driver)."""
        if member.origin is None or base.origin is None:
            raise DependencyError("--executor ray needs members and a backbone opened from paths")
        pending: deque[Any] = deque()
        for job in jobs:
            if job is None:
                pending.append(None)
            else:
                pos, key, bname, budget, option, fast_load = job
                args = (member.origin, base.origin, key, bname, budget, option, fast_load, pos)
                pending.append(self.remote.remote(*args))
            while len(pending) > self.window:
                yield self._get(pending.popleft())
        while pending:
            yield self._get(pending.popleft())

    def _get(self, ref: Any) -> Planned | None:
        return None if ref is None else self.ray.get(ref)

    def close(self) -> None:
        _OPENED.clear()
