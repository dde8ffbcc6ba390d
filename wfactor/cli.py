"""The `wfactor` command line: parse options, call the library, render with rich. No logic lives here.

Exit codes: 0 success; 1 verification failed or a file's digest did not match; 2 bad input or usage.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from . import __version__
from .errors import InputError, WfactorError, is_allocation_failure
from .factor import FactorReport
from .factor import factor as factor_family
from .family import Family, describe_delta
from .plan import DEFAULT_MAX_REL_ERROR, Budget
from .sources import split_spec

F = TypeVar("F", bound=Callable[..., Any])
out = Console()
if not out.is_terminal:
    out = Console(width=160)  # tables written to a pipe or a log keep their columns readable
err = Console(stderr=True)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def fail(code: str, message: str, exit_code: int) -> None:
    """One line on stderr, ``error[code]: message`` (the code is listed in spec/FORMAT.md), then exit."""
    click.echo(click.style(f"error[{code}]", fg="red", bold=True) + ": " + " ".join(message.split()), err=True)
    sys.exit(exit_code)


def run(fn: Callable[[], int | None]) -> None:
    """Run a command body; a WfactorError or OS error becomes one line on stderr and a non-zero exit."""
    try:
        code = fn() or 0
    except WfactorError as exc:
        fail(exc.code, exc.message, exc.exit_code)
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        fail("io", f"{where}{exc.strerror or exc}", 2)
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        first = (str(exc).strip().splitlines() or ["MemoryError"])[0]
        fail("memory", f"not enough memory ({first}); free memory or use a machine with more", 2)
    except KeyboardInterrupt:
        fail("interrupted", "stopped by the user; nothing was left half-written", 130)
    sys.exit(code)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


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
        click.echo(f"{label}: {share} in {took:.1f} s ({human(done / took)}/s)", err=True)


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
        console=err,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done)

    return bar, update


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wfactor")
def main() -> None:
    """Factor families of fine-tuned models into one shared backbone plus small per-model deltas.

    \b
    Exit codes:
      0    success
      1    verification or integrity failure (a damaged family, a wrong backbone, a mismatch)
      2    bad input or usage (message: error[code]: file, tensor, expected vs found, what to do)
      130  interrupted (nothing is left half-written)
    Error codes (the [code] in messages) are listed in spec/FORMAT.md section 10.
    """


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


# --base and --map, shared by `factor` and `analyze`
map_option = click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="[MEMBER:]FROM=TO",
    help="Align tensors FROM<rest> of a member (all members without MEMBER:) with backbone tensors TO<rest> "
    "(repeatable; overrides inferred rules). Same names, prefix rules inferred from names and shapes, and "
    "bit-identical tensors align without it.",
)
names_only_option = click.option(
    "--names-only",
    is_flag=True,
    help="Align by same names and --map rules only: no inferred rules, no matching by content.",
)

# the per-tensor budget options, shared by `factor` and `add`
lossless_option = click.option("--lossless", is_flag=True, help="Rebuild every tensor bit for bit.")
max_rel_error_option = click.option(
    "--max-rel-error",
    type=float,
    default=DEFAULT_MAX_REL_ERROR,
    show_default=True,
    help="Per-tensor budget: ||rebuilt - original|| <= E * ||original - base|| (error relative to the drift).",
)

@main.command()
@click.argument("members", nargs=-1, required=True, metavar="[NAME=]PATH...")
@click.option(
    "--base",
    "base",
    multiple=True,
    metavar="[NAME=]PATH",
    help="The base model; it becomes the backbone. Repeat as NAME=PATH for a backbone of several towers "
    "(tensors named NAME/...). Without it, the smaller of the medoid member and the members' element-wise "
    "mean is chosen.",
)
@map_option
@names_only_option
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Family directory to write."
)
@lossless_option
@max_rel_error_option
@click.option(
    "--target-bytes",
    type=int,
    default=None,
    metavar="N",
    help="Whole-family budget in bytes: spend them where they cut the error most.",
)
@click.option(
    "--target-ratio",
    type=float,
    default=None,
    metavar="R",
    help="Whole-family budget as a fraction of the models side by side (base + members).",
)
@click.option(
    "--max-shard-size",
    default=None,
    metavar="SIZE",
    help="Split a backbone larger than SIZE (500MB, 2GB, 1.5GiB, bytes) into shards: a version-2 family "
    "(spec/FORMAT.md 2.1) that readers of version 1 refuse. Default: one backbone file.",
)
@click.option(
    "--fast-load",
    is_flag=True,
    help="Store k-bit codes as bit planes, used by loaders without decoding (wfactor.torch.attach keeps "
    "them as they are), instead of zstd frames: ~1% more bytes at 5-8 bits, ~25% at 3-4. A version-3 "
    "family (spec/FORMAT.md 4.3) that older readers refuse.",
)
@click.option("--force", is_flag=True, help="Replace an existing family directory (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def factor(
    members: tuple[str, ...],
    base: tuple[str, ...],
    maps: tuple[str, ...],
    names_only: bool,
    output: Path,
    lossless: bool,
    max_rel_error: float,
    target_bytes: int | None,
    target_ratio: float | None,
    max_shard_size: str | None,
    fast_load: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Split models into one backbone (the base) plus a small delta per member.

    Every PATH (members and --base) may be a .safetensors file, a model directory (model.safetensors, a
    sharded model.safetensors.index.json, or one *.safetensors), or a Hugging Face Hub id org/name[@revision]
    (or hf://name). A path that exists on disk always wins over a Hub id; HF_HUB_OFFLINE=1 resolves Hub ids
    from the local cache only. A Hub member's default name is the repository's name.

    \b
    Examples:
      wfactor factor chat=ckpt/chat code=ckpt/code --base ckpt/base -o family
      wfactor factor ft1.safetensors ft2.safetensors --base base.safetensors -o fam --lossless
      wfactor factor acme/chat-7b acme/code-7b@v2 --base acme/base-7b -o family --max-shard-size 5GB
      wfactor factor chat=ckpt/chat vlm=ckpt/llava rerank=ckpt/rerank --base ckpt/llama -o family
      wfactor factor vlm=ckpt/llava --base text=ckpt/llama --base vision=ckpt/siglip -o family
      wfactor factor vlm=ckpt/vlm --base ckpt/llama --map vlm:lm.=model. -o family
    """

    def body() -> None:
        bar, update = progress_bar(quiet or as_json)
        budget = Budget(
            lossless=lossless, max_rel_error=max_rel_error, target_bytes=target_bytes, target_ratio=target_ratio
        )
        with bar:
            rep = factor_family(
                list(members),
                list(base) or None,
                output,
                budget,
                force=force,
                progress=update,
                max_shard_size=max_shard_size,
                fast_load=fast_load,
                maps=list(maps),
                infer=not names_only,
            )
        if as_json:
            emit_json(rep.to_json())
        else:
            out.print(factor_table(rep))

    run(body)


@main.command()
@click.argument("family", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--force", is_flag=True, help="Write into a non-empty directory.")
@click.option(
    "--max-shard-size",
    default=None,
    metavar="SIZE",
    help="Split the weights into model-0000i-of-0000N.safetensors files of at most SIZE (500MB, 2GB, 1.5GiB, "
    "bytes) plus model.safetensors.index.json, as transformers' save_pretrained does.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def materialize(family: Path, name: str, output: Path, force: bool, max_shard_size: str | None, as_json: bool) -> None:
    """Rebuild member NAME as DIR/model.safetensors, with its config and tokenizer files.

    \b
    Example:
      wfactor materialize family chat -o rebuilt/chat
      wfactor materialize family chat -o rebuilt/chat --max-shard-size 2GB
    """

    def body() -> None:
        with Family(family) as fam:
            path = fam.materialize(name, output, force=force, max_shard_size=max_shard_size)
            # a pipeline member (spec 3.3) writes component folders: list files relative to the output
            files = sorted(
                p.relative_to(output).as_posix()
                for p in output.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(output).parts)
            )
        weights = [f for f in files if f.endswith(".safetensors")]
        nbytes = sum((output / f).stat().st_size for f in weights)
        if as_json:
            emit_json({"member": name, "output": str(output), "files": files, "bytes": nbytes})
        else:
            sharded = path.name.endswith(".index.json")
            what = f"{path} and {len(weights)} shards" if sharded else f"{path}"
            if path.is_dir():
                what = f"{len(weights)} component weight file(s) under {path}"
            n_config = len(files) - len(weights) - sharded
            out.print(f"wrote {what} ({human(nbytes)}) and {n_config} config file(s)")

    run(body)


@main.command()
@click.argument("family", type=click.Path(path_type=Path))
@click.option(
    "--against",
    "against",
    multiple=True,
    metavar="NAME=PATH",
    help="Rebuild NAME and compare it with the original at PATH (or Hub id org/name[@revision]), tensor by "
    "tensor (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(family: Path, against: tuple[str, ...], as_json: bool) -> None:
    """Check every file's sha256, every delta's backbone digest, and rebuild every tensor.

    Exits 1 on any mismatch, so a CI step can gate on it.

    \b
    Example:
      wfactor verify family --against chat=ckpt/chat --against code=ckpt/code
    """

    def body() -> int:
        pairs: dict[str, str] = {}
        for a in against:
            name, path = split_spec(a)
            if name is None:
                raise InputError(f"--against {a}: expected NAME=PATH")
            pairs[name] = path
        with Family(family) as fam:
            rep = fam.verify(pairs)
        if as_json:
            emit_json(rep.to_json())
        else:
            for p in rep.problems:
                out.print(f"[red]FAIL[/] {p}", highlight=False)
            worst = ", ".join(f"{k} {v:.2g}" for k, v in sorted(rep.worst.items()))
            status = "[green]OK[/]" if rep.ok else "[red]FAILED[/]"
            out.print(
                f"{status}: {len(rep.checked_files)} files checked, {rep.tensors} tensors rebuilt, "
                f"{rep.compared} compared with originals" + (f"; worst rel error: {worst}" if worst else ""),
                highlight=False,
            )
        return 0 if rep.ok else 1

    run(body)


@main.command()
@click.argument("target", type=click.Path(path_type=Path), metavar="FAMILY_OR_FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(target: Path, as_json: bool) -> None:
    """Show members, codecs, bytes per codec and savings against the originals.

    \b
    Examples:
      wfactor inspect family
      wfactor inspect family/deltas/chat.safetensors
    """

    def body() -> None:
        if target.is_file():
            with describe_delta(target) as d:
                codecs: dict[str, list[int]] = {}
                data: dict[str, Any]
                for rec in d.records.values():
                    c = codecs.setdefault(rec.codec, [0, 0])
                    c[0] += 1
                    c[1] += sum(d.file.tensors[p.key].nbytes for p in rec.part_specs())
                data = {
                    "delta": str(target),
                    "member": d.member,
                    "backbone_sha256": d.backbone_sha256,
                    "tensors": len(d.records),
                    "bytes": d.file.size,
                    "codecs": {k: {"tensors": v[0], "bytes": v[1]} for k, v in sorted(codecs.items())},
                }
            if as_json:
                emit_json(data)
            else:
                out.print(f"delta of member [bold]{data['member']}[/], backbone sha256 {data['backbone_sha256']}")
                t = Table("codec", "tensors", "bytes")
                for k, v in data["codecs"].items():
                    t.add_row(k, str(v["tensors"]), human(v["bytes"]))
                out.print(t)
            return
        with Family(target) as fam:
            man = fam.manifest
            members: list[dict[str, Any]] = []
            for m in man.members:
                members.append(
                    {
                        "name": m.name,
                        "tensors": len(m.tensors),
                        "original_bytes": m.original_bytes,
                        "delta_bytes": m.delta.size,
                        "ratio": round(m.delta.size / m.original_bytes, 6) if m.original_bytes else 0,
                        "source": m.source,
                        "plan": m.plan,
                    }
                )
            total_orig = sum(m.original_bytes for m in man.members)
            data = {
                "family": str(target),
                "format_version": man.format_version,
                "created_by": man.created_by,
                "backbone": {"path": man.backbone.path, "bytes": man.backbone_bytes, "sha256": man.backbone.sha256}
                | ({"shards": [r.path for r in man.backbone_shards]} if man.backbone_shards else {}),
                "family_bytes": man.backbone_bytes + sum(m.delta.size for m in man.members),
                "members_original_bytes": total_orig,
                "members": members,
            }
        if as_json:
            emit_json(data)
            return
        out.print(
            f"family [bold]{target}[/] (format v{man.format_version}, {man.created_by}); "
            f"backbone {human(man.backbone_bytes)} sha256 {man.backbone.sha256[:16]}..."
            + (f" ({len(man.backbone_shards)} shards)" if man.backbone_shards else ""),
            highlight=False,
        )
        t = Table("member", "tensors", "original", "delta", "ratio", "worst rel err", "bytes per codec")
        for row in members:
            plan = row["plan"]
            per = ", ".join(
                f"{k} {human(v['bytes'])}"
                for k, v in sorted(plan.get("codecs", {}).items(), key=lambda kv: -kv[1]["bytes"])
            )
            if plan.get("related") is False:
                per = "unrelated: stored whole; " + per
            t.add_row(
                row["name"],
                str(row["tensors"]),
                human(row["original_bytes"]),
                human(row["delta_bytes"]),
                f"{row['ratio']:.3f}",
                f"{plan.get('worst_rel_error', 0):.2g}",
                per,
            )
        out.print(t)
        fam_bytes = int(data["family_bytes"])
        out.print(
            f"family {human(fam_bytes)} for members totalling {human(total_orig)} "
            f"({fam_bytes / total_orig:.3f} of their size, backbone included)"
            if total_orig
            else ""
        )

    run(body)


# -- analyze ---------------------------------------------------------------------------------------------
# Heatmap colours: a log scale from DRIFT_LOW (green) through the verdict threshold (amber) to DRIFT_HIGH
# (red); the PNG uses the same range.
DRIFT_LOW, DRIFT_HIGH = 1e-3, 1.5


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


@main.command()
@click.argument("members", nargs=-1, required=True, metavar="[NAME=]PATH...")
@click.option(
    "--base",
    "base",
    multiple=True,
    metavar="[NAME=]PATH",
    help="The model to compare with (repeat as NAME=PATH for several towers). Without it the FIRST model "
    "given is the base.",
)
@map_option
@names_only_option
@click.option(
    "--json",
    "json_path",
    metavar="FILE",
    help="Write the report as JSON (spec/ANALYZE.md); '-' prints it instead of the tables.",
)
@click.option(
    "--plot",
    "plot_path",
    metavar="FILE",
    type=click.Path(path_type=Path),
    help="Also write the heatmap as a PNG (needs matplotlib: pip install 'wfactor[plot]').",
)
@click.option("--no-rank", is_flag=True, help="Skip the effective ranks (the SVDs are the slow part on big models).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def analyze(
    members: tuple[str, ...],
    base: tuple[str, ...],
    maps: tuple[str, ...],
    names_only: bool,
    json_path: str | None,
    plot_path: Path | None,
    no_rank: bool,
    quiet: bool,
) -> None:
    """Compare models with a base, tensor by tensor, before factoring them.

    Per tensor: bit-identical or not, drift ||W-B||/||B||, cosine, effective rank of the delta (99% of
    its energy), share of changed entries. Per member: its alignment to the base (rules, coverage,
    member-only tensors), a verdict (related to the base, or not) with its reason; per layer block:
    identical counts and a drift heatmap. spec/ANALYZE.md defines every figure.

    \b
    Examples:
      wfactor analyze chat=ckpt/chat code=ckpt/code --base ckpt/base
      wfactor analyze ckpt/base ckpt/chat ckpt/code          # the first model is the base
      wfactor analyze ckpt/* --base ckpt/base --json report.json --plot drift.png
      wfactor analyze ft.safetensors --base base.safetensors --json - | jq '.models[].related'
      wfactor analyze acme/chat-7b@v2 --base acme/base-7b   # Hub ids: see wfactor factor --help
      wfactor analyze vlm=ckpt/llava rerank=ckpt/rerank --base ckpt/llama   # towers under other names
    """
    from .analyze import analyze as analyze_models

    def body() -> None:
        if plot_path is not None:
            try:
                import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
            except ImportError:
                raise InputError(
                    "--plot needs matplotlib, which is not installed: pip install 'wfactor[plot]'"
                ) from None
        to_stdout = json_path == "-"
        bar, update = progress_bar(quiet or to_stdout)
        with bar:
            rep = analyze_models(
                list(members),
                list(base) or None,
                ranks=not no_rank,
                progress=update,
                maps=maps,
                infer=not names_only,
            )
        if to_stdout:
            emit_json(rep.to_json())
        else:
            for item in analysis_tables(rep):
                out.print(item)
        if json_path and not to_stdout:
            Path(json_path).write_text(json.dumps(rep.to_json(), indent=2) + "\n", encoding="utf-8")
            out.print(f"wrote {json_path}", highlight=False)
        if plot_path is not None:
            plot_heatmap(rep, plot_path)
            if not to_stdout:
                out.print(f"wrote {plot_path}", highlight=False)
            else:
                err.print(f"wrote {plot_path}", highlight=False)

    run(body)


# -- PEFT export, growing and shrinking a family (wfactor/peft.py, wfactor/edit.py) ----------------------------
@main.command("export-peft")
@click.argument("family", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Adapter directory.")
@click.option(
    "--max-rank",
    type=int,
    default=None,
    metavar="R",
    help="Approximate tensors that are not low rank by a truncated SVD of rank <= R (errors are reported); "
    "1-D tensors (norms, biases) are then dropped and their drift reported.",
)
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export_peft(family: Path, name: str, output: Path, max_rank: int | None, force: bool, as_json: bool) -> None:
    """Write member NAME as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    Works when the member's deltas are low rank against the backbone (a merged LoRA factored by wfactor);
    otherwise it names the tensors that are not, unless --max-rank R approximates them. Load the adapter on
    the base model with peft, or serve it beside others with a multi-adapter engine.

    \b
    Examples:
      wfactor export-peft family chat -o chat-lora
      wfactor export-peft family full_ft -o ft-lora --max-rank 16
      vllm serve BASE --enable-lora --lora-modules chat=./chat-lora
    """
    from .peft import export_peft as export

    def body() -> None:
        rep = export(family, name, output, max_rank=max_rank, force=force)
        if as_json:
            emit_json(rep.to_json())
            return
        approx = [m for m in rep.modules if m.how == "svd"]
        out.print(
            f"wrote {output} ({human(rep.bytes)}): {len(rep.modules)} LoRA modules, r = {rep.r}, "
            f"lora_alpha = {rep.lora_alpha} (scaling 1); {len(rep.modules) - len(approx)} exact",
            highlight=False,
        )
        if approx:
            t = Table("tensor", "rank", "rel error (of its delta)", title="approximated by truncated SVD")
            for m in sorted(approx, key=lambda m: -m.rel_error):
                t.add_row(m.tensor, str(m.rank), f"{m.rel_error:.3g}")
            out.print(t)
            w = rep.worst
            assert w is not None
            out.print(f"worst: {w.tensor} {w.rel_error:.3g}", highlight=False)
        if rep.dropped:
            t = Table("tensor", "why", "drift ||W-B||/||B||", title="dropped: no LoRA form (the base's value is used)")
            for d in rep.dropped:
                t.add_row(d.tensor, d.reason, f"{d.rel_drift:.3g}")
            out.print(t)

    run(body)


@main.command()
@click.argument("family", type=click.Path(path_type=Path))
@click.argument("member", metavar="[NAME=]PATH")
@click.option(
    "--base",
    "base",
    default=None,
    metavar="PATH",
    help="Base model of a PEFT adapter member (default: the family's backbone).",
)
@map_option
@lossless_option
@max_rel_error_option
@click.option("--target-bytes", type=int, default=None, hidden=True)
@click.option("--target-ratio", type=float, default=None, hidden=True)
@click.option("--force", is_flag=True, help="Replace a member of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print the member's report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def add(
    family: Path,
    member: str,
    base: str | None,
    maps: tuple[str, ...],
    lossless: bool,
    max_rel_error: float,
    target_bytes: int | None,
    target_ratio: float | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Add one member to an existing family, factored against its backbone.

    The other members' files are not touched; the manifest is replaced atomically, last.

    \b
    Examples:
      wfactor add family math=ckpt/math
      wfactor add family chat-lora=adapters/chat          # a PEFT adapter on the backbone
      wfactor add family chat=ckpt/chat-v2 --force        # replace member chat
    """
    from .edit import add as add_member

    def body() -> None:
        budget = Budget(
            lossless=lossless, max_rel_error=max_rel_error, target_bytes=target_bytes, target_ratio=target_ratio
        )
        bar, update = progress_bar(quiet or as_json)
        with bar:
            rep = add_member(family, member, budget, force=force, base=base, progress=update, maps=maps)
        if as_json:
            emit_json(rep.to_json())
            return
        what = "" if rep.related else " (unrelated to the backbone: stored whole)"
        out.print(
            f"added {rep.name} to {family}: delta {human(rep.delta_bytes)} for {human(rep.original_bytes)} "
            f"(ratio {rep.ratio:.3f}), worst rel error {rep.worst_rel_error:.2g}{what}",
            highlight=False,
        )
        line = alignment_line(rep.name, rep.alignment) if rep.alignment is not None else ""
        if line:
            out.print(line, highlight=False)

    run(body)


@main.command()
@click.argument("family", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def remove(family: Path, name: str, as_json: bool) -> None:
    """Remove member NAME: the manifest is replaced atomically, then its files are deleted.

    \b
    Example:
      wfactor remove family chat
    """
    from .edit import remove as remove_member

    def body() -> None:
        rep = remove_member(family, name)
        if as_json:
            emit_json(rep.to_json())
        else:
            out.print(
                f"removed {name} from {family} ({human(rep.freed_bytes)} freed); members: {', '.join(rep.members)}",
                highlight=False,
            )

    run(body)


if __name__ == "__main__":  # pragma: no cover
    main()
