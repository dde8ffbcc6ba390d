"""Writing a member back as checkpoint files: the one writer behind ``Family.materialize`` for plain models
(``model.safetensors``, or shards + index) and for pipelines (each component's weights file in its folder,
spec/FORMAT.md section 3.3), with the member's config files.

Tensors are rebuilt one at a time and streamed into the files. Every file is written under a temporary name
and all are renamed into place together when the last is complete (:func:`wfactor.format.atomic.
staged_files`): a failure leaves nothing half-written. Weights files of an earlier materialisation into the
same directory that the new one does not rewrite (another sharding) are removed, so they cannot shadow it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from .format.atomic import staged_files
from .format.components import SEP
from .format.safetensors_io import Entry, write_streaming
from .format.shards import write_sharded
from .tensors import storage_view

if TYPE_CHECKING:
    from .family import Family

WEIGHTS_METADATA = {"format": "pt"}


@dataclass
class Materialized:
    """What :meth:`wfactor.family.Family.write_member` wrote: ``target`` (the weights file, the shard index,
    or for a pipeline the output directory), every file written (weights and config), and the weights' bytes."""

    member: str
    out: Path
    target: Path
    files: list[Path] = field(default_factory=list)
    weights_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "member": self.member,
            "output": str(self.out),
            "files": sorted(p.relative_to(self.out).as_posix() for p in self.files),
            "bytes": self.weights_bytes,
        }


def aux_destination(path: str, has_components: bool) -> str:
    """Where a materialised member's aux file goes, relative to the output directory: for a pipeline member,
    its path without the first two segments (``aux/<member>/unet/config.json`` -> ``unet/config.json``,
    spec 3.3); for any other member, its file name."""
    parts = path.split("/")
    if has_components and len(parts) > 2:
        return "/".join(parts[2:])
    return PurePosixPath(path).name


def write_member(
    family: Family,
    name: str,
    out: Path,
    max_bytes: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Materialized:
    """Write member ``name`` of ``family`` into the (existing) directory ``out``; see the module docstring."""
    entry = family.member(name)
    pipeline = bool(entry.components)
    # (tensor-name prefix stripped in the file, the weights file): one for a model, one per component
    groups = (
        [(c.name + SEP, out / c.file) for c in entry.components] if pipeline else [("", out / "model.safetensors")]
    )
    total, done = sum(t.nbytes for t in entry.tensors), 0
    with staged_files() as tmp_files:  # renamed into place together, or all deleted on error
        with family.open_delta(name) as delta:
            for prefix, target in groups:
                metas = [t for t in entry.tensors if t.name.startswith(prefix)]
                entries = [Entry(t.name[len(prefix) :], t.dtype, t.shape) for t in metas]
                target.parent.mkdir(parents=True, exist_ok=True)

                def produce(e: Entry, prefix: str = prefix) -> bytes | memoryview:
                    nonlocal done
                    rec = delta.records[prefix + e.name]
                    # the rebuilt tensor's own bytes, no copy (ours, or the backbone's read-only mapping)
                    data = storage_view(family.rebuild(delta, rec, "cpu")).reshape(-1).view(np.uint8).data
                    done += e.nbytes
                    if progress is not None:
                        progress(name, done, total)
                    return data

                if max_bytes is None:
                    tmp = target.parent / f".{target.name}.tmp"
                    tmp_files.append((tmp, target))
                    write_streaming(tmp, entries, produce, WEIGHTS_METADATA)
                else:
                    stem = target.name[: -len(".safetensors")]
                    tmp_files += write_sharded(target.parent, stem, entries, produce, WEIGHTS_METADATA, max_bytes)
        weights = [dst for _, dst in tmp_files]
        for ref in entry.aux_files:
            src = ref.check_digest(family.root)
            dst = out / aux_destination(ref.path, pipeline)
            dst.parent.mkdir(parents=True, exist_ok=True)
            t = dst.parent / f".{dst.name}.tmp"
            tmp_files.append((t, dst))
            shutil.copyfile(src, t)
    written = {dst for _, dst in tmp_files}
    for _prefix, target in groups:  # an earlier materialisation's weights in another sharding
        stem = target.name[: -len(".safetensors")]
        for p in target.parent.glob(f"{stem}*.safetensors*"):
            pattern = re.escape(stem) + r"(-\d{5}-of-\d{5}\.safetensors|\.safetensors\.index\.json)"
            sharded = re.fullmatch(pattern, p.name)
            if (p.name == target.name or sharded) and p not in written and p.is_file():
                p.unlink()
    target = out if pipeline else weights[-1]
    nbytes = sum(p.stat().st_size for p in weights if p.name.endswith(".safetensors"))
    return Materialized(name, out, target, sorted(written), nbytes)
