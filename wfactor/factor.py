"""The write pipeline: sources -> per-tensor plan -> encode -> backbone + delta writers -> manifest.

Streaming: one member tensor and its backbone tensor are in memory at a time. Crash safety: everything is
written into a temporary directory beside the output, which is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError
from .format.constants import (
    AUX_DIR,
    BACKBONE_NAME,
    DELTAS_DIR,
    FORMAT_VERSION,
    META_BACKBONE,
    META_KIND,
    META_MEMBER,
    META_RECORDS,
    META_VERSION,
)
from .format.manifest import FileRef, Manifest, MemberEntry, TensorMeta, check_member_name, sha256_file
from .format.records import Record
from .format.safetensors_io import Entry, SpoolWriter, write_streaming
from .plan import Budget, plan_tensor
from .sources import Source, open_source

Progress = Callable[[str, int, int], None]  # (stage label, bytes done, bytes total)


@dataclass
class CodecStat:
    tensors: int = 0
    bytes: int = 0


@dataclass
class MemberReport:
    name: str
    original_bytes: int
    delta_bytes: int
    worst_rel_error: float
    worst_tensor: str
    worst_rel_drift: float = 0.0
    codecs: dict[str, CodecStat] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.delta_bytes / self.original_bytes if self.original_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "original_bytes": self.original_bytes,
            "delta_bytes": self.delta_bytes,
            "ratio": round(self.ratio, 6),
            "worst_rel_error": self.worst_rel_error,
            "worst_tensor": self.worst_tensor,
            "worst_rel_drift": self.worst_rel_drift,
            "codecs": {k: {"tensors": v.tensors, "bytes": v.bytes} for k, v in sorted(self.codecs.items())},
        }


@dataclass
class FactorReport:
    path: Path
    backbone_bytes: int
    base_bytes: int
    members: list[MemberReport]
    budget: Budget

    @property
    def family_bytes(self) -> int:
        return self.backbone_bytes + sum(m.delta_bytes for m in self.members)

    @property
    def original_bytes(self) -> int:
        """The models side by side: the base plus every member's original checkpoint."""
        return self.base_bytes + sum(m.original_bytes for m in self.members)

    def to_json(self) -> dict[str, Any]:
        return {
            "family": str(self.path),
            "budget": {"lossless": self.budget.lossless, "max_rel_error": self.budget.max_rel_error},
            "backbone_bytes": self.backbone_bytes,
            "family_bytes": self.family_bytes,
            "original_bytes": self.original_bytes,
            "ratio": round(self.family_bytes / self.original_bytes, 6) if self.original_bytes else 0.0,
            "members": [m.to_json() for m in self.members],
        }


def _summarise(name: str, original: int, records: list[Record], sizes: dict[str, int], delta_bytes: int) -> MemberReport:
    rep = MemberReport(name, original, delta_bytes, 0.0, "")
    for rec in records:
        st = rep.codecs.setdefault(rec.codec, CodecStat())
        st.tensors += 1
        st.bytes += sum(sizes[p.key] for p in rec.part_specs())
        err = rec.error.get("rel_l2", 0.0)
        if not math.isfinite(err):
            continue
        if err > rep.worst_rel_error or not rep.worst_tensor:
            rep.worst_rel_error, rep.worst_tensor = err, rec.name
        rep.worst_rel_drift = max(rep.worst_rel_drift, rec.error.get("rel_drift", 0.0))
    return rep


def write_backbone(base: Source, path: Path, progress: Progress | None = None) -> None:
    entries = [Entry(k, base.info(k).dtype, base.info(k).shape) for k in base.keys()]
    total = sum(e.nbytes for e in entries)
    done = 0

    def produce(e: Entry) -> bytes:
        return base.raw_bytes(e.name)

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("backbone", done, total)

    meta = {META_KIND: "backbone", META_VERSION: str(FORMAT_VERSION)}
    write_streaming(path, entries, produce, meta, tick)


def write_delta(
    member: Source, base: Source, backbone_sha: str, path: Path, budget: Budget, progress: Progress | None = None
) -> tuple[list[Record], dict[str, int]]:
    """Plan and encode every tensor of ``member`` against ``base``; returns the records and part sizes."""
    spool = SpoolWriter(path)
    records: list[Record] = []
    sizes: dict[str, int] = {}
    total, done = member.nbytes, 0
    try:
        for key in member.keys():
            target = member.tensor(key)
            base_t = base.tensor(key) if key in base else None
            planned = plan_tensor(key, target, key if base_t is not None else None, base_t, budget)
            for spec in planned.record.part_specs():
                arr = planned.stored[spec.key]
                # compressed parts are stored as one 1-D U8 tensor holding the zstd frame (spec 4.3)
                spool.add(spec.key, spec.dtype if spec.encoding == "raw" else "U8", arr.shape, arr.tobytes())
                sizes[spec.key] = int(arr.nbytes)
            records.append(planned.record)
            done += member.info(key).nbytes
            if progress:
                progress(member.name, done, total)
        meta = {
            META_KIND: "delta",
            META_VERSION: str(FORMAT_VERSION),
            META_MEMBER: member.name,
            META_BACKBONE: backbone_sha,
            META_RECORDS: _records_json(records),
        }
        spool.finish(meta)
    except BaseException:
        spool.abort()
        raise
    return records, sizes


def _records_json(records: list[Record]) -> str:
    return json.dumps([r.to_json() for r in records], separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _copy_aux(src: Source, root: Path, name: str) -> list[FileRef]:
    refs = []
    if src.aux_files:
        (root / AUX_DIR / name).mkdir(parents=True, exist_ok=True)
    for p in src.aux_files:
        rel = f"{AUX_DIR}/{name}/{p.name}"
        shutil.copyfile(p, root / rel)
        refs.append(FileRef.of(root, rel))
    return refs


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def factor(
    members: Sequence[str],
    base: str,
    out: str | os.PathLike[str],
    budget: Budget | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> FactorReport:
    """Factor ``members`` (each ``[NAME=]PATH``) against ``base`` into a family directory ``out``.

    The base becomes the backbone. Returns what was written, per member: bytes, ratio, worst error, codecs.
    """
    budget = budget or Budget()
    if not budget.lossless and not budget.max_rel_error > 0:
        raise InputError(f"--max-rel-error must be > 0, found {budget.max_rel_error}; use --lossless for exact")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists; choose another -o or pass --force to replace it")
    if not members:
        raise InputError("no members given: pass at least one [NAME=]PATH")
    base_src = open_source(base, name="base")
    sources: list[Source] = []
    try:
        for arg in members:
            src = open_source(arg)
            check_member_name(src.name, arg)
            if any(s.name == src.name for s in sources):
                raise InputError(f"{arg}: member name {src.name!r} is used twice; name members with NAME=PATH")
            sources.append(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DELTAS_DIR).mkdir(parents=True)
        try:
            write_backbone(base_src, tmp / BACKBONE_NAME, progress)
            backbone = FileRef.of(tmp, BACKBONE_NAME)
            entries: list[MemberEntry] = []
            reports: list[MemberReport] = []
            for src in sources:
                rel = f"{DELTAS_DIR}/{src.name}.safetensors"
                records, sizes = write_delta(src, base_src, backbone.sha256, tmp / rel, budget, progress)
                delta = FileRef.of(tmp, rel)
                rep = _summarise(src.name, src.nbytes, records, sizes, delta.size)
                plan = rep.to_json()
                plan.pop("name")
                plan["budget"] = {"lossless": budget.lossless, "max_rel_error": budget.max_rel_error}
                entries.append(
                    MemberEntry(
                        name=src.name,
                        delta=delta,
                        tensors=[TensorMeta(k, src.info(k).shape, src.info(k).dtype) for k in src.keys()],
                        original_bytes=src.nbytes,
                        source={"path": str(src.path), "files": [p.name for p in src.files]},
                        aux_files=_copy_aux(src, tmp, src.name),
                        plan=plan,
                    )
                )
                reports.append(rep)
            manifest = Manifest(backbone, entries, created_by=f"wfactor {__version__}")
            manifest.write_atomic(tmp)
            _fsync_dir(tmp)
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
            _fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return FactorReport(out, backbone.size, base_src.nbytes, reports, budget)
    finally:
        base_src.close()
        for s in sources:
            s.close()
