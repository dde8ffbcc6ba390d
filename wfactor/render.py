"""Rendering: every table, line and plot the command line shows, from the library's report objects.

The library returns data (reports with ``to_json``); this module turns them into rich renderables or a
heatmap PNG, and draws progress. The CLI (:mod:`wfactor.cli`) only parses options, calls the library and
hands the result here. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from .factoring import FactorReport
    from .format.family_dir import DeltaDescription, FamilyDescription
    from .materialize import Materialized

out = Console()
if not out.is_terminal:
    out = Console(width=160)  # tables written to a pipe or a log keep their columns readable
err = Console(stderr=True)

# Heatmap colours: a log scale from DRIFT_LOW (green) through the verdict threshold (amber) to DRIFT_HIGH
# (red); the PNG uses the same range.
DRIFT_LOW, DRIFT_HIGH = 1e-3, 1.5


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


class PlainProgress:
    """Progress for a log or a pipe (stderr not a terminal): one line when a step ends, with its bytes and
    rate, and one every ``every`` seconds while a long step runs."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        t0 = self.started.setdefault(label, now)
        if done < total and now - self.last.get(label, t0) < self.every:
            return
        self.last[label] = now
        took = max(now - t0, 1e-9)
        share = f"{100 * done / total:.0f}% of {human(total)}" if done < total else human(total)
        eta = f", ETA {(total - done) * took / done:.0f} s" if 0 < done < total else ""
        click.echo(f"{label}: {share} in {took:.1f} s ({human(done / took)}/s{eta})", err=True)


def progress_bar(quiet: bool) -> tuple[Any, Callable[[str, int, int], None] | None]:
    """A rich progress bar with bytes/s on a terminal, plain lines otherwise, nothing with ``quiet``."""
    if quiet:
        return contextlib.nullcontext(), None
    if not err.is_terminal:
        plain = PlainProgress()
        return plain, plain.update
    bar = Progress(
        TextColumn("{task.description:>14}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done)

    return bar, update


def factor_table(rep: FactorReport) -> Table:
    b = rep.budget
    what = (
        "lossless"
        if b.lossless
        else f"target {b.target_bytes} bytes"
        if b.target_bytes is not None
        else f"target ratio {b.target_ratio:g}"
        if b.target_ratio is not None
        else f"max rel error {b.max_rel_error:g} of drift"
    )
    t = Table(title=f"family {rep.path}  (budget: {what})")
    for col in ("member", "original", "delta", "ratio", "worst err/W", "worst err/drift", "codecs (tensors)"):
        t.add_column(col, justify="left" if col in ("member", "codecs (tensors)") else "right")
    for m in rep.members:
        codecs = ", ".join(f"{k} {v.tensors}" for k, v in sorted(m.codecs.items(), key=lambda kv: -kv[1].bytes))
        if not m.related:
            codecs = "[yellow]unrelated: stored whole[/] " + codecs
        elif m.alignment is not None and not _trivial_alignment(m.alignment):
            codecs += f"; [cyan]aligned {m.alignment['aligned_share']:.0%}[/]"
        t.add_row(
            m.name,
            human(m.original_bytes),
            human(m.delta_bytes),
            f"{m.ratio:.3f}",
            f"{m.worst_rel_error:.2g}",
            f"{m.worst_rel_drift:.2g}",
            codecs,
        )
    t.add_section()
    o = rep.backbone_origin
    label = {
        "base": "backbone (base)",
        "bases": "backbone (" + " + ".join(str(b.get("name")) for b in o.get("bases", [])) + ")",
        "medoid": f"backbone (medoid: {o.get('member')})",
        "consensus": "backbone (consensus)",
    }.get(str(o.get("kind")), "backbone")
    t.add_row(label, human(rep.base_bytes) if rep.base_bytes else "", human(rep.backbone_bytes), "", "", "", "")
    t.add_row(
        "[bold]total[/]",
        human(rep.original_bytes),
        human(rep.family_bytes),
        f"[bold]{rep.family_bytes / rep.original_bytes:.3f}[/]" if rep.original_bytes else "",
        "",
        "",
        "",
    )
    tried = o.get("tried_bytes")
    captions = []
    if isinstance(tried, dict) and len(tried) > 1:
        captions.append(
            "backbone candidates tried (family bytes): " + ", ".join(f"{k} {human(v)}" for k, v in tried.items())
        )
    captions += [alignment_line(m.name, m.alignment) for m in rep.members if m.alignment is not None]
    captions = [c for c in captions if c]
    if captions:
        t.caption = "\n".join(captions)
    return t


def _trivial_alignment(al: dict[str, Any]) -> bool:
    return al["by_content"] == 0 and all(r["from"] == r["to"] == "" for r in al["rules"] if r["accepted"])


def alignment_line(name: str, al: dict[str, Any]) -> str:
    """One line per member whose alignment is more than same names: the rules kept, coverage, member-only."""
    if _trivial_alignment(al):
        return ""
    kept = [
        f"{r['from'] or '(all)'} -> {r['to'] or '(root)'} ({r['tensors']} tensors)"
        for r in al["rules"]
        if r["accepted"]
    ]
    if al["by_content"]:
        kept.append(f"{al['by_content']} by content")
    rest = (
        f"; member-only {al['member_only_tensors']} tensors ({human(al['member_only_bytes'])})"
        if al["member_only_tensors"]
        else ""
    )
    return f"{name}: aligned {al['aligned_share']:.0%} of its bytes by " + (", ".join(kept) or "nothing") + rest


def _drift_position(d: float) -> float:
    """0 at DRIFT_LOW (and below), 1 at DRIFT_HIGH (and above), logarithmic in between."""
    import math

    d = min(max(d, DRIFT_LOW), DRIFT_HIGH)
    return math.log(d / DRIFT_LOW) / math.log(DRIFT_HIGH / DRIFT_LOW)


def _drift_rgb(d: float) -> tuple[int, int, int]:
    """The heatmap colour of a drift: green, yellow-green, amber (about the verdict threshold), red."""
    import itertools

    t = _drift_position(d)
    stops = [(0.0, (26, 120, 50)), (0.45, (170, 190, 40)), (0.75, (235, 160, 30)), (1.0, (200, 30, 30))]
    for (t0, c0), (t1, c1) in itertools.pairwise(stops):
        if t <= t1:
            f = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            r, g, b = (round(a + (z - a) * f) for a, z in zip(c0, c1))
            return r, g, b
    return stops[-1][1]


def _fmt_drift(d: float | None) -> str:
    if d is None:
        return "-"
    if d == 0:
        return "0"
    return f"{d:.3f}" if d >= 0.001 else f"{d:.0e}"


def _group_cell(g: Any) -> tuple[str, str]:
    """(text, style) of one heatmap cell: the block's byte-weighted mean drift, '=' when all identical."""
    if g is None or (g.compared == 0 and g.identical == 0):
        return "·", "dim"
    if g.identical == g.tensors:
        return "=", "bold white on rgb(20,90,40)"
    if g.rel_drift is None:
        return "?", "dim"
    r, gg, b = _drift_rgb(g.rel_drift)
    fg = "black" if (r * 299 + gg * 587 + b * 114) / 1000 > 110 else "white"
    return _fmt_drift(g.rel_drift), f"{fg} on rgb({r},{gg},{b})"


def analysis_tables(rep: Any) -> list[Any]:
    """The rich renderables of `wfactor analyze`: member table, reasons, block table, heatmap, legend."""
    from statistics import median

    from rich.text import Text

    base = rep.base
    items: list[Any] = [Text(f"base {base.name}: {base.path} ({base.tensors} tensors, {human(base.nbytes)})")]
    t = Table(title="members against the base  (drift = ||W - B|| / ||B||, per tensor)")
    for col in (
        "member",
        "verdict",
        "tensors",
        "identical",
        "changes",
        "median drift",
        "max drift",
        "byte-wtd drift",
        "rank99 (median, changed matrices)",
    ):
        t.add_column(col, justify="left" if col in ("member", "verdict", "changes") else "right")
    for m in rep.models:
        s = m.summary
        verdict = (
            "[green]related[/]"
            if m.related
            else "[red bold]shares nothing[/]"
            if m.shares_nothing
            else "[red bold]UNRELATED[/]"
        )
        changes = ", ".join(
            f"{n} {label}"
            for n, label in (
                (s.drift, "drift"),
                (s.shape_changed, "shape"),
                (s.dtype_changed, "dtype"),
                (s.only_in_member, "new"),
                (s.only_in_base, "missing"),
            )
            if n
        )
        ranks = [x.rank99 for x in m.tensors if x.rank99 is not None and not x.identical]
        rank = f"{median(ranks):g}" if ranks else ("-" if not rep.ranks else "0")
        t.add_row(
            m.name,
            verdict,
            str(s.tensors),
            f"{s.identical} ({human(s.identical_bytes)})",
            changes or "-",
            _fmt_drift(s.median_rel_drift),
            _fmt_drift(s.max_rel_drift),
            _fmt_drift(s.weighted_rel_drift),
            rank,
        )
    items.append(t)
    for m in rep.models:
        items.append(Text.assemble((f"{m.name}: ", "bold"), m.reason))
    towers = [m for m in rep.models if m.alignment is not None and not _trivial_alignment(m.alignment)]
    if towers:  # members that hold the base under other names: how they were aligned (spec/ANALYZE.md 4)
        at = Table(title="alignment: member tensors FROM<rest> compared with base tensors TO<rest>")
        for col in ("member", "FROM", "TO", "rule", "kept", "tensors", "bytes", "median drift"):
            at.add_column(col, justify="right" if col in ("tensors", "bytes", "median drift") else "left")
        for m in towers:
            al = m.alignment
            for r in al["rules"]:
                at.add_row(
                    m.name,
                    r["from"] or "(all)",
                    r["to"] or "(root)",
                    r["origin"],
                    "[green]yes[/]" if r["accepted"] else "[red]no[/]",
                    str(r["tensors"]),
                    human(r["bytes"]),
                    _fmt_drift(r["median_drift"]),
                )
            if al["by_content"]:
                content = (str(al["by_content"]), human(al["by_content_bytes"]), "0")
                at.add_row(m.name, "", "", "content", "[green]yes[/]", *content)
            at.add_row(
                m.name,
                f"[dim]member-only: {al['member_only_tensors']} tensors[/]",
                "",
                "",
                "",
                "",
                human(al["member_only_bytes"]),
                "",
            )
        at.caption = "\n".join(alignment_line(m.name, m.alignment) for m in towers)
        items.append(at)
    if any(m.components for m in rep.models):  # pipelines: drift per component first, then per block
        comp_names = sorted({c.name for m in rep.models for c in m.components})
        ct = Table(title="components: identical tensors, mean drift (byte-weighted) and largest drift, per member")
        ct.add_column("component")
        for m in rep.models:
            ct.add_column(m.name, justify="right")
        for cname in comp_names:
            row = [cname]
            for m in rep.models:
                c = next((c for c in m.components if c.name == cname), None)
                row.append(
                    "-"
                    if c is None
                    else "identical"
                    if c.identical == c.tensors
                    else f"{c.identical}/{c.tensors} identical, mean {_fmt_drift(c.rel_drift)}, "
                    f"max {_fmt_drift(c.max_rel_drift)}"
                )
            ct.add_row(*row)
        items.append(ct)
    blocks = Table(title="layer blocks: identical tensors and largest tensor drift, per member")
    blocks.add_column("block")
    for m in rep.models:
        blocks.add_column(m.name, justify="right")
    heat = Table(title="heatmap: mean drift per layer block (weighted by bytes)", padding=(0, 1))
    heat.add_column("block")
    for m in rep.models:
        heat.add_column(m.name, justify="center")
    for name in rep.groups:
        row, hrow = [name], [name]
        for m in rep.models:
            g = m.group(name)
            if g is None:
                row.append("-")
            else:
                row.append(f"{g.identical}/{g.tensors} identical, max {_fmt_drift(g.max_rel_drift)}")
            text, style = _group_cell(g)
            hrow.append(Text(f" {text} ", style=style))
        blocks.add_row(*row)
        heat.add_row(*hrow)
    items.append(blocks)
    items.append(heat)
    items.append(
        Text(
            f"'=' every tensor of the block bit-identical to the base; '·' nothing compared; colours: log scale "
            f"from {DRIFT_LOW:g} (green) to {DRIFT_HIGH:g} (red); fine-tunes drift well under 0.3, "
            "unrelated models about 1.41",
            style="dim",
        )
    )
    return items


def plot_heatmap(rep: Any, path: Path) -> None:
    """The heatmap as a PNG (matplotlib, no pyplot global state). matplotlib is optional, hence the
    type-ignores: mypy finds no module when it is absent."""
    import numpy as np
    from matplotlib.backends.backend_agg import (  # type: ignore[import-not-found,unused-ignore]
        FigureCanvasAgg,
    )
    from matplotlib.colors import (  # type: ignore[import-not-found,unused-ignore]
        LinearSegmentedColormap,
        LogNorm,
    )
    from matplotlib.figure import Figure  # type: ignore[import-not-found,unused-ignore]

    groups, members = rep.groups, rep.models
    data = np.full((len(groups), len(members)), np.nan)
    labels = [["" for _ in members] for _ in groups]
    for j, m in enumerate(members):
        for i, name in enumerate(groups):
            g = m.group(name)
            text, _ = _group_cell(g)
            labels[i][j] = text
            if g is not None and text != "·" and g.rel_drift is not None:
                data[i, j] = min(max(g.rel_drift, DRIFT_LOW), DRIFT_HIGH)
    cmap = LinearSegmentedColormap.from_list(
        "wfactor_drift",
        [
            (t, tuple(c / 255 for c in _drift_rgb(DRIFT_LOW * (DRIFT_HIGH / DRIFT_LOW) ** t)))
            for t in (0.0, 0.45, 0.75, 1.0)
        ],
    ).with_extremes(bad="#dddddd")
    fig = Figure(figsize=(2.5 + 1.1 * len(members), 1.5 + 0.32 * len(groups)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=LogNorm(DRIFT_LOW, DRIFT_HIGH), aspect="auto")
    ax.set_xticks(range(len(members)), [m.name + ("" if m.related else "\n(unrelated)") for m in members])
    ax.set_yticks(range(len(groups)), groups)
    ax.tick_params(axis="x", labelrotation=30)
    for i in range(len(groups)):
        for j in range(len(members)):
            v = data[i, j]
            if labels[i][j] == "=":
                r, g, b = 20, 90, 40
            else:
                r, g, b = (221, 221, 221) if np.isnan(v) else _drift_rgb(v)
            color = "white" if (r * 299 + g * 587 + b * 114) / 1000 <= 110 else "black"
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7, color=color)
    ax.set_title(f"mean drift ||W-B||/||B|| per layer block, against {rep.base.name}")
    fig.colorbar(im, ax=ax, label="rel drift (log scale)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120, format="png")


def delta_description_table(d: DeltaDescription) -> list[Any]:
    """`wfactor inspect DELTA_FILE`."""
    t = Table("codec", "tensors", "bytes")
    for k, v in d.codecs.items():
        t.add_row(k, str(v["tensors"]), human(v["bytes"]))
    return [f"delta of member [bold]{d.member}[/], backbone sha256 {d.backbone_sha256}", t]


def family_description_lines(desc: FamilyDescription) -> list[Any]:
    """`wfactor inspect FAMILY`: a header line, the members table, the family's size against its members'."""
    shards = f" ({len(desc.backbone_shards)} shards)" if desc.backbone_shards else ""
    head = (
        f"family [bold]{desc.family}[/] (format v{desc.format_version}, {desc.created_by}); "
        f"backbone {human(desc.backbone_bytes)} sha256 {desc.backbone_sha256[:16]}...{shards}"
    )
    t = Table("member", "tensors", "original", "delta", "ratio", "worst rel err", "bytes per codec")
    for m in desc.members:
        plan = m.plan
        per = ", ".join(
            f"{k} {human(v['bytes'])}"
            for k, v in sorted(plan.get("codecs", {}).items(), key=lambda kv: -kv[1]["bytes"])
        )
        if plan.get("related") is False:
            per = "unrelated: stored whole; " + per
        elif isinstance(plan.get("alignment"), dict):
            per += f"; aligned {plan['alignment'].get('aligned_share', 0):.0%}"
        t.add_row(
            m.name,
            str(m.tensors),
            human(m.original_bytes),
            human(m.delta_bytes),
            f"{m.ratio:.3f}",
            f"{plan.get('worst_rel_error', 0):.2g}",
            per,
        )
    total = desc.members_original_bytes
    tail = (
        f"family {human(desc.family_bytes)} for members totalling {human(total)} "
        f"({desc.family_bytes / total:.3f} of their size, backbone included)"
        if total
        else ""
    )
    return [head, t, tail]


def export_peft_lines(rep: Any, output: Path) -> list[Any]:
    """`wfactor export-peft`: what was written, the modules approximated by SVD, the tensors dropped."""
    approx = [m for m in rep.modules if m.how == "svd"]
    items: list[Any] = [
        f"wrote {output} ({human(rep.bytes)}): {len(rep.modules)} LoRA modules, r = {rep.r}, "
        f"lora_alpha = {rep.lora_alpha} (scaling 1); {len(rep.modules) - len(approx)} exact"
    ]
    if approx:
        t = Table("tensor", "rank", "rel error (of its delta)", title="approximated by truncated SVD")
        for m in sorted(approx, key=lambda m: -m.rel_error):
            t.add_row(m.tensor, str(m.rank), f"{m.rel_error:.3g}")
        items.append(t)
        w = rep.worst
        assert w is not None
        items.append(f"worst: {w.tensor} {w.rel_error:.3g}")
    if rep.dropped:
        t = Table("tensor", "why", "drift ||W-B||/||B||", title="dropped: no LoRA form (the base's value is used)")
        for d in rep.dropped:
            t.add_row(d.tensor, d.reason, f"{d.rel_drift:.3g}")
        items.append(t)
    return items


def materialize_line(done: Materialized) -> str:
    """`wfactor materialize`: what was written."""
    files = [p.relative_to(done.out).as_posix() for p in done.files]
    weights = [f for f in files if f.endswith(".safetensors")]
    sharded = done.target.name.endswith(".index.json")
    what = f"{done.target} and {len(weights)} shards" if sharded else f"{done.target}"
    if done.target.is_dir():
        what = f"{len(weights)} component weight file(s) under {done.target}"
    n_config = len(files) - len(weights) - sharded
    return f"wrote {what} ({human(done.weights_bytes)}) and {n_config} config file(s)"
