"""The randomised SVD, in one place: a range finder with power iterations (Halko, Martinsson and Tropp 2011,
algorithms 4.4 and 5.1), seeded so that the same matrix gives the same factors on every run.

Used where an exact SVD of a large matrix would cost too much: the effective rank of `wfactor analyze`
(:func:`wfactor.drift.effective_rank`) and the low-rank codec's factors (:mod:`wfactor.codecs.lowrank`).
"""

from __future__ import annotations

import torch

OVERSAMPLE = 16
POWER_ITERS = 2


def range_finder(
    a: torch.Tensor, width: int, generator: torch.Generator, power_iters: int = POWER_ITERS
) -> torch.Tensor:
    """An orthonormal basis Q [m, width] of (most of) the range of ``a`` [m, n] (float32): Q = orth(A Ω) for a
    Gaussian Ω drawn from ``generator`` (on the CPU: the same draws on every device), then ``power_iters``
    rounds of Q = orth(A orth(Aᵀ Q)), re-orthonormalised at each half step so that small singular values
    survive in float32."""
    omega = torch.randn(a.shape[1], width, generator=generator, dtype=torch.float32).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    return q


def randomized_svd(
    a: torch.Tensor, rank: int, seed: int = 0, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the best rank-``rank`` approximation of ``a`` (float32), from a basis of ``rank +
    oversample`` columns."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = range_finder(a, min(rank + oversample, min(a.shape)), gen, power_iters)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]
