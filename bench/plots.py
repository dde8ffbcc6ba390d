"""Plots for the bench results, written beside bench/RESULTS.md as bench/<name>.png.

matplotlib comes with the optional ``bench`` extra (``make bench`` installs it); without it every function
returns None and the results say no plot was drawn. Not a bench script: ``bench/run.py`` skips it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common import BENCH

# y floor for 1 - cosine on the log scale: an exact rebuild (cosine 1) is drawn there
FLOOR = 1e-12


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def size_vs_cosine(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    name: str,
    *,
    xlabel: str,
    title: str,
    threshold: float | None = 0.999,
) -> str | None:
    """One curve per method: x = bytes (MB), y = 1 - worst cosine (log). Returns the file name under bench/."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "os^vD<>pPX*h"
    for i, (meth, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        if not pts:
            continue
        xs = [b / 1e6 for b, _ in pts]
        ys = [max(1 - c, FLOOR) for _, c in pts]
        style = "-" if meth.startswith("wfactor") or meth.startswith("planner") else "--"
        ax.plot(xs, ys, style, marker=markers[i % len(markers)], ms=4, lw=1.6 if style == "-" else 1.0, label=meth)
    ax.set_yscale("log")
    if threshold is not None:
        ax.axhline(1 - threshold, color="grey", ls=":", lw=0.8)
        ax.text(ax.get_xlim()[1], 1 - threshold, f" cos {threshold}", va="center", ha="left", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("1 - worst cosine (log; lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", lw=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(BENCH / name, dpi=100)
    plt.close(fig)
    return name


def lossless_bars(ratios: Mapping[str, Mapping[str, float]], name: str) -> str | None:
    """Grouped bars: per family, each method's bytes as a ratio to raw. Returns the file name under bench/."""
    plt = _pyplot()
    if plt is None:
        return None
    fams = list(ratios)
    methods: list[str] = []
    for f in fams:
        methods += [m for m in ratios[f] if m not in methods]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(fams))]
        ys = [ratios[f].get(m, 0.0) for f in fams]
        bars = ax.bar(xs, ys, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel("bytes / raw (lower is better)")
    ax.set_ylim(0, 1.1)
    ax.set_title("Lossless: bytes stored as a ratio to the checkpoints side by side", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(BENCH / name, dpi=100)
    plt.close(fig)
    return name
