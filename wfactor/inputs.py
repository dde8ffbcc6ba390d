"""Turn a user's argument into a model: the registry of input kinds and ``open_source``.

An argument is ``[NAME=]PATH`` or a Hugging Face Hub id ``org/name[@revision]`` (resolved by
:mod:`wfactor.hub`; an existing local path always wins). The kinds, tried in order on a directory:

- a PEFT adapter directory (``adapter_config.json``): the member ``base + adapter`` (:mod:`wfactor.peft`);
- a pipeline directory (diffusers ``model_index.json``, or several component checkpoints): one model whose
  tensors are ``<component>/<name>`` (:mod:`wfactor.pipelines`);
- a model directory: ``model.safetensors``, a sharded ``model.safetensors.index.json``, or exactly one
  ``*.safetensors``;

and a file is a ``.safetensors`` checkpoint. Every kind is a :class:`wfactor.sources.Source`. A new kind is
one entry of :data:`DIRECTORY_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, NotFoundError, NotSafetensorsError
from .hub import parse_hub_id
from .hub import resolve as resolve_hub
from .pipelines import open_pipeline, pipeline_layout
from .sources import (
    ADAPTER_CONFIG,
    INDEX_NAME,
    SINGLE_NAME,
    TOWER_SEP,
    Source,
    TowersSource,
    aux_files,
    clean_member_name,
    default_member_name,
    index_files,
    is_adapter_dir,
    quantization_config,
    split_spec,
)


@dataclass(frozen=True)
class DirectoryKind:
    """One kind of model directory: ``opens(path, name, base, hub_ref)`` returns its Source, or None when
    the directory is not of this kind."""

    name: str
    opens: Callable[[Path, str, str | None, str | None], Source | None]


def _adapter(path: Path, name: str, base: str | None, hub_ref: str | None) -> Source | None:
    if not is_adapter_dir(path):
        return None
    if base is None:
        raise InputError(
            f"{path}: a PEFT adapter ({ADAPTER_CONFIG}); pass --base with its base model so the member is "
            "base + adapter"
        )
    from .peft import open_adapter  # torch: the adapter is merged into its base

    return open_adapter(name, path, open_source(base, name="base"))


def _pipeline(path: Path, name: str, base: str | None, hub_ref: str | None) -> Source | None:
    comps = pipeline_layout(path)  # a diffusers pipeline / several component checkpoints (spec 3.3)
    return None if comps is None else open_pipeline(path, name, comps, hub_ref)


def _model_dir(path: Path, name: str, base: str | None, hub_ref: str | None) -> Source | None:
    index = path / INDEX_NAME
    single = path / SINGLE_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = index_files(index)
    else:
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise InputError(
                f"{path}: {what} .safetensors files; expected {SINGLE_NAME}, {INDEX_NAME} or exactly one "
                "*.safetensors (convert .bin checkpoints with safetensors first)"
            )
        files = found
    q = quantization_config(path)
    if q is not None:  # a quantised checkpoint (wfactor/quantized.py)
        from .quantized import QuantizedSource, check_method  # torch: packed codes are predicted with it

        method, fmt = check_method(q, str(path / "config.json"))
        return QuantizedSource(
            name, path, files, aux_files(path, set(files)), hub=hub_ref, method=method, quant_format=fmt, qconfig=q
        )
    return Source(name, path, files, aux_files(path, set(files)), hub=hub_ref)


DIRECTORY_KINDS: list[DirectoryKind] = [
    DirectoryKind("peft-adapter", _adapter),
    DirectoryKind("pipeline", _pipeline),
    DirectoryKind("model", _model_dir),
]


def open_source(arg: str, name: str | None = None, base: str | None = None) -> Source:
    """Open ``[NAME=]PATH``. Raises a WfactorError with a one-line reason if it is not a usable model.

    A PEFT adapter directory (adapter_config.json) is the model ``base + adapter`` (:mod:`wfactor.peft`);
    it needs ``base``."""
    spec_name, raw = split_spec(arg) if name is None else (name, arg)
    path = Path(raw)
    hub_ref: str | None = None
    if not path.exists():
        hub_id = parse_hub_id(raw)
        if hub_id is None:
            raise NotFoundError(f"{raw}: no such file or directory")
        path, commit = resolve_hub(hub_id)
        hub_ref = f"{hub_id.repo}@{commit}"
        spec_name = spec_name or clean_member_name(hub_id.name)
    member = spec_name or default_member_name(path)
    if path.is_dir():
        for kind in DIRECTORY_KINDS:
            src = kind.opens(path, member, base, hub_ref)
            if src is not None:
                src.origin = ("source", arg, name, base)
                return src
        raise AssertionError("the last directory kind opens every directory")
    try:
        src = Source(member, path, [path], [], hub=hub_ref)
    except NotSafetensorsError:
        raise
    src.origin = ("source", arg, name, base)
    return src


def split_base(arg: str) -> tuple[str | None, str]:
    """``--base NAME=PATH`` -> (NAME, PATH); ``--base PATH`` -> (None, PATH)."""
    return split_spec(arg)


def open_bases(args: str | Sequence[str], name: str | None = "base") -> tuple[Source, dict[str, Any]]:
    """The backbone source of ``--base`` (given once: the base itself, its names as they are; given several
    times as ``NAME=PATH``: every base under its tower namespace ``NAME/``) and its ``backbone_origin``."""
    specs = [args] if isinstance(args, str) else list(args)
    if not specs:
        raise InputError("no base given")
    if len(specs) == 1:  # ``name``: the base's name (None: NAME= of the argument, else its file name)
        _name, raw = split_base(specs[0])
        src = open_source(specs[0]) if name is None else open_source(raw, name=name)
        src.origin = ("bases", tuple(specs), name)
        return src, {"kind": "base", "path": str(src.path)}
    towers: list[tuple[str, Source]] = []
    try:
        for s in specs:
            name, raw = split_base(s)
            if name is None:
                raise InputError(
                    f"--base {s}: with several bases each needs a tower name, --base NAME=PATH "
                    "(e.g. --base text=ckpt/llama --base vision=ckpt/siglip)"
                )
            if any(n == name for n, _ in towers):
                raise InputError(f"--base {s}: tower name {name!r} is used twice")
            towers.append((name, open_source(raw, name=name)))
    except BaseException:
        for _, t in towers:
            t.close()
        raise
    origin = {
        "kind": "bases",
        "bases": [
            {"name": n, "path": str(t.path), "namespace": n + TOWER_SEP, "tensors": len(t.keys()), "bytes": t.nbytes}
            for n, t in towers
        ],
    }
    src = TowersSource("+".join(n for n, _ in towers), Path(specs[0].split("=", 1)[1]).parent, [], towers=towers)
    src.origin = ("bases", tuple(specs), name)
    return src, origin
