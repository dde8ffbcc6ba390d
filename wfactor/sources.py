"""Turn a user's argument into a lazy tensor stream: a .safetensors file, or a model directory holding
model.safetensors, a sharded model.safetensors.index.json, or a single *.safetensors file, or a Hugging Face
Hub id ``org/name[@revision]`` (resolved by :mod:`wfactor.hub`; an existing local path always wins).

Tensors are read one at a time through memory maps (never a whole model in memory), through the same
validating reader that guards family files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, NotFoundError, NotSafetensorsError
from .format.constants import MEMBER_NAME_RE
from .format.safetensors_io import SafetensorsFile, TensorInfo, loads_strict
from .hub import parse_hub_id
from .hub import resolve as resolve_hub
from .tensors import TORCH_DTYPES, from_storage

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
AUX_MAX_BYTES = 64 << 20


def default_member_name(path: Path) -> str:
    stem = path.name if path.is_dir() else path.stem
    if stem == "model" and not path.is_dir():
        stem = path.parent.name
    return clean_member_name(stem)


def clean_member_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-") or "member"
    return name[:128]


def split_spec(arg: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain PATH (even one containing '=') -> (None, PATH)."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
        if MEMBER_NAME_RE.match(name):
            return name, path
        raise InputError(
            f"{arg}: member name {name!r} must be letters, digits, '.', '_' or '-' (at most 128), "
            "starting with a letter or digit"
        )
    return None, arg


@dataclass
class Source:
    """One model: its tensors (lazy), their shards, and the config/tokenizer files beside them."""

    name: str
    path: Path
    files: list[Path]
    aux_files: list[Path] = field(default_factory=list)
    hub: str | None = None  # "org/name@<commit>" when the model came from the Hugging Face Hub

    def __post_init__(self) -> None:
        self._open: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, tuple[Path, TensorInfo]] = {}
        for f in self.files:
            sf = SafetensorsFile(f)
            self._open[f] = sf
            for key, info in sf.tensors.items():
                if key in self._where:
                    raise InputError(
                        f"{f}: tensor {key!r} also appears in {self._where[key][0]}; shards must not overlap"
                    )
                self._where[key] = (f, info)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._where[key][1]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor named {key!r}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor as a private CPU tensor of its stored dtype, over a copy-on-write mapping of the file
        (no copy: its pages stay the page cache's, so streaming a model costs no anonymous memory for it)."""
        f, info = self._where[key]
        return from_storage(self._open[f].mapped(key), info.dtype)

    def raw_bytes(self, key: str) -> bytes:
        """One tensor's stored bytes, exactly as in the source file."""
        f, _info = self._where[key]
        return self._open[f].read_bytes(key)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self._where.values())

    def dtype_of(self, key: str) -> torch.dtype:
        return TORCH_DTYPES[self.info(key).dtype]

    def close(self) -> None:
        for sf in self._open.values():
            sf.close()
        self._open.clear()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _aux_files(folder: Path, exclude: set[Path]) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if p in exclude or not p.is_file() or p.name == INDEX_NAME:
            continue
        if p.suffix in AUX_SUFFIXES and p.stat().st_size <= AUX_MAX_BYTES:
            out.append(p)
    return out


def _index_files(index: Path) -> list[Path]:
    try:
        obj = loads_strict(index.read_text(encoding="utf-8"))
        weight_map = obj["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise InputError(f'{index}: not a safetensors index (expected JSON with a "weight_map" object)') from None
    names = sorted(set(weight_map.values()))
    files = []
    for n in names:
        if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", ".."):
            raise InputError(f"{index}: shard name {n!r} must be a plain file name in the same directory")
        p = index.parent / n
        if not p.is_file():
            raise NotFoundError(f"{index}: shard {n} is missing")
        files.append(p)
    return files


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
    if path.is_dir():
        from .peft import is_adapter_dir, open_adapter

        if is_adapter_dir(path):
            return open_adapter(spec_name or default_member_name(path), path, base)
        from .pipelines import open_pipeline, pipeline_layout

        comps = pipeline_layout(path)  # a diffusers pipeline / several component checkpoints (spec 3.3)
        if comps is not None:
            return open_pipeline(path, spec_name or default_member_name(path), comps, hub_ref)
        index = path / INDEX_NAME
        single = path / SINGLE_NAME
        if single.is_file():
            files = [single]
        elif index.is_file():
            files = _index_files(index)
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                what = "no" if not found else f"{len(found)}"
                raise InputError(
                    f"{path}: {what} .safetensors files; expected {SINGLE_NAME}, {INDEX_NAME} or exactly one "
                    "*.safetensors (convert .bin checkpoints with safetensors first)"
                )
            files = found
        aux = _aux_files(path, set(files))
    else:
        files = [path]
        aux = []
    try:
        src = Source(spec_name or default_member_name(path), path, files, aux, hub=hub_ref)
    except NotSafetensorsError:
        raise
    return src


TOWER_SEP = "/"


@dataclass
class TowersSource(Source):
    """Several bases as one backbone (``--base NAME=PATH``, repeated): tensor ``NAME/<name>`` is tensor
    ``<name>`` of base NAME (spec/FORMAT.md section 2.2). ``towers``: (NAME, its opened Source) in order."""

    towers: list[tuple[str, Source]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._open = {}
        self._where = {}
        self._of: dict[str, tuple[Source, str]] = {}
        for tname, src in self.towers:
            for k in src.keys():
                self._of[f"{tname}{TOWER_SEP}{k}"] = (src, k)

    def keys(self) -> list[str]:
        return sorted(self._of)

    def info(self, key: str) -> TensorInfo:
        if key not in self._of:
            raise NotFoundError(f"{self.path}: no tensor named {key!r}")
        src, k = self._of[key]
        return src.info(k)

    def __contains__(self, key: str) -> bool:
        return key in self._of

    def tensor(self, key: str) -> torch.Tensor:
        src, k = self._of[key]
        return src.tensor(k)

    def raw_bytes(self, key: str) -> bytes:
        src, k = self._of[key]
        return src.raw_bytes(k)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s in self.towers)

    def close(self) -> None:
        for _, s in self.towers:
            s.close()


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
    return src, origin
