"""The family manifest, wfactor.json (spec/FORMAT.md section 3)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import FormatError, IntegrityError, LimitError, NotFoundError, VersionError
from .atomic import atomic_file
from .components import components_from_json, split_name
from .constants import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MAX_FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    MAX_MEMBERS,
    MAX_TENSORS,
    MEMBER_NAME_RE,
    SHA256_RE,
    SHARDED_FORMAT_VERSION,
)
from .paths import check_relpath
from .safetensors_io import check_name, check_shape, loads_strict, written_digest
from .stamps import open_file_matches


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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
        """The reference to ``root/rel``: its digest as this process wrote it (hashed while written, if the
        file is unchanged since), else read and hashed now."""
        full = root / rel
        digest = written_digest(full) or sha256_file(full)
        return cls(rel, digest, full.stat().st_size)

    def check_size(self, root: Path) -> Path:
        full = resolve_inside(root, self.path, MANIFEST_NAME)
        try:
            size = full.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{full}: missing from the family (listed in {MANIFEST_NAME})") from None
        self._check_size_is(full, size)
        return full

    def _check_size_is(self, full: Path, size: int) -> None:
        if size != self.size:
            raise IntegrityError(f"{full}: size {size} bytes, the manifest records {self.size}; the family is damaged")

    def check_digest(self, root: Path, use_stamps: bool = True) -> Path:
        """Size and SHA-256 (spec 9). With ``use_stamps``, a file verified before and unchanged since is not
        hashed again (``stamps``); ``verify`` passes False and hashes every byte."""
        full, fh = self.open_checked(root, use_stamps)
        fh.close()
        return full

    def open_checked(self, root: Path, use_stamps: bool = True) -> tuple[Path, BinaryIO]:
        """Like :meth:`check_digest`, on a file it opens and returns (at offset 0) for the caller to read: the
        bytes checked and the bytes then read are the same file, whatever happens to its path meanwhile."""
        full = self.check_size(root)
        fh = open(full, "rb")
        try:
            self._check_size_is(full, os.fstat(fh.fileno()).st_size)
            got = open_file_matches(fh, self.sha256, use_stamps)
            if got != self.sha256:
                raise IntegrityError(
                    f"{full}: sha256 {got[:16]}..., the manifest records {self.sha256[:16]}...; the family is damaged"
                )
            fh.seek(0)
        except BaseException:
            fh.close()
            raise
        return full, fh


@dataclass
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1] if self.dtype in DTYPES else 1
        for d in self.shape:
            n *= d
        return n

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
    components: list[Any] = field(default_factory=list)  # wfactor.pipelines.Component (spec 3.3)

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "delta": self.delta.to_json(),
            "source": self.source,
            "original_bytes": self.original_bytes,
            "tensors": [t.to_json() for t in self.tensors],
            "aux_files": [a.to_json() for a in self.aux_files],
            "plan": self.plan,
        }
        if self.components:
            out["components"] = [c.to_json() for c in self.components]
        return out


@dataclass
class Manifest:
    backbone: FileRef
    members: list[MemberEntry]
    created_by: str = ""
    format_version: int = FORMAT_VERSION
    backbone_origin: dict[str, Any] = field(default_factory=dict)
    backbone_shards: list[FileRef] = field(default_factory=list)  # version 2: a sharded backbone (spec 2.1)

    def member(self, name: str) -> MemberEntry:
        for m in self.members:
            if m.name == name:
                return m
        names = ", ".join(m.name for m in self.members) or "none"
        raise NotFoundError(f"no member named {name!r} in this family (members: {names})")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "backbone": self.backbone.to_json(),
            "backbone_origin": self.backbone_origin,
        }
        if self.backbone_shards:  # absent otherwise: an unsharded family stays version 1, byte for byte
            out["backbone_shards"] = [r.to_json() for r in self.backbone_shards]
        out["members"] = [m.to_json() for m in self.members]
        return out

    @property
    def backbone_bytes(self) -> int:
        """The backbone's size on disk: its file, or its shards and their list."""
        return self.backbone.size + sum(r.size for r in self.backbone_shards)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"

    def write_atomic(self, root: Path) -> None:
        """Replace wfactor.json atomically (:func:`wfactor.format.atomic.atomic_file`: a temporary file beside
        it, fsynced, renamed over it, the directory fsynced): the commit point of every write of a family."""
        with atomic_file(root / MANIFEST_NAME) as tmp:
            tmp.write_text(self.dumps(), encoding="utf-8")


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
        obj = loads_strict(text.decode("utf-8") if isinstance(text, bytes) else text)
    except ValueError as exc:  # UnicodeDecodeError included
        raise FormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
        raise FormatError(f'{where}: not a wfactor manifest ("format" must be {MANIFEST_FORMAT!r})')
    ver = obj.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise FormatError(f"{where}: format_version must be a positive integer")
    if ver > MAX_FORMAT_VERSION:
        raise VersionError(
            f"{where}: file is v{ver}; this reader supports up to v{MAX_FORMAT_VERSION}. Upgrade wfactor to read it"
        )
    backbone = FileRef.from_json(obj.get("backbone"), f"{where}: backbone")
    shards = _backbone_shards(obj, ver, where)
    raw_members = obj.get("members")
    if not isinstance(raw_members, list):
        raise FormatError(f"{where}: members must be a list")
    if len(raw_members) > MAX_MEMBERS:
        raise LimitError(f"{where}: {len(raw_members)} members (limit {MAX_MEMBERS})")
    created_by = obj.get("created_by", "")
    origin = obj.get("backbone_origin", {})
    if not isinstance(created_by, str) or not isinstance(origin, dict):
        raise FormatError(f"{where}: created_by must be a string and backbone_origin an object")
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
        if not isinstance(raw_t, list):
            raise FormatError(f"{w}: tensors must be a list")
        if len(raw_t) > MAX_TENSORS:
            raise LimitError(f"{w}: {len(raw_t)} tensors (limit {MAX_TENSORS})")
        tensors = []
        names: set[str] = set()
        for t in raw_t:
            if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or t["dtype"] not in DTYPES:
                raise FormatError(f"{w}: each tensor needs name, shape and a known dtype")
            tname = check_name(t.get("name"), w, bad=FormatError)
            if tname in names:
                raise FormatError(f"{w}: tensor {tname!r:.80} is listed twice")
            names.add(tname)
            tensors.append(
                TensorMeta(tname, check_shape(t.get("shape"), f"{w}: tensor {tname!r:.80}", FormatError), t["dtype"])
            )
        ob = m.get("original_bytes", 0)
        if not isinstance(ob, int) or isinstance(ob, bool) or ob < 0:
            raise FormatError(f"{w}: original_bytes must be a non-negative integer")
        aux = m.get("aux_files", [])
        if not isinstance(aux, list):
            raise FormatError(f"{w}: aux_files must be a list")
        source = m.get("source", {})
        plan = m.get("plan", {})
        if not isinstance(source, dict) or not isinstance(plan, dict):
            raise FormatError(f"{w}: source and plan must be objects")
        members.append(
            MemberEntry(
                name=name,
                delta=FileRef.from_json(m.get("delta"), f"{w}: delta"),
                tensors=tensors,
                original_bytes=ob,
                source=source if isinstance(source, dict) else {},
                aux_files=[FileRef.from_json(a, f"{w}: aux_files") for a in aux],
                plan=plan if isinstance(plan, dict) else {},
                components=_components(m.get("components"), w, tensors),
            )
        )
    return Manifest(
        backbone,
        members,
        created_by if isinstance(created_by, str) else "",
        ver,
        origin if isinstance(origin, dict) else {},
        shards,
    )


def _backbone_shards(obj: dict[str, Any], ver: int, where: str) -> list[FileRef]:
    """``backbone_shards`` (spec 2.1): version 2 or later, 1..MAX_MEMBERS FileRefs with distinct paths."""
    if "backbone_shards" not in obj:
        return []
    raw = obj["backbone_shards"]
    if ver < SHARDED_FORMAT_VERSION:
        raise FormatError(f"{where}: backbone_shards needs format_version {SHARDED_FORMAT_VERSION}, found {ver}")
    if not isinstance(raw, list) or not raw:
        raise FormatError(f"{where}: backbone_shards must be a non-empty list of files")
    if len(raw) > MAX_MEMBERS:
        raise LimitError(f"{where}: {len(raw)} backbone shards (limit {MAX_MEMBERS})")
    shards = [FileRef.from_json(r, f"{where}: backbone_shards[{i}]") for i, r in enumerate(raw)]
    paths = [r.path for r in shards] + [obj["backbone"]["path"]]
    if len(set(paths)) != len(paths):
        raise FormatError(f"{where}: backbone_shards and backbone must name distinct files")
    return shards


def shard_list_bytes(shards: list[FileRef]) -> bytes:
    """The exact bytes of a sharded backbone's shard list (spec 2.1): ``sha256  path\n`` per shard."""
    return "".join(f"{r.sha256}  {r.path}\n" for r in shards).encode("utf-8")


def _components(obj: Any, where: str, tensors: list[TensorMeta]) -> list[Any]:
    """A pipeline member's components (spec 3.3): every tensor is ``<component>/<name>`` of a listed one."""

    comps = components_from_json(obj, where)
    if comps:
        names = {c.name for c in comps}
        for t in tensors:
            if split_name(t.name)[0] not in names or "/" not in t.name:
                raise FormatError(f"{where}: tensor {t.name!r} belongs to none of the member's components")
    return comps


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
