"""Growing and shrinking a family in place: ``add`` one member, ``remove`` one member.

Both follow the in-place protocol of :mod:`wfactor.format.atomic`: every new file is written under a name
the current manifest does not reference (a temporary name, fsynced, then renamed to a free final name),
``wfactor.json`` is replaced last and atomically, and files no longer referenced are deleted only after
that. A reader follows the manifest, so it sees the family before or after the change, never a mixture; a
crash leaves at most an unreferenced file. The other members' files are never opened for writing: their
bytes, and their manifest entries, stay as they were. Concurrent edits of one family are serialised by an
advisory lock on the family directory.

``add`` factors the new member against the existing backbone exactly as ``factor`` does (same planner,
same per-tensor budget, the same unrelated-model rule), so a member removed and added back with the same
budget gets a byte-identical delta. Whole-family byte budgets (``--target-bytes``/``--target-ratio``) do
not apply to one member and are refused. ``remove`` refuses to remove the last member: a family without
members is a backbone alone; delete the directory instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .align import VERDICT_SAMPLE, BackboneIndex, Rule, align, parse_map, rules_for
from .errors import InputError, LimitError
from .executor import resolve_workers
from .factoring import (
    MemberReport,
    Progress,
    member_entry,
    single_threaded,
    write_delta,
)
from .family import Family
from .format.atomic import fsync_dir, temp_name
from .format.constants import AUX_DIR, DELTAS_DIR, MANIFEST_NAME, MAX_MEMBERS
from .format.manifest import (
    Manifest,
    check_member_name,
    read_manifest,
    resolve_inside,
)
from .inputs import open_source
from .peft import AdapterSource, is_adapter_dir
from .plan import Budget
from .sources import Source, default_member_name, split_spec

try:  # advisory locks: POSIX only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the family directory (no lock file is created)."""
    if not root.is_dir():
        read_manifest(root)  # the one-line "no such family" error
    fd = os.open(root, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def replace_manifest(root: Path, manifest: Manifest) -> None:
    """The commit point of an in-place change: write wfactor.json under a temporary name, fsync, rename."""
    manifest.write_atomic(root)


def _free(root: Path, rel: str, taken: set[str]) -> str:
    """``rel`` if neither the manifest nor the disk holds it, else ``<stem>@<k><suffix>`` for the first free k
    ('@' cannot appear in a member name, so these names never collide with another member's)."""
    stem, dot, suffix = rel.rpartition(".") if rel.endswith(".safetensors") else (rel, "", "")
    k = 0
    cand = rel
    while cand in taken or (root / cand).exists():
        k += 1
        cand = f"{stem}@{k}{dot}{suffix}"
    return cand


def _referenced(man: Manifest) -> set[str]:
    refs = {man.backbone.path} | {r.path for r in man.backbone_shards}
    for m in man.members:
        refs.add(m.delta.path)
        refs.update(a.path for a in m.aux_files)
    return refs


def _delete_unreferenced(root: Path, paths: list[str], man: Manifest) -> None:
    """Delete the files of ``paths`` that ``man`` no longer references, then their emptied aux directories."""
    keep = _referenced(man)
    dirs = set()
    for rel in paths:
        if rel in keep:
            continue
        with contextlib.suppress(OSError):
            resolve_inside(root, rel, MANIFEST_NAME).unlink()
        if rel.startswith(AUX_DIR + "/"):
            dirs.add((root / rel).parent)
    for d in sorted(dirs, reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty
    fsync_dir(root / DELTAS_DIR)


@single_threaded
def add(
    family: str | os.PathLike[str],
    member: str,
    budget: Budget | None = None,
    force: bool = False,
    base: str | None = None,
    progress: Progress | None = None,
    maps: list[str | Rule] | tuple[str | Rule, ...] = (),
    workers: int | None = None,
) -> MemberReport:
    """Factor ``member`` (``[NAME=]PATH``) against the family's backbone and add it to ``family`` in place,
    aligned to the backbone as ``factor`` aligns (``maps``: explicit ``[MEMBER:]FROM=TO`` rules).

    ``force`` replaces a member of the same name. A PEFT adapter directory is read on ``base``, by default
    the backbone itself. Returns the member's report (bytes, worst error, codecs, related)."""
    budget = budget or Budget()
    budget.validate()
    budget.check_per_member()
    n_workers = resolve_workers(workers)
    root = Path(family)
    with _locked(root):
        opened: list[Any] = []
        written: list[Path] = []
        committed = False
        try:
            fam = Family(root)
            opened.append(fam)
            man = fam.manifest
            if man.backbone_origin.get("backbone_dtype") == "fp8":
                raise InputError(
                    f"{root}: its backbone is stored fp8 (factor --backbone-dtype fp8), whose per-row scales live in "
                    "the members' records: add cannot plan a new member on it; factor the family again with it"
                )
            fam.verify_backbone()  # the delta is tied to the backbone's exact bytes: check them first
            backbone = Source("backbone", root, fam.backbone_files, [])
            opened.append(backbone)
            spec_name, raw = split_spec(member)
            src: Source
            if base is None and is_adapter_dir(Path(raw)):  # a PEFT adapter on the backbone itself
                bb = Source("base", root, fam.backbone_files, [])
                opened.append(bb)
                src = AdapterSource(spec_name or default_member_name(Path(raw)), Path(raw), bb)
            else:
                src = open_source(member, base=base)
            opened.append(src)
            name = check_member_name(src.name, member)
            old = next((m for m in man.members if m.name == name), None)
            if old is not None and not force:
                raise InputError(
                    f"{root}: already has a member named {name!r}; name the new one with NAME=PATH or pass --force "
                    "to replace it"
                )
            if old is None and len(man.members) >= MAX_MEMBERS:
                raise LimitError(f"{root}: already {len(man.members)} members (limit {MAX_MEMBERS})")
            rules = [r if isinstance(r, Rule) else parse_map(r) for r in maps]
            for r in rules:
                if r.member is not None and r.member != name:
                    raise InputError(f"--map {r.member}:{r.label}: the member added is {name!r}, not {r.member!r}")
            al = align(src, BackboneIndex(backbone), rules_for(name, rules), sample=VERDICT_SAMPLE)
            taken = _referenced(man)
            rel = _free(root, f"{DELTAS_DIR}/{name}.safetensors", taken)
            final = root / rel
            tmp = temp_name(final)
            written += [tmp, final]
            records, sizes = write_delta(
                src, backbone, man.backbone.sha256, tmp, budget, progress, alignment=al, workers=n_workers
            )
            os.replace(tmp, final)
            fsync_dir(final.parent)
            aux_dir = _free(root, f"{AUX_DIR}/{name}", taken)
            written.append(root / aux_dir)  # unreferenced until the manifest names it
            entry, rep = member_entry(
                src, root, rel, records, sizes, budget, al.related, aux_dir[len(AUX_DIR) + 1 :], alignment=al
            )
            for ref in entry.aux_files:
                with open(root / ref.path, "rb+") as fh:
                    os.fsync(fh.fileno())
            members = [entry if m.name == name else m for m in man.members] if old else [*man.members, entry]
            new = dataclasses.replace(man, members=members)
            replace_manifest(root, new)
            committed = True
        finally:
            for s in reversed(opened):
                s.close()
            if not committed:  # nothing references what was written: take it away again
                for p in written:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            p.unlink()
        if old is not None:
            _delete_unreferenced(root, [old.delta.path] + [a.path for a in old.aux_files], new)
        return rep


@dataclass
class RemoveReport:
    family: Path
    member: str
    freed_bytes: int
    members: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "family": str(self.family),
            "removed": self.member,
            "freed_bytes": self.freed_bytes,
            "members": self.members,
        }


def remove(family: str | os.PathLike[str], name: str) -> RemoveReport:
    """Drop member ``name`` from the manifest (atomically), then delete its delta and config files."""
    root = Path(family)
    with _locked(root):
        man = read_manifest(root)
        old = man.member(name)
        if len(man.members) == 1:
            raise InputError(
                f"{root}: {name!r} is the only member; a family needs at least one (delete the directory to drop "
                "the whole family)"
            )
        members = [m for m in man.members if m.name != name]
        new = dataclasses.replace(man, members=members)
        replace_manifest(root, new)
        paths = [old.delta.path] + [a.path for a in old.aux_files]
        keep = _referenced(new)
        freed = old.delta.size + sum(a.size for a in old.aux_files if a.path not in keep)
        _delete_unreferenced(root, paths, new)
        return RemoveReport(root, name, freed, [m.name for m in members])
