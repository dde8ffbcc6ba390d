"""The `wfactor` command line: parse options, call the library, render with rich. No logic lives here.

Exit codes: 0 success; 1 verification failed or a file's digest did not match; 2 bad input or usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from . import __version__
from .errors import InputError, WfactorError
from .factor import FactorReport, factor as factor_family
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
    except KeyboardInterrupt:
        fail("interrupted", "stopped by the user; nothing was left half-written", 130)
    sys.exit(code)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def progress_bar(quiet: bool) -> tuple[Any, Callable[[str, int, int], None] | None]:
    if quiet or not err.is_terminal:
        return None, None
    bar = Progress(
        TextColumn("{task.description:>14}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=err, transient=True,
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
    """Factor families of fine-tuned models into one shared backbone plus small per-model deltas."""


def factor_table(rep: FactorReport) -> Table:
    t = Table(title=f"family {rep.path}  (budget: {'lossless' if rep.budget.lossless else f'max rel error {rep.budget.max_rel_error:g}'})")
    for col in ("member", "original", "delta", "ratio", "worst err/W", "worst err/drift", "codecs (tensors)"):
        t.add_column(col, justify="left" if col in ("member", "codecs (tensors)") else "right")
    for m in rep.members:
        codecs = ", ".join(f"{k} {v.tensors}" for k, v in sorted(m.codecs.items(), key=lambda kv: -kv[1].bytes))
        t.add_row(m.name, human(m.original_bytes), human(m.delta_bytes), f"{m.ratio:.3f}", f"{m.worst_rel_error:.2g}",
                  f"{m.worst_rel_drift:.2g}", codecs)
    t.add_section()
    t.add_row("backbone", human(rep.base_bytes), human(rep.backbone_bytes), "", "", "", "")
    t.add_row(
        "[bold]total[/]", human(rep.original_bytes), human(rep.family_bytes),
        f"[bold]{rep.family_bytes / rep.original_bytes:.3f}[/]" if rep.original_bytes else "", "", "", "",
    )
    return t


@main.command()
@click.argument("members", nargs=-1, required=True, metavar="[NAME=]PATH...")
@click.option("--base", "base", required=True, metavar="PATH", help="The base model; it becomes the backbone.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Family directory to write.")
@click.option("--lossless", is_flag=True, help="Rebuild every tensor bit for bit.")
@click.option(
    "--max-rel-error", type=float, default=DEFAULT_MAX_REL_ERROR, show_default=True,
    help="Per-tensor budget: ||rebuilt - original|| <= E * ||original - base|| (error relative to the drift).",
)
@click.option("--force", is_flag=True, help="Replace an existing family directory (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def factor(members: tuple[str, ...], base: str, output: Path, lossless: bool, max_rel_error: float,
           force: bool, as_json: bool, quiet: bool) -> None:
    """Split models into one backbone (the base) plus a small delta per member.

    \b
    Examples:
      wfactor factor chat=ckpt/chat code=ckpt/code --base ckpt/base -o family
      wfactor factor ft1.safetensors ft2.safetensors --base base.safetensors -o fam --lossless
    """

    def body() -> None:
        bar, update = progress_bar(quiet or as_json)
        budget = Budget(lossless=lossless, max_rel_error=max_rel_error)
        if bar:
            with bar:
                rep = factor_family(list(members), base, output, budget, force=force, progress=update)
        else:
            rep = factor_family(list(members), base, output, budget, force=force)
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
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def materialize(family: Path, name: str, output: Path, force: bool, as_json: bool) -> None:
    """Rebuild member NAME as DIR/model.safetensors, with its config and tokenizer files.

    \b
    Example:
      wfactor materialize family chat -o rebuilt/chat
    """

    def body() -> None:
        with Family(family) as fam:
            path = fam.materialize(name, output, force=force)
            files = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
        if as_json:
            emit_json({"member": name, "output": str(output), "files": files, "bytes": path.stat().st_size})
        else:
            out.print(f"wrote {path} ({human(path.stat().st_size)}) and {len(files) - 1} config file(s)")

    run(body)


@main.command()
@click.argument("family", type=click.Path(path_type=Path))
@click.option("--against", "against", multiple=True, metavar="NAME=PATH",
              help="Rebuild NAME and compare it with the original at PATH, tensor by tensor (repeatable).")
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
                for rec in d.records.values():
                    c = codecs.setdefault(rec.codec, [0, 0])
                    c[0] += 1
                    c[1] += sum(d.file.tensors[p.key].nbytes for p in rec.part_specs())
                data = {
                    "delta": str(target), "member": d.member, "backbone_sha256": d.backbone_sha256,
                    "tensors": len(d.records), "bytes": d.file.size,
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
            members = []
            for m in man.members:
                members.append({
                    "name": m.name, "tensors": len(m.tensors), "original_bytes": m.original_bytes,
                    "delta_bytes": m.delta.size, "ratio": round(m.delta.size / m.original_bytes, 6) if m.original_bytes else 0,
                    "source": m.source, "plan": m.plan,
                })
            total_orig = sum(m.original_bytes for m in man.members)
            data = {
                "family": str(target), "format_version": man.format_version, "created_by": man.created_by,
                "backbone": {"path": man.backbone.path, "bytes": man.backbone.size, "sha256": man.backbone.sha256},
                "family_bytes": man.backbone.size + sum(m.delta.size for m in man.members),
                "members_original_bytes": total_orig, "members": members,
            }
        if as_json:
            emit_json(data)
            return
        out.print(f"family [bold]{target}[/] (format v{man.format_version}, {man.created_by}); "
                  f"backbone {human(man.backbone.size)} sha256 {man.backbone.sha256[:16]}...", highlight=False)
        t = Table("member", "tensors", "original", "delta", "ratio", "worst rel err", "bytes per codec")
        for m in members:
            plan = m["plan"]
            per = ", ".join(f"{k} {human(v['bytes'])}" for k, v in sorted(plan.get("codecs", {}).items(), key=lambda kv: -kv[1]["bytes"]))
            t.add_row(m["name"], str(m["tensors"]), human(m["original_bytes"]), human(m["delta_bytes"]),
                      f"{m['ratio']:.3f}", f"{plan.get('worst_rel_error', 0):.2g}", per)
        out.print(t)
        fam_bytes = data["family_bytes"]
        out.print(f"family {human(fam_bytes)} for members totalling {human(total_orig)} "
                  f"({fam_bytes / total_orig:.3f} of their size, backbone included)" if total_orig else "")

    run(body)


if __name__ == "__main__":  # pragma: no cover
    main()
