"""Reading a family: open, check, rebuild members, materialise, verify.

Integrity is checked in layers: opening a family checks the manifest, every file's size and that every
delta names the manifest's backbone digest (cheap: no data is read); the backbone's sha256 is computed
once per Family, the first time backbone data is needed; a delta's sha256 is checked when it is opened.
So a flipped byte anywhere is caught before a tensor built from it is returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import IntegrityError, MemoryLimitError, NotFoundError, WfactorError, is_allocation_failure
from .format import stamps
from .format.constants import DTYPES
from .format.delta import DeltaFile
from .format.family_dir import FamilyDir
from .format.manifest import MemberEntry
from .format.parts import PartReader, PartSpec, read_part
from .format.records import Record
from .loader import BACKBONES, DeltaCache, read_flat, tensors_from_flat, to_device
from .materialize import Materialized, write_member
from .reconstruct import reconstruct
from .tensors import bitwise_equal


def out_of_memory(where: str, rec: Record, device: str | torch.device) -> MemoryLimitError:
    n = DTYPES[rec.dtype][1] if rec.dtype in DTYPES else 1
    for d in rec.shape:
        n *= d
    return MemoryLimitError(
        f"{where}: is {list(rec.shape)} x {rec.dtype}, {n:,} bytes, more than {device} can allocate now; "
        "free memory or use a machine with more, or check that the family is the one you meant"
    )


class Family(FamilyDir):
    """An opened family directory (:class:`wfactor.format.family_dir.FamilyDir`: manifest, files, checks,
    records) that rebuilds members with torch. Cheap to open; data is read lazily, tensor by tensor."""

    def __init__(self, root: str | os.PathLike[str], delta_cache_bytes: int = 256 << 20) -> None:
        self._held: dict[str, dict[str, torch.Tensor]] = {}
        self._registry = BACKBONES  # the process-wide registry this Family's references are held in
        self.delta_cache = DeltaCache(delta_cache_bytes)
        self._records: dict[str, dict[str, Record]] = {}
        super().__init__(root)
        # a Family dropped without close() still gives its backbone references back (state_dict keeps the
        # backbone resident by default, and an unreleased reference would keep it for the process's life)
        weakref.finalize(self, _release_all, self._registry, self.manifest.backbone.sha256, self._held)

    # -- backbone ----------------------------------------------------------------------------------------
    def backbone(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every backbone tensor on ``device``. Loaded once per (backbone, device) in the process, however many
        Family objects ask (reference-counted; this Family holds one reference per device until
        :meth:`release` or :meth:`close`). The file is read in large sequential chunks, hashed as it is read
        and refused if its SHA-256 differs from the manifest's, before any tensor is returned."""
        dev = torch.device(device)
        key = str(dev)
        if key not in self._held:
            self._held[key] = self._registry.acquire(
                self.manifest.backbone.sha256, dev, lambda: self._load_backbone(dev)
            )
        return self._held[key]

    def _load_backbone(self, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
        tensors: dict[str, torch.Tensor] = {}
        total = 0
        for ref, f in self.backbone_parts:  # each file hashed as it is read, unless stamped
            length = f.size - f.data_start
            with f.reopen() as fh:
                before = os.fstat(fh.fileno())
                hasher = None if stamps.trusted(before, ref.sha256) else hashlib.sha256()
                flat = read_flat(fh, f.data_start, length, device, hasher, str(f.path))
                if hasher is not None:
                    got = hasher.hexdigest()
                    if got != ref.sha256:
                        raise IntegrityError(
                            f"{f.path}: sha256 {got[:16]}..., the manifest records "
                            f"{ref.sha256[:16]}...; the backbone was modified or replaced"
                        )
                    stamps.remember(before, os.fstat(fh.fileno()), ref.sha256)
            tensors.update(tensors_from_flat(f, flat))
            total += length
        self.backbone_verified = True
        return tensors, total

    def release(self, device: str | torch.device = "cpu") -> None:
        """Give back this Family's reference to the backbone on ``device``; the last reference frees it."""
        key = str(torch.device(device))
        if self._held.pop(key, None) is not None:
            self._registry.release(self.manifest.backbone.sha256, torch.device(device))

    def base_tensor(self, name: str, device: str | torch.device) -> torch.Tensor:
        key = str(torch.device(device))
        if key in self._held:
            return self._held[key][name]
        self.verify_backbone()
        f = self.backbone_file_of(name)
        # a copy-on-write mapping of the backbone file: page cache, not anonymous memory (reconstruction
        # never writes into its base)
        return to_device(f.mapped(name), f.tensors[name].dtype, torch.device(device))

    # -- rebuilding --------------------------------------------------------------------------------------
    def records(self, name: str) -> dict[str, Record]:
        """Member ``name``'s records (spec 4.1), by tensor name, in the member's order: what each tensor is
        predicted from (``base``), with which codecs, and its measured error. Reads only the delta's header
        (its digest is checked)."""
        cached = self._records.get(name)
        if cached is not None:
            return dict(cached)
        with self.open_delta(name) as delta:
            return {t.name: delta.records[t.name] for t in self.member(name).tensors}

    def tensor(self, name: str, tensor: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor of member ``name``, rebuilt on ``device`` (the other tensors are not read)."""
        with self.open_delta(name) as delta:
            if tensor not in delta.records:
                raise NotFoundError(f"{self.root}: member {name!r} has no tensor {tensor!r}")
            return self.rebuild(delta, delta.records[tensor], device)

    def iter_tensors(
        self,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        component: str | None = None,
        skip: Collection[str] = (),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Rebuild member ``name`` one tensor at a time, in the member's original tensor order. ``component``:
        only that component of a pipeline member, with names stripped of the ``<component>/`` namespace.
        ``skip``: names (as yielded) not to rebuild, e.g. the weights a caller keeps factored."""
        with self.open_delta(name) as delta:
            yield from self.iter_open(delta, name, device, dtype, component, skip)

    def iter_open(
        self,
        delta: DeltaFile,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        component: str | None = None,
        skip: Collection[str] = (),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`iter_tensors` over a delta the caller already opened with :meth:`open_delta` (one digest
        check for callers that read it twice, such as ``wfactor.torch.attach``)."""
        prefix = self.component_prefix(name, component)
        for meta in self.member(name).tensors:
            if not meta.name.startswith(prefix) or meta.name[len(prefix) :] in skip:
                continue
            rec = delta.records[meta.name]
            t = self.rebuild(delta, rec, device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield meta.name[len(prefix) :], t

    def rebuild(self, delta: DeltaFile, rec: Record, device: str | torch.device) -> torch.Tensor:
        if rec.same_as is not None:  # tied weights: stored once, rebuilt from the record they are tied to
            return self.rebuild(delta, delta.records[rec.same_as], device)
        base = self.base_tensor(rec.base, device) if rec.base is not None else None
        where = f"{delta.file.path}: tensor {rec.name!r}"

        def load(spec: PartSpec) -> torch.Tensor:
            return to_device(read_part(delta.file, spec, where), spec.dtype, torch.device(device))

        def others(name: str) -> torch.Tensor:
            return self.rebuild(delta, delta.records[name], device)

        return self._reconstruct(rec, base, load, device, str(delta.file.path), rec.name, others)

    @staticmethod
    def _reconstruct(
        rec: Record,
        base: torch.Tensor | None,
        load: Callable[[PartSpec], torch.Tensor],
        device: str | torch.device,
        path: str,
        name: str,
        others: Callable[[str], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``reconstruct`` with every error in one line that names the delta file ``path`` and tensor ``name``
        (a part's decoding names them already; a decode-time check, such as sparse indices, does not)."""
        where = f"{path}: tensor {name!r}"
        try:
            return reconstruct(rec, base, load, device, others)
        except WfactorError as exc:
            if exc.message.startswith(path):
                raise
            raise type(exc)(f"{where}: {exc.message}") from None
        except (MemoryError, RuntimeError) as exc:
            if not is_allocation_failure(exc):
                raise
            raise out_of_memory(where, rec, device) from None

    def state_dict(
        self,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        copy: bool = False,
        component: str | None = None,
        resident: bool = True,
        dequantize: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Member ``name`` rebuilt on ``device`` (the arithmetic runs there), with the member's own tensor
        names; ``dtype`` casts floating tensors. ``component`` (a pipeline member): only that component, names
        without the ``<component>/`` namespace.

        ``resident`` (the default): the backbone is loaded on ``device`` once (:meth:`backbone`) and kept there
        until :meth:`release`/:meth:`close`, shared by every member loaded later, so tensors identical to the
        backbone are the backbone's own tensors (the same storage in every member whose tower aligns to it),
        unless ``copy=True``. ``resident=False`` streams: each backbone tensor is read when needed (a mapping
        of the file on CPU) and nothing stays behind (unless the backbone is resident already). The member's
        decoded delta parts are kept in a byte-bounded LRU (``delta_cache``): with the backbone resident, making
        a member ready moves only its delta's bytes, and a second call moves none.

        ``dequantize``: a quantised member (int4/int8 packed codes, fp8 weights) comes back with float weights
        under their float names, (u - z) * s in the dtype of its scales, instead of the checkpoint's packed
        tensors and scales (:func:`wfactor.quantized.dequantize_tensors`); other members are unchanged."""
        dev = torch.device(device)
        if resident:
            self.backbone(dev)
        prefix = self.component_prefix(name, component)
        out: dict[str, torch.Tensor] = {}
        with self._delta_parts(name, dev) as (records, part, delta_path):

            def rebuilt(tensor: str) -> tuple[torch.Tensor, torch.Tensor | None]:
                """(tensor ``tensor`` of the member, its base); tied weights from the record they are tied to,
                a requant record's scales rebuilt by name (small)."""
                rec = records[tensor]
                src = records[rec.same_as] if rec.same_as is not None else rec
                base = self.base_tensor(src.base, dev) if src.base is not None else None
                return self._reconstruct(src, base, part, dev, delta_path, tensor, tensor_of), base

            def tensor_of(tensor: str) -> torch.Tensor:
                return rebuilt(tensor)[0]

            for meta in self.member(name).tensors:
                if not meta.name.startswith(prefix):
                    continue
                t, base = rebuilt(meta.name)
                if copy and base is not None and t.data_ptr() == base.data_ptr():
                    t = t.clone()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[meta.name[len(prefix) :]] = t
        if dequantize:
            from .quantized import dequantize_tensors

            local = {k[len(prefix) :]: r for k, r in records.items() if k.startswith(prefix)}
            out = dequantize_tensors(out, local, prefix)
        return out

    @contextlib.contextmanager
    def _delta_parts(
        self, name: str, dev: torch.device
    ) -> Iterator[tuple[dict[str, Record], Callable[[PartSpec], torch.Tensor], str]]:
        """(records, part, delta path): ``part(spec)`` is a decoded part on ``dev``. From the LRU when the member
        is there; else the delta is read whole (one sequential read, checked), its parts decode on a few
        threads in the order the member's tensors are rebuilt, so the caller rebuilds tensor k while later
        parts decode; on a clean exit every part is decoded and the member goes into the LRU."""
        self.last_delta_bytes = 0
        entry = self.member(name)
        cached = self.delta_cache.get(name, dev)
        if cached is not None and name in self._records:
            yield self._records[name], lambda spec: cached[spec.key], str(self.root / entry.delta.path)
            return
        with self.open_delta(name) as delta:
            delta.file.prefetch()  # every part is read: the whole file in large requests
            records = delta.records
            specs = [spec for meta in entry.tensors for spec in records[meta.name].part_specs()]
            where = {
                spec.key: f"{delta.file.path}: tensor {r.name!r}" for r in records.values() for spec in r.part_specs()
            }
            parts: dict[str, torch.Tensor] = {}

            def part(spec: PartSpec) -> torch.Tensor:
                t = parts.get(spec.key)
                if t is None:
                    t = parts[spec.key] = to_device(reader.get(spec.key), spec.dtype, dev)
                return t

            with PartReader(delta.file, specs, where) as reader:
                yield records, part, str(delta.file.path)
                for spec in specs:  # what the caller did not need (another component): for the LRU
                    part(spec)
            self._records[name] = records
            self.last_delta_bytes = entry.delta.size
        self.delta_cache.put(name, dev, parts)

    def load_delta(
        self, name: str, device: str | torch.device = "cpu"
    ) -> tuple[dict[str, Record], dict[str, torch.Tensor]]:
        """The member's records and its decoded parts on ``device`` (from the LRU when there).
        ``last_delta_bytes`` tells how many delta bytes this call read (0 on a cache hit)."""
        with self._delta_parts(name, torch.device(device)) as (records, part, _):
            parts = {spec.key: part(spec) for rec in records.values() for spec in rec.part_specs()}
        return records, parts

    def materialize(
        self,
        name: str,
        out: str | os.PathLike[str],
        force: bool = False,
        max_shard_size: int | str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> Path:
        """Write ``out/model.safetensors`` (original names, dtypes, order) plus the member's config files, and
        return its path (see :meth:`write_member` for everything that was written).

        With ``max_shard_size`` (bytes, or "500MB", "2GB", "1.5GiB"), write ``model-0000i-of-0000N.safetensors``
        shards and ``model.safetensors.index.json`` as transformers does, and return the index's path. A
        pipeline member is written in its own layout (component folders, model_index.json; spec 3.3) and the
        output directory is returned. Every file is written under a temporary name and renamed when all are
        complete."""
        return self.write_member(name, out, force, max_shard_size, progress).target

    def write_member(
        self,
        name: str,
        out: str | os.PathLike[str],
        force: bool = False,
        max_shard_size: int | str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> Materialized:
        """:meth:`materialize`, returning what was written (:class:`wfactor.materialize.Materialized`: the
        target, every file, the weights' bytes). ``progress(member, bytes_written, bytes_total)`` is called
        after each tensor."""
        from .format.shards import parse_size

        max_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
        out = Path(out)
        self.member(name)  # a one-line error for an unknown member, before anything is created
        if out.exists() and any(out.iterdir()) and not force:
            raise WfactorError(f"{out}: exists and is not empty; choose another -o or pass --force")
        out.mkdir(parents=True, exist_ok=True)
        return write_member(self, name, out, max_bytes, progress)

    # -- verification ------------------------------------------------------------------------------------
    def verify(
        self,
        against: dict[str, str] | None = None,
        on_tensor: Callable[[str, str], None] | None = None,
    ) -> VerifyReport:
        """Check every digest and decode every record; with ``against`` {member: path}, compare with originals."""
        from .inputs import open_source

        report = VerifyReport()
        try:
            self.verify_backbone(full=True)
            report.checked_files.append(self.manifest.backbone.path)
            report.checked_files += [r.path for r in self.manifest.backbone_shards]
        except IntegrityError as exc:
            report.problems.append(exc.message)
            return report
        for m in self.manifest.members:
            try:
                with self.open_delta(m.name, use_stamps=False):
                    pass
                for ref in m.aux_files:
                    ref.check_digest(self.root, use_stamps=False)
                report.checked_files += [m.delta.path] + [a.path for a in m.aux_files]
            except WfactorError as exc:
                report.problems.append(exc.message)
        if report.problems:
            return report
        against = against or {}
        unknown = set(against) - set(self.members)
        for u in sorted(unknown):
            report.problems.append(f"--against {u}=...: no member named {u!r} (members: {', '.join(self.members)})")
        for m in self.manifest.members:
            src = open_source(against[m.name], name=m.name) if m.name in against else None
            try:
                self._verify_member(m, src, report, on_tensor)
            except WfactorError as exc:
                report.problems.append(exc.message)
            finally:
                if src is not None:
                    src.close()
        return report

    def _verify_member(self, m: MemberEntry, src: Any, report: VerifyReport, on_tensor: Any) -> None:
        from .plan import measure

        with self.open_delta(m.name) as delta:
            if src is not None:
                names = {t.name for t in m.tensors}
                for extra in sorted(set(src.keys()) - names):
                    report.problems.append(f"{m.name}: tensor {extra!r} is in {src.path} but not in the family")
                for missing in sorted(names - set(src.keys())):
                    report.problems.append(f"{m.name}: tensor {missing!r} is in the family but not in {src.path}")
            for meta in m.tensors:
                rec = delta.records[meta.name]
                y = self.rebuild(delta, rec, "cpu")
                report.tensors += 1
                if on_tensor:
                    on_tensor(m.name, meta.name)
                if src is None or meta.name not in src:
                    continue
                orig = src.tensor(meta.name)
                if orig.dtype != y.dtype or tuple(orig.shape) != tuple(y.shape):
                    report.problems.append(
                        f"{m.name}: tensor {meta.name!r} is {list(orig.shape)} x {orig.dtype} in {src.path}, "
                        f"rebuilt {list(y.shape)} x {y.dtype}"
                    )
                    continue
                report.compared += 1
                recorded = rec.error.get("rel_l2", 0.0)
                if recorded == 0.0:
                    if not bitwise_equal(orig, y):
                        report.problems.append(f"{m.name}: tensor {meta.name!r} was recorded exact but differs")
                    continue
                err = measure(y, orig)["rel_l2"]
                report.worst[m.name] = max(report.worst.get(m.name, 0.0), err)
                if err > recorded * 1.01 + 1e-7:
                    report.problems.append(
                        f"{m.name}: tensor {meta.name!r} rel error {err:.3g} exceeds the recorded {recorded:.3g}"
                    )

    def close(self) -> None:
        for key in list(self._held):
            self.release(key)
        self.delta_cache.clear()
        super().close()

    def __enter__(self) -> Family:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_all(registry: Any, sha256: str, held: dict[str, Any]) -> None:
    for key in list(held):
        held.pop(key, None)
        registry.release(sha256, torch.device(key))


@dataclass
class VerifyReport:
    checked_files: list[str] = field(default_factory=list)
    tensors: int = 0
    compared: int = 0
    worst: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked_files": self.checked_files,
            "tensors_rebuilt": self.tensors,
            "tensors_compared": self.compared,
            "worst_rel_error": self.worst,
            "problems": self.problems,
        }


def open_family(path: str | os.PathLike[str], delta_cache_bytes: int = 256 << 20) -> Family:
    """Open a family directory (see :class:`Family`)."""
    return Family(path, delta_cache_bytes)
