"""Whole pipelines as members: a directory of several component checkpoints (spec/FORMAT.md section 3.3).

A pipeline directory is
- a diffusers layout: ``model_index.json`` naming components, each a subfolder holding
  ``diffusion_pytorch_model.safetensors`` or ``model.safetensors`` (or a sharded ``*.safetensors.index.json``);
- a directory of two or more subfolders that each hold such weights (no ``model_index.json``);
- a directory of two or more non-shard ``*.safetensors`` files (each file is a component named by its stem).

It opens as one :class:`PipelineSource` whose tensor names are ``<component>/<tensor name>``, so the
factor pipeline sees one model: components identical across members cost nothing (records with no terms),
drifting ones are delta-coded against the backbone's component of the same name. The component -> file
mapping is recorded in the member's manifest entry (``components``) and ``materialize`` writes the same
layout back; config, scheduler and tokenizer files keep their relative paths (``aux/<member>/<rel path>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .format.components import COMPONENT_RE, SEP, Component
from .format.safetensors_io import loads_strict
from .sources import AUX_MAX_BYTES, AUX_SUFFIXES, Source

MODEL_INDEX = "model_index.json"
# weight file names tried in a component folder, in order (diffusers models, then transformers models)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


# -- input side --------------------------------------------------------------------------------------------
@dataclass
class PipelineSource(Source):
    """A pipeline directory as one model: tensor ``<component>/<name>`` is tensor ``<name>`` of the
    component's checkpoint. ``aux_files`` are all config/tokenizer/scheduler files, with paths relative to
    ``path`` kept (:meth:`aux_relpath`)."""

    components: list[Component] = field(default_factory=list)

    def layout(self) -> list[tuple[str, list[Path]]]:
        return [(f"{comp.name}{SEP}", list(comp.files)) for comp in self.components]

    def __post_init__(self) -> None:
        super().__post_init__()
        for comp in self.components:
            comp.tensors = sum(1 for k in self.keys() if k.startswith(comp.name + SEP))

    def aux_relpath(self, p: Path) -> str:
        return p.relative_to(self.path).as_posix()


def _weights_in(folder: Path) -> tuple[str, list[Path]] | None:
    """(weights file name to write back, source files) of one component folder, or None without weights."""
    from .sources import index_files

    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return name, [folder / name]
        index = folder / (name + ".index.json")
        if index.is_file():
            return name, index_files(index)
    found = [p for p in sorted(folder.glob("*.safetensors")) if p.is_file()]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0].name[: -len(".index.json")], index_files(indexes[0])
    if len(found) == 1:
        return found[0].name, found
    if found:
        raise InputError(
            f"{folder}: {len(found)} .safetensors files and none named {' or '.join(WEIGHT_NAMES)}; keep one "
            "weights file per component (variants such as *.fp16.safetensors: pass a copy without them)"
        )
    return None


def _index_components(path: Path) -> list[str]:
    try:
        obj = loads_strict((path / MODEL_INDEX).read_text(encoding="utf-8"))
        assert isinstance(obj, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise InputError(f"{path / MODEL_INDEX}: not a diffusers model index (expected a JSON object)") from None
    names = []
    for k, v in obj.items():
        if k.startswith("_") or not isinstance(v, list) or len(v) != 2 or v[0] is None:
            continue
        if (path / k).is_dir():
            names.append(k)
    return sorted(names)


def pipeline_layout(path: Path) -> list[Component] | None:
    """The components of a pipeline directory, or None when ``path`` is not one (a plain model directory)."""
    if not path.is_dir():
        return None
    comps: list[Component] = []
    if (path / MODEL_INDEX).is_file():
        for name in _index_components(path):
            w = _weights_in(path / name)
            if w is not None:
                comps.append(Component(name, f"{name}/{w[0]}", files=w[1]))
        if not comps:
            raise InputError(f"{path}: {MODEL_INDEX} names no component folder holding .safetensors weights")
        return comps
    top = [p for p in sorted(path.glob("*.safetensors")) if p.is_file()]
    if top:
        if len(top) < 2 or (path / "model.safetensors").is_file() or any(path.glob("*.safetensors.index.json")):
            return None
        shards = [p.name for p in top if SHARD_RE.search(p.name)]
        if shards:
            raise InputError(
                f"{path}: {shards[0]} looks like a shard but there is no *.safetensors.index.json beside it"
            )
        for p in top:
            if not COMPONENT_RE.match(p.stem):
                raise InputError(f"{p}: component name {p.stem!r} must match {COMPONENT_RE.pattern}")
        return [Component(p.stem, p.name, files=[p]) for p in top]
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        w = _weights_in(sub)
        if w is not None and COMPONENT_RE.match(sub.name):
            comps.append(Component(sub.name, f"{sub.name}/{w[0]}", files=w[1]))
    return comps if len(comps) >= 2 else None


def _aux(path: Path, weights: set[Path]) -> list[Path]:
    """Config/tokenizer/scheduler files of the pipeline: top level and one folder down."""
    out: list[Path] = []
    folders = [path] + sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p in weights or p.name.endswith(".safetensors.index.json"):
                continue
            if p.suffix in AUX_SUFFIXES and p.stat().st_size <= AUX_MAX_BYTES:
                out.append(p)
    return out


def open_pipeline(path: Path, name: str, comps: list[Component], hub: str | None = None) -> PipelineSource:
    files = [f for c in comps for f in c.files]
    return PipelineSource(name, path, files, _aux(path, set(files)), hub=hub, components=comps)


# -- helpers for the writer and the reader -----------------------------------------------------------------
def member_components(src: Source) -> list[Component]:
    return list(src.components) if isinstance(src, PipelineSource) else []


def aux_relpath(src: Source, p: Path) -> str:
    return src.aux_relpath(p) if isinstance(src, PipelineSource) else p.name
