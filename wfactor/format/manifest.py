"""The family manifest, wfactor.json (spec/FORMAT.md section 3)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import FormatError, IntegrityError, LimitError, NotFoundError, VersionError
from .constants import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_MEMBERS,
    MAX_TENSORS,
    MEMBER_NAME_RE,
    SHA256_RE,
)
from .safetensors_io import check_name, check_shape, loads_strict


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_relpath(p: Any, where: str) -> str:
    """Manifest paths are relative POSIX paths inside the family: no absolute paths, no '..', no '\\'."""
    if not isinstance(p, str) or not p or "\\" in p or "\x00" in p:
        raise FormatError(f"{where}: path must be a non-empty relative POSIX path, found {p!r}")
    pp = PurePosixPath(p)
    if pp.is_absolute() or any(part in ("..", ".", "") for part in p.split("/")):
        raise FormatError(f"{where}: path {p!r} must stay inside the family directory")
    return p


def resolve_inside(root: Path, rel: str, where: str) -> Path:
    """Join and refuse anything (a symlink included) that leads out of the family directory."""
    full = (root / rel).resolve()
    if not full.is_relative_to(root.resolve()):
        raise FormatError(f"{where}: {rel!r} leads outside the family directory {root}")
    return full


@dataclass
class FileRef:
    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> FileRef:
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: expected an object with path, sha256, size")
        path = check_relpath(obj.get("path"), where)
        sha = obj.get("sha256")
        size = obj.get("size")
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise FormatError(f"{where}: sha256 must be 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{where}: size must be a non-negative integer")
        return cls(path, sha, size)

    @classmethod
    def of(cls, root: Path, rel: str) -> FileRef:
        full = root / rel
        return cls(rel, sha256_file(full), full.stat().st_size)

    def check_size(self, root: Path) -> Path:
        full = resolve_inside(root, self.path, MANIFEST_NAME)
        try:
            size = full.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{full}: missing from the family (listed in {MANIFEST_NAME})") from None
        if size != self.size:
            raise IntegrityError(f"{full}: size {size} bytes, the manifest records {self.size}; the family is damaged")
        return full

    def check_digest(self, root: Path) -> Path:
        full = self.check_size(root)
        got = sha256_file(full)
        if got != self.sha256:
            raise IntegrityError(
                f"{full}: sha256 {got[:16]}..., the manifest records {self.sha256[:16]}...; the family is damaged"
            )
        return full


@dataclass
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class MemberEntry:
    name: str
    delta: FileRef
    tensors: list[TensorMeta]
    original_bytes: int
    source: dict[str, Any] = field(default_factory=dict)
    aux_files: list[FileRef] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "delta": self.delta.to_json(),
            "source": self.source,
            "original_bytes": self.original_bytes,
            "tensors": [t.to_json() for t in self.tensors],
            "aux_files": [a.to_json() for a in self.aux_files],
            "plan": self.plan,
        }


@dataclass
class Manifest:
    backbone: FileRef
    members: list[MemberEntry]
    created_by: str = ""
    format_version: int = FORMAT_VERSION
    backbone_origin: dict[str, Any] = field(default_factory=dict)

    def member(self, name: str) -> MemberEntry:
        for m in self.members:
            if m.name == name:
                return m
        names = ", ".join(m.name for m in self.members) or "none"
        raise NotFoundError(f"no member named {name!r} in this family (members: {names})")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "backbone": self.backbone.to_json(),
            "backbone_origin": self.backbone_origin,
            "members": [m.to_json() for m in self.members],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    def write_atomic(self, root: Path) -> None:
        """Replace wfactor.json atomically: write a temporary file, fsync, rename."""
        tmp = root / (MANIFEST_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.dumps())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / MANIFEST_NAME)


def check_member_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not MEMBER_NAME_RE.match(name):
        raise FormatError(
            f"{where}: member name {name!r} must match {MEMBER_NAME_RE.pattern} "
            "(letters, digits, '.', '_', '-'; at most 128 characters)"
        )
    return name


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    if len(text) > MAX_MANIFEST_BYTES:
        raise LimitError(f"{where}: {len(text)} bytes (limit {MAX_MANIFEST_BYTES})")
    try:
        obj = loads_strict(text)
    except ValueError as exc:
        raise FormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
        raise FormatError(f'{where}: not a wfactor manifest ("format" must be {MANIFEST_FORMAT!r})')
    ver = obj.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise FormatError(f"{where}: format_version must be a positive integer")
    if ver > FORMAT_VERSION:
        raise VersionError(
            f"{where}: file is v{ver}; this reader supports up to v{FORMAT_VERSION}. Upgrade wfactor to read it"
        )
    backbone = FileRef.from_json(obj.get("backbone"), f"{where}: backbone")
    raw_members = obj.get("members")
    if not isinstance(raw_members, list) or len(raw_members) > MAX_MEMBERS:
        raise LimitError(f"{where}: members must be a list of at most {MAX_MEMBERS}")
    members: list[MemberEntry] = []
    seen: set[str] = set()
    for i, m in enumerate(raw_members):
        w = f"{where}: members[{i}]"
        if not isinstance(m, dict):
            raise FormatError(f"{w}: expected an object")
        name = check_member_name(m.get("name"), w)
        if name in seen:
            raise FormatError(f"{w}: member {name!r} appears twice")
        seen.add(name)
        raw_t = m.get("tensors")
        if not isinstance(raw_t, list) or len(raw_t) > MAX_TENSORS:
            raise LimitError(f"{w}: tensors must be a list of at most {MAX_TENSORS}")
        tensors = []
        for t in raw_t:
            if not isinstance(t, dict) or t.get("dtype") not in DTYPES:
                raise FormatError(f"{w}: each tensor needs name, shape and a known dtype")
            tensors.append(TensorMeta(check_name(t.get("name"), w), check_shape(t.get("shape"), w), t["dtype"]))
        ob = m.get("original_bytes", 0)
        if not isinstance(ob, int) or ob < 0:
            raise FormatError(f"{w}: original_bytes must be a non-negative integer")
        aux = m.get("aux_files", [])
        if not isinstance(aux, list):
            raise FormatError(f"{w}: aux_files must be a list")
        source = m.get("source", {})
        plan = m.get("plan", {})
        members.append(
            MemberEntry(
                name=name,
                delta=FileRef.from_json(m.get("delta"), f"{w}: delta"),
                tensors=tensors,
                original_bytes=ob,
                source=source if isinstance(source, dict) else {},
                aux_files=[FileRef.from_json(a, f"{w}: aux_files") for a in aux],
                plan=plan if isinstance(plan, dict) else {},
            )
        )
    created_by = obj.get("created_by", "")
    origin = obj.get("backbone_origin", {})
    return Manifest(
        backbone,
        members,
        created_by if isinstance(created_by, str) else "",
        ver,
        origin if isinstance(origin, dict) else {},
    )


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_NAME
    if not root.exists():
        raise NotFoundError(f"{root}: no such family directory")
    if not path.is_file():
        raise NotFoundError(f"{root}: not a wfactor family ({MANIFEST_NAME} is missing)")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise LimitError(f"{path}: {size} bytes (limit {MAX_MANIFEST_BYTES})")
    return parse_manifest(path.read_bytes(), str(path))
