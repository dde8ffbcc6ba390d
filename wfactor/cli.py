"""The `wfactor` command line: parse options, call the library, render with rich. No logic lives here.

Exit codes: 0 success; 1 verification failed or a file's digest did not match; 2 bad input or usage; 3 an I/O
failure of the system (disk full, permission denied).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .budget import DEFAULT_MAX_REL_ERROR, Budget
from .errors import FileIOError, InputError, WfactorError, is_allocation_failure
from .render import (
    alignment_line,
    analysis_tables,
    delta_description_table,
    export_peft_lines,
    factor_table,
    family_description_lines,
    human,
    materialize_line,
    out,
    plot_heatmap,
    progress_bar,
)
from .version import __version__

# The command line imports no torch at start-up (``wfactor --help`` and ``wfactor inspect`` need none):
# each command imports the library modules it calls in its own body.

F = TypeVar("F", bound=Callable[..., Any])


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
    except OSError as exc:  # the system failed a read or write (disk full, permissions): exit 3, not "bad input"
        e = FileIOError.of(exc)
        fail(e.code, e.message, e.exit_code)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "torch":
            raise
        fail(
            "dependency",
            "this command rebuilds or factors tensors and needs torch, which is not installed: pip install torch "
            "(inspect and --help work without it)",
            2,
        )
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






@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wfactor")
def main() -> None:
    """Factor families of fine-tuned models into one shared backbone plus small per-model deltas.

    \b
    Exit codes:
      0    success
      1    verification or integrity failure (a damaged family, a wrong backbone, a mismatch)
      2    bad input or usage (message: error[code]: file, tensor, expected vs found, what to do)
      3    an I/O failure of the system (disk full, permission denied, a device error)
      130  interrupted (nothing is left half-written)
    Error codes (the [code] in messages) are listed in spec/FORMAT.md section 10.
    """








workers_option = click.option(
    "--workers",
    type=int,
    default=None,
    metavar="N",
    help="Tensors planned at once, on threads (default: every core). The family's bytes are the same for any N; "
    "memory grows by about 2N tensors being planned.",
)

# options every command takes alike
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress output (errors still go to stderr).")

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
@workers_option
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where tensors are planned: threads of this process, or Ray tasks on a cluster (pip install "
    "'wfactor[ray]'; members, base and output on storage every node sees). The same bytes either way.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="HOST:PORT",
    help="The Ray cluster's head (default: RAY_ADDRESS, else a local Ray instance).",
)
@click.option(
    "--exhaustive-backbone",
    is_flag=True,
    help="Without --base: factor with both backbone candidates (medoid, mean) and keep the smaller family, "
    "instead of estimating both from a sample of tensors and factoring once (twice the work).",
)
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
@click.option(
    "--backbone-dtype",
    type=click.Choice(["keep", "fp8"]),
    default="keep",
    show_default=True,
    help="fp8: store the backbone's float matrices as F8_E4M3 with one scale per row (a quarter of float32's "
    "memory on the serving GPU); members are planned as their change from the base on top of it, so they "
    "carry its fp8 rounding. Not with --lossless or quantised members. A version-4 family.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    metavar="DEVICE",
    help="Plan on this device: cpu, or cuda / cuda:N (SVDs, quantisation searches and error measurements on "
    "the GPU). Bytes are reproducible per device type (same GPU model, torch and CUDA); lossless families are "
    "the same on every device.",
)
@click.option("--force", is_flag=True, help="Replace an existing family directory (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@quiet_option
def factor(
    members: tuple[str, ...],
    base: tuple[str, ...],
    maps: tuple[str, ...],
    names_only: bool,
    workers: int | None,
    executor: str,
    ray_address: str | None,
    exhaustive_backbone: bool,
    output: Path,
    lossless: bool,
    max_rel_error: float,
    target_bytes: int | None,
    target_ratio: float | None,
    max_shard_size: str | None,
    fast_load: bool,
    backbone_dtype: str,
    device: str,
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
            from .factoring import factor as factor_family

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
                workers=workers,
                exhaustive=exhaustive_backbone,
                executor=executor,
                ray_address=ray_address,
                backbone_dtype=backbone_dtype,
                device=device,
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
@quiet_option
def materialize(
    family: Path, name: str, output: Path, force: bool, max_shard_size: str | None, as_json: bool, quiet: bool
) -> None:
    """Rebuild member NAME as DIR/model.safetensors, with its config and tokenizer files.

    \b
    Example:
      wfactor materialize family chat -o rebuilt/chat
      wfactor materialize family chat -o rebuilt/chat --max-shard-size 2GB
    """

    def body() -> None:
        from .family import Family

        bar, update = progress_bar(quiet or as_json)
        with Family(family) as fam, bar:
            done = fam.write_member(name, output, force=force, max_shard_size=max_shard_size, progress=update)
        if as_json:
            emit_json(done.to_json())
        else:
            out.print(materialize_line(done))

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
@quiet_option
def verify(family: Path, against: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Check every file's sha256, every delta's backbone digest, and rebuild every tensor.

    Exits 1 on any mismatch, so a CI step can gate on it.

    \b
    Example:
      wfactor verify family --against chat=ckpt/chat --against code=ckpt/code
    """

    def body() -> int:
        from .family import Family
        from .sources import split_spec

        pairs: dict[str, str] = {}
        for a in against:
            name, path = split_spec(a)
            if name is None:
                raise InputError(f"--against {a}: expected NAME=PATH")
            pairs[name] = path
        bar, update = progress_bar(quiet or as_json)
        with Family(family) as fam, bar:
            sizes = {m.name: {t.name: t.nbytes for t in m.tensors} for m in fam.manifest.members}
            done: dict[str, int] = {}

            def on_tensor(member: str, tensor: str) -> None:
                done[member] = done.get(member, 0) + sizes[member][tensor]
                if update is not None:
                    update(f"verify {member}", done[member], sum(sizes[member].values()))

            rep = fam.verify(pairs, on_tensor=on_tensor)
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
@quiet_option
def inspect(target: Path, as_json: bool, quiet: bool) -> None:
    """Show members, codecs, bytes per codec and savings against the originals.

    \b
    Examples:
      wfactor inspect family
      wfactor inspect family/deltas/chat.safetensors
    """

    def body() -> None:
        from .format.family_dir import FamilyDir, describe_delta

        if target.is_file():
            d = describe_delta(target)
            if as_json:
                emit_json(d.to_json())
            else:
                for item in delta_description_table(d):
                    out.print(item)
            return
        with FamilyDir(target) as fam:
            desc = fam.describe()
        if as_json:
            emit_json(desc.to_json())
            return
        for item in family_description_lines(desc):
            out.print(item, highlight=False)

    run(body)


# -- analyze ---------------------------------------------------------------------------------------------














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
@quiet_option
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
                click.echo(f"wrote {plot_path}", err=True)

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
@quiet_option
def export_peft(
    family: Path, name: str, output: Path, max_rank: int | None, force: bool, as_json: bool, quiet: bool
) -> None:
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
    from .peft_export import export_peft as export

    def body() -> None:
        rep = export(family, name, output, max_rank=max_rank, force=force)
        if as_json:
            emit_json(rep.to_json())
            return
        for item in export_peft_lines(rep, output):
            out.print(item, highlight=False)

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
@workers_option
@lossless_option
@max_rel_error_option
@click.option("--target-bytes", type=int, default=None, hidden=True)
@click.option("--target-ratio", type=float, default=None, hidden=True)
@click.option("--force", is_flag=True, help="Replace a member of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print the member's report as JSON.")
@quiet_option
def add(
    family: Path,
    member: str,
    base: str | None,
    maps: tuple[str, ...],
    workers: int | None,
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
            rep = add_member(
                family, member, budget, force=force, base=base, progress=update, maps=maps, workers=workers
            )
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
@quiet_option
def remove(family: Path, name: str, as_json: bool, quiet: bool) -> None:
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
