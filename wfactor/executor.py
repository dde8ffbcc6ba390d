"""Running independent per-tensor jobs on several workers, results in order.

Factoring plans each tensor on its own (one torch thread, fixed seeds), so the bytes of a family do not depend
on how many tensors are planned at once: :func:`ordered_map` runs ``fn`` over the jobs on ``workers``
threads (torch, zstd and numpy release the GIL in their kernels) and yields the results in the jobs' order,
with a bounded window of jobs in flight so that memory stays bounded (about ``2 * workers`` tensors being
planned or waiting to be written; each job holds its member tensor, its base tensor and the planner's
temporaries, a few times the tensor's size).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .errors import InputError

J = TypeVar("J")
R = TypeVar("R")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def one_torch_thread() -> None:
    """One torch (OpenMP) thread for what runs here (a worker thread's initializer), when torch is in use:
    matrix products and SVDs sum in an order that depends on the thread count. A lossless factoring never
    imports torch (wfactor.exact), and this does not import it either."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def resolve_workers(workers: int | None) -> int:
    """``workers`` checked (None: every available core)."""
    if workers is None:
        return available_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"--workers must be a whole number >= 1, found {workers!r}")
    return workers


def ordered_map(
    fn: Callable[[J], R], jobs: Iterable[J], workers: int, initializer: Callable[[], None] | None = None
) -> Iterator[R]:
    """``fn(job)`` for each job, in order, ``workers`` at a time (1: in this thread, one after another).
    ``initializer`` runs once in each worker thread (factoring fixes the thread's torch thread count there:
    OpenMP's count is a setting of each thread, and a new thread would otherwise sum in another order).
    An exception of a job is raised when its result is due; the jobs not yet started are cancelled."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    window = 2 * workers
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="wfactor", initializer=initializer) as pool:
        try:
            for job in jobs:
                pending.append(pool.submit(fn, job))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def bounded_heap(streaming: bool = False) -> None:
    """Keep freed tensor memory bounded (Linux, glibc). glibc raises its mmap threshold after each large
    free, up to 32 MiB, so that buffers below the largest size freed so far come from the heap and stay
    there: streaming models tensor by tensor, anonymous memory would grow with the largest tensors seen.
    A fixed threshold gives every larger buffer its own mapping, returned to the system when freed:

    - 1 MiB (the default, lossy planning): the planner's many temporaries of every size (deltas, SVD
      workspaces, codes) never pile up in the heaps of the worker threads;
    - ``streaming`` (lossless factoring), HEAP_BUFFER_MAX = 16 MiB: its few tensor-sized buffers (tensors,
      XOR residuals, byte planes, read chunks) are reused from the heap instead of being mapped and faulted in
      afresh for every tensor, which made lossless factoring spend half its time in page faults. The heaps
      are trimmed only when more than HEAP_TRIM_MIN = 256 MiB at their top is free (glibc's default, kept
      once the mmap threshold is fixed, is 128 KiB: every freed buffer went back to the system, and the next
      one was faulted in again). No heap grows beyond its peak, so this does not raise the peak memory.

    The first call of a process decides (glibc cannot restore its dynamic threshold). Elsewhere this does
    nothing."""
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED or not sys.platform.startswith("linux"):
        return
    _HEAP_BOUNDED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD: fixed, so no longer adjusted dynamically
        libc.mallopt(-3, HEAP_BUFFER_MAX if streaming else 1 << 20)
        if streaming:  # M_TRIM_THRESHOLD: a fixed mmap threshold also fixes this one at 128 KiB
            libc.mallopt(-1, HEAP_TRIM_MIN)
    except (OSError, AttributeError):
        pass


HEAP_BUFFER_MAX = 16 << 20
HEAP_TRIM_MIN = 256 << 20
_HEAP_BOUNDED = False
