"""An opened family directory, without torch: the manifest, the files it names, their checks, the deltas'
records and a description of the family (what `wfactor inspect` shows). :class:`wfactor.family.Family`
builds on it to rebuild tensors.

Integrity is checked in layers: opening checks the manifest, every file's size and, for a sharded
backbone, the shard list (small); :meth:`FamilyDir.verify_backbone` hashes the backbone files once per
opened family (stamps may vouch for unchanged files, spec 9); a delta's SHA-256 is checked on the very
open file it is then parsed and read from (:meth:`FamilyDir.open_delta`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, IntegrityError, NotFoundError
from .components import component_of
from .constants import LOW_PRECISION_DTYPES, LOW_PRECISION_FORMAT_VERSION, META_KIND, META_VERSION
from .delta import DeltaFile, check_version
from .manifest import FileRef, Manifest, MemberEntry, read_manifest, shard_list_bytes
from .safetensors_io import SafetensorsFile
from .stamps import file_matches


class FamilyDir:
    """The files of a family directory, opened and checked (no tensor data is read)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self._backbone_path = self.manifest.backbone.check_size(self.root)
        for m in self.manifest.members:  # sizes only: a stat per file, no data read (spec 9)
            m.delta.check_size(self.root)
            for ref in m.aux_files:
                ref.check_size(self.root)
        # the backbone's files: one, or the shards of a sharded backbone (spec 2.1), whose list is checked
        # now (it is small): its digest is the backbone's, and it pins every shard's digest
        self._bb_refs = self.manifest.backbone_shards or [self.manifest.backbone]
        if self.manifest.backbone_shards:
            self.manifest.backbone.check_digest(self.root)
            if self._backbone_path.read_bytes() != shard_list_bytes(self.manifest.backbone_shards):
                raise IntegrityError(
                    f"{self._backbone_path}: the shard list differs from the manifest's backbone_shards; "
                    "the family is damaged"
                )
        self._bb_files: list[SafetensorsFile] = []
        self._bb_of: dict[str, SafetensorsFile] = {}
        try:
            for ref in self._bb_refs:
                f = SafetensorsFile(ref.check_size(self.root))
                self._bb_files.append(f)
                if f.metadata.get(META_KIND) not in (None, "backbone"):
                    raise FormatError(f"{f.path}: not a wfactor backbone (wfactor.kind is not 'backbone')")
                if META_VERSION in f.metadata:
                    check_version(f.metadata[META_VERSION], str(f.path))
                for k in f.tensors:
                    if k in self._bb_of:
                        raise FormatError(f"{f.path}: tensor {k!r} is also in {self._bb_of[k].path}")
                    self._bb_of[k] = f
        except BaseException:
            for f in self._bb_files:
                f.close()
            raise
        if self.manifest.format_version < LOW_PRECISION_FORMAT_VERSION:
            low = next((k for k, f in self._bb_of.items() if f.tensors[k].dtype in LOW_PRECISION_DTYPES), None)
            if low is not None:
                self.close()
                raise FormatError(
                    f"{self._bb_of[low].path}: tensor {low!r} is {self._bb_of[low].tensors[low].dtype}, which needs "
                    f"format_version {LOW_PRECISION_FORMAT_VERSION}; the manifest says {self.manifest.format_version}"
                )
        self.backbone_verified = False  # set by verify_backbone, or by a loader that hashed what it read
        self.base_shapes: dict[str, tuple[tuple[int, ...], str]] = {
            k: (f.tensors[k].shape, f.tensors[k].dtype) for k, f in self._bb_of.items()
        }

    # -- files -------------------------------------------------------------------------------------------
    @property
    def backbone_files(self) -> list[Path]:
        """The backbone's safetensors files: one, or its shards in order (spec 2.1). Their digests are checked
        by :meth:`verify_backbone`, not here."""
        return [f.path for f in self._bb_files]

    @property
    def backbone_parts(self) -> list[tuple[FileRef, SafetensorsFile]]:
        """(FileRef, opened file) of each backbone file: one, or every shard in order."""
        return list(zip(self._bb_refs, self._bb_files))

    def backbone_file_of(self, tensor: str) -> SafetensorsFile:
        """The opened backbone file that holds ``tensor``."""
        try:
            return self._bb_of[tensor]
        except KeyError:
            raise NotFoundError(f"{self.root}: the backbone has no tensor {tensor!r}") from None

    def verify_backbone(self, full: bool = False) -> None:
        """Every backbone file's SHA-256, once per opened family (``full``: hashed again, stamps ignored)."""
        if full or not self.backbone_verified:
            if full and self.manifest.backbone_shards:  # the shard list too
                self.manifest.backbone.check_digest(self.root, use_stamps=False)
            for ref, f in zip(self._bb_refs, self._bb_files):
                got = file_matches(f.path, ref.sha256, use_stamps=not full)
                if got != ref.sha256:
                    raise IntegrityError(
                        f"{f.path}: sha256 {got[:16]}..., the manifest records "
                        f"{ref.sha256[:16]}...; the backbone was modified or replaced"
                    )
            self.backbone_verified = True

    # -- members -----------------------------------------------------------------------------------------
    @property
    def members(self) -> list[str]:
        return [m.name for m in self.manifest.members]

    def member(self, name: str) -> MemberEntry:
        return self.manifest.member(name)

    def components(self, name: str) -> list[str]:
        """The component names of a pipeline member (``unet``, ``text_encoder``, ...); [] for a plain model."""
        return [c.name for c in self.member(name).components]

    def component_prefix(self, name: str, component: str | None) -> str:
        """The tensor-name prefix of ``component`` of member ``name`` (``"unet/"``), "" for None; refuses a
        component the member does not have."""
        if component is None:
            return ""
        return component_of(self.member(name), component, str(self.root))

    def open_delta(self, name: str, use_stamps: bool = True) -> DeltaFile:
        """The member's delta, its sha256 checked (see ``stamps``) on the very open file it is then parsed and
        read from, and its backbone digest matched to this family's backbone."""
        entry = self.member(name)
        path, fh = entry.delta.open_checked(self.root, use_stamps)
        delta = DeltaFile(path, self.base_shapes, self.manifest.backbone.sha256, fh)
        if delta.version > self.manifest.format_version:
            delta.close()
            raise FormatError(
                f"{path}: a version-{delta.version} delta in a version-{self.manifest.format_version} family; "
                "a family's format_version is at least that of each of its files (spec 8)"
            )
        listed = {t.name: (t.shape, t.dtype) for t in entry.tensors}
        recorded = {r.name: (r.shape, r.dtype) for r in delta.records.values()}
        if listed != recorded:
            delta.close()
            diff = sorted(set(listed.items()) ^ set(recorded.items()))[0][0]
            raise FormatError(
                f"{path}: the records and the manifest's tensor list of {name!r} disagree (first: {diff!r})"
            )
        return delta

    def describe(self) -> FamilyDescription:
        """What `wfactor inspect FAMILY` shows, as data: the backbone, and per member its sizes and plan."""
        man = self.manifest
        members = [
            MemberDescription(
                m.name, len(m.tensors), m.original_bytes, m.delta.size, dict(m.source), dict(m.plan)
            )
            for m in man.members
        ]
        return FamilyDescription(
            str(self.root),
            man.format_version,
            man.created_by,
            man.backbone.path,
            man.backbone_bytes,
            man.backbone.sha256,
            [r.path for r in man.backbone_shards],
            members,
        )

    def close(self) -> None:
        for f in self._bb_files:
            f.close()

    def __enter__(self) -> FamilyDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class MemberDescription:
    name: str
    tensors: int
    original_bytes: int
    delta_bytes: int
    source: dict[str, Any]
    plan: dict[str, Any]

    @property
    def ratio(self) -> float:
        return self.delta_bytes / self.original_bytes if self.original_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": self.tensors,
            "original_bytes": self.original_bytes,
            "delta_bytes": self.delta_bytes,
            "ratio": round(self.ratio, 6) if self.original_bytes else 0,
            "source": self.source,
            "plan": self.plan,
        }


@dataclass
class FamilyDescription:
    family: str
    format_version: int
    created_by: str
    backbone_path: str
    backbone_bytes: int
    backbone_sha256: str
    backbone_shards: list[str]
    members: list[MemberDescription] = field(default_factory=list)

    @property
    def family_bytes(self) -> int:
        return self.backbone_bytes + sum(m.delta_bytes for m in self.members)

    @property
    def members_original_bytes(self) -> int:
        return sum(m.original_bytes for m in self.members)

    def to_json(self) -> dict[str, Any]:
        backbone: dict[str, Any] = {
            "path": self.backbone_path,
            "bytes": self.backbone_bytes,
            "sha256": self.backbone_sha256,
        }
        if self.backbone_shards:
            backbone["shards"] = list(self.backbone_shards)
        return {
            "family": self.family,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "backbone": backbone,
            "family_bytes": self.family_bytes,
            "members_original_bytes": self.members_original_bytes,
            "members": [m.to_json() for m in self.members],
        }


@dataclass
class DeltaDescription:
    """What `wfactor inspect DELTA_FILE` shows: a delta on its own, structure checked, no backbone needed."""

    delta: str
    member: str
    backbone_sha256: str
    tensors: int
    nbytes: int
    codecs: dict[str, dict[str, int]]

    def to_json(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "member": self.member,
            "backbone_sha256": self.backbone_sha256,
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "codecs": self.codecs,
        }


def describe_delta(path: str | os.PathLike[str]) -> DeltaDescription:
    """Open a delta file on its own (``inspect FILE``): structure checks only, no backbone needed."""
    p = Path(path)
    with SafetensorsFile(p) as f:
        if f.metadata.get(META_KIND) != "delta":
            raise NotFoundError(f"{p}: neither a wfactor family directory nor a delta file")
    with DeltaFile(p, None, None) as d:
        codecs: dict[str, dict[str, int]] = {}
        for rec in d.records.values():
            c = codecs.setdefault(rec.codec, {"tensors": 0, "bytes": 0})
            c["tensors"] += 1
            c["bytes"] += sum(d.file.tensors[s.key].nbytes for s in rec.part_specs())
        return DeltaDescription(
            str(p), d.member, d.backbone_sha256, len(d.records), d.file.size, dict(sorted(codecs.items()))
        )
