"""Opening a delta file: its metadata, version, backbone digest and records (spec/FORMAT.md section 4)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

from ..errors import BackboneMismatchError, CodecError, FormatError, LimitError, VersionError
from .constants import (
    FLOAT_DTYPES,
    LOW_PRECISION_FORMAT_VERSION,
    MAX_FORMAT_VERSION,
    MAX_TENSORS,
    META_BACKBONE,
    META_KIND,
    META_MEMBER,
    META_RECORDS,
    META_VERSION,
    PLANES_FORMAT_VERSION,
    REQUANT_FORMAT_VERSION,
    SHA256_RE,
)
from .records import Record, record_from_json, record_version
from .safetensors_io import SafetensorsFile, loads_strict


def check_version(ver: str | None, where: str) -> None:
    """A safetensors ``wfactor.format_version``: a positive decimal integer no newer than ours (spec 8)."""
    if ver is None or not re.fullmatch(r"[1-9][0-9]{0,8}", ver):
        raise FormatError(f"{where}: {META_VERSION} must be a positive decimal integer, found {ver!r}")
    if int(ver) > MAX_FORMAT_VERSION:
        raise VersionError(f"{where}: file is v{int(ver)}; this reader supports up to v{MAX_FORMAT_VERSION}")


def check_requant_refs(rec: Record, records: dict[str, Record], where: str) -> None:
    """A requant term's ``scales`` (and ``groups``) name other records of the delta (spec 4.2): floating-point
    scales and integer groups, neither with a requant term itself (nor same_as one)."""
    if not rec.terms or rec.terms[0].codec != "requant":
        return
    params = rec.terms[0].params
    for key, kinds, text in (("scales", FLOAT_DTYPES, "floating-point"), ("groups", ("I32", "I64"), "I32 or I64")):
        name = params.get(key)
        if name is None:
            continue
        other = records.get(name)
        if other is not None and other.same_as is not None:
            other = records.get(other.same_as)
        if other is None or other.name == rec.name or other.dtype not in kinds or (
            other.terms and other.terms[0].codec == "requant"
        ):
            raise CodecError(
                f"{where}: tensor {rec.name!r}: requant {key} {name!r} must be another {text} record of this delta "
                "without a requant term"
            )


class DeltaFile:
    """A validated delta file. ``records`` is in file order; every part key it names exists."""

    def __init__(
        self,
        path: Path,
        base_shapes: dict[str, tuple[tuple[int, ...], str]] | None,
        backbone_sha256: str | None,
        opened: BinaryIO | None = None,
    ):
        """``opened``: the file already open (and checked) at offset 0, owned from here on."""
        self.file = SafetensorsFile(path, opened)
        try:
            self._parse(base_shapes, backbone_sha256)
        except BaseException:
            self.file.close()
            raise

    def _parse(self, base_shapes: dict[str, tuple[tuple[int, ...], str]] | None, backbone_sha256: str | None) -> None:
        meta = self.file.metadata
        where = str(self.file.path)
        if meta.get(META_KIND) != "delta":
            raise FormatError(
                f"{where}: not a wfactor delta ({META_KIND} is {meta.get(META_KIND)!r}, expected 'delta')"
            )
        check_version(meta.get(META_VERSION), where)
        self.version = int(str(meta.get(META_VERSION)))
        digest = meta.get(META_BACKBONE, "")
        if not SHA256_RE.match(digest):
            raise FormatError(f"{where}: {META_BACKBONE} must be 64 lowercase hex digits")
        if backbone_sha256 is not None and digest != backbone_sha256:
            raise BackboneMismatchError(
                f"{where}: this delta was written for backbone sha256 {digest[:16]}..., "
                f"but the backbone is {backbone_sha256[:16]}...; refusing to rebuild against another backbone"
            )
        self.backbone_sha256 = digest
        self.member = meta.get(META_MEMBER, "")
        try:
            raw = loads_strict(meta.get(META_RECORDS, ""))
        except ValueError as exc:
            raise FormatError(f"{where}: {META_RECORDS} is not valid JSON ({exc})") from None
        if not isinstance(raw, list):
            raise FormatError(f"{where}: {META_RECORDS} must be a JSON list of records")
        if len(raw) > MAX_TENSORS:
            raise LimitError(f"{where}: {len(raw)} records (limit {MAX_TENSORS})")
        records: dict[str, Record] = {}
        used: set[str] = set()
        for obj in raw:
            rec = record_from_json(obj, base_shapes, where)
            if rec.name in records:
                raise FormatError(f"{where}: tensor {rec.name!r} has two records")
            if rec.same_as is not None:
                tied = records.get(rec.same_as)
                if tied is None or tied.same_as is not None or (tied.shape, tied.dtype) != (rec.shape, rec.dtype):
                    raise FormatError(
                        f"{where}: tensor {rec.name!r} is same_as {rec.same_as!r}, which must be an earlier record "
                        "of the same shape and dtype that is not itself same_as"
                    )
            if self.version < REQUANT_FORMAT_VERSION and record_version(rec) >= REQUANT_FORMAT_VERSION:
                raise FormatError(
                    f"{where}: tensor {rec.name!r} has a requant term, which needs {META_VERSION} "
                    f"{REQUANT_FORMAT_VERSION}; the file says {self.version}"
                )
            if self.version < LOW_PRECISION_FORMAT_VERSION and record_version(rec) >= LOW_PRECISION_FORMAT_VERSION:
                raise FormatError(
                    f"{where}: tensor {rec.name!r} is {rec.dtype} or has a rescale term, which needs {META_VERSION} "
                    f"{LOW_PRECISION_FORMAT_VERSION}; the file says {self.version}"
                )
            for spec in rec.part_specs():
                if spec.encoding == "bitplanes" and self.version < PLANES_FORMAT_VERSION:
                    raise FormatError(
                        f"{where}: part {spec.key!r} is bitplanes, which needs {META_VERSION} "
                        f"{PLANES_FORMAT_VERSION}; the file says {self.version}"
                    )
                if spec.key not in self.file.tensors:
                    raise FormatError(f"{where}: tensor {rec.name!r} names part {spec.key!r}, which is not in the file")
                if spec.key in used:  # spec 4.1: no two parts of one file share a key
                    raise CodecError(f"{where}: part {spec.key!r} is used by two records")
                used.add(spec.key)
            records[rec.name] = rec
        for rec in records.values():
            check_requant_refs(rec, records, where)
        stray = sorted(set(self.file.tensors) - used)
        if stray:
            raise FormatError(f"{where}: tensor {stray[0]!r} is not a part of any record ({len(stray)} such)")
        self.records = records

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DeltaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
