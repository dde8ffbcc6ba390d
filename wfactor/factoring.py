"""The write pipeline: sources -> per-tensor plan -> encode -> backbone + delta writers -> manifest.

Streaming: one member tensor and its backbone tensor are in memory at a time. Crash safety: everything is
written into a temporary directory beside the output, which is renamed into place only when complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from .align import VERDICT_SAMPLE, Alignment, BackboneIndex, Rule, align, check_rule_members, parse_map, rules_for
from .backbone import medoid, pairwise, widest, write_consensus
from .budget import Budget
from .errors import InputError
from .exact import Planned
from .executor import bounded_heap, one_torch_thread, ordered_map, resolve_workers
from .format.atomic import fsync_dir, recover, replace_dir, temp_name
from .format.constants import (
    AUX_DIR,
    BACKBONE_LIST_NAME,
    BACKBONE_NAME,
    BACKBONE_SHARD_PREFIX,
    DELTAS_DIR,
    FORMAT_VERSION,
    LOW_PRECISION_DTYPES,
    LOW_PRECISION_FORMAT_VERSION,
    META_BACKBONE,
    META_KIND,
    META_MEMBER,
    META_RECORDS,
    META_VERSION,
    SHARDED_FORMAT_VERSION,
)
from .format.manifest import (
    FileRef,
    Manifest,
    MemberEntry,
    TensorMeta,
    check_member_name,
    read_manifest,
    shard_list_bytes,
)
from .format.records import Record, record_version
from .format.safetensors_io import Entry, SpoolWriter, write_streaming
from .inputs import open_bases, open_source, split_base
from .jobs import plan_member_tensor
from .pipelines import aux_relpath, member_components
from .sources import Source
from .version import __version__

__all__ = ["VERDICT_SAMPLE", "FactorReport", "MemberReport", "factor"]

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
    related: bool = True
    alignment: dict[str, Any] | None = None  # wfactor.align.Alignment.to_json()
    quantization: dict[str, Any] | None = None  # a quantised checkpoint (wfactor.quantized)

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
            "related": self.related,
            "codecs": {k: {"tensors": v.tensors, "bytes": v.bytes} for k, v in sorted(self.codecs.items())},
            "alignment": self.alignment,
        } | ({"quantization": self.quantization} if self.quantization is not None else {})


@dataclass
class FactorReport:
    path: Path
    backbone_bytes: int
    base_bytes: int
    members: list[MemberReport]
    budget: Budget
    backbone_origin: dict[str, Any] = field(default_factory=dict)

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
            "budget": self.budget.to_json(),
            "backbone_origin": self.backbone_origin,
            "backbone_bytes": self.backbone_bytes,
            "family_bytes": self.family_bytes,
            "original_bytes": self.original_bytes,
            "ratio": round(self.family_bytes / self.original_bytes, 6) if self.original_bytes else 0.0,
            "members": [m.to_json() for m in self.members],
        }


def _summarise(
    name: str, original: int, records: list[Record], sizes: dict[str, int], delta_bytes: int
) -> MemberReport:
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


def backbone_version(base: Source, version: int) -> int:
    """``version``, or 4 when the backbone holds low-precision tensors (F8, U16-U64; spec 8)."""
    low = any(base.info(k).dtype in LOW_PRECISION_DTYPES for k in base.keys())
    return max(version, LOW_PRECISION_FORMAT_VERSION) if low else version


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

    meta = {META_KIND: "backbone", META_VERSION: str(backbone_version(base, FORMAT_VERSION))}
    write_streaming(path, entries, produce, meta, tick)


def write_backbone_sharded(
    base: Source, root: Path, max_bytes: int, progress: Progress | None = None
) -> tuple[FileRef, list[FileRef]] | None:
    """A sharded backbone (spec 2.1): its shards and the shard list, written into ``root``; returns
    (the list's FileRef, the shards' FileRefs), or None when everything fits in one shard."""
    from .format.shards import plan_shards, write_backbone_shards

    entries = [Entry(k, base.info(k).dtype, base.info(k).shape) for k in base.keys()]
    if len(plan_shards(entries, max_bytes)) < 2:
        return None
    total, done = sum(e.nbytes for e in entries), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("backbone", done, total)

    meta = {META_KIND: "backbone", META_VERSION: str(backbone_version(base, SHARDED_FORMAT_VERSION))}
    names = write_backbone_shards(
        root, BACKBONE_SHARD_PREFIX, entries, lambda e: base.raw_bytes(e.name), meta, max_bytes, tick
    )
    shards = [FileRef.of(root, n) for n in names]
    with open(root / BACKBONE_LIST_NAME, "wb") as fh:
        fh.write(shard_list_bytes(shards))
        fh.flush()
        os.fsync(fh.fileno())
    return FileRef.of(root, BACKBONE_LIST_NAME), shards


def _header_overhead(member: Source) -> int:
    """A generous estimate of a delta's header bytes (records JSON + safetensors entries) for byte budgets."""
    return 1024 + sum(3 * len(k.encode()) + 480 for k in member.keys())


def allocate_family(
    sources: Sequence[Source],
    base: Source,
    budget: Budget,
    backbone_bytes: int,
    progress: Progress | None = None,
    alignments: dict[str, Alignment] | None = None,
    raw: int = 0,
    workers: int = 1,
) -> dict[str, dict[str, str]]:
    """Pass 1 of a family-wide byte budget: every tensor's ladder of options, then one greedy allocation.
    Member-only tensors (all of an unrelated member) take part with their fixed (dense) cost. ``raw``: the
    models side by side."""
    from .plan import TensorPlanner, allocate, planning_pair  # a byte budget is lossy: torch

    target = budget.target_bytes if budget.target_bytes is not None else int(round((budget.target_ratio or 0) * raw))
    keys: list[tuple[str, str]] = []
    ladders: list[list[tuple[str, int, float]]] = []
    overhead = backbone_bytes
    for src in sources:
        overhead += _header_overhead(src)
        done = 0
        mapping = _mapping(src, base, alignments[src.name] if alignments is not None else None)

        def ladder(key: str, src: Source = src, mapping: dict[str, str] = mapping) -> list[tuple[str, int, float]]:
            bname = mapping.get(key)
            target, base_t, _t = planning_pair(src, base, key, bname)
            return TensorPlanner(key, target, bname, base_t, budget).ladder()

        for key, lad in zip(src.keys(), ordered_map(ladder, src.keys(), workers, one_torch_thread)):
            ladders.append(lad)
            keys.append((src.name, key))
            done += src.info(key).nbytes
            if progress:
                progress(f"plan {src.name}", done, src.nbytes)
    floor = overhead + sum(lad[0][1] for lad in ladders)
    if target < floor:
        raise InputError(
            f"a family of {target} bytes is not possible: the backbone ({backbone_bytes} bytes) and the cheapest "
            f"deltas need about {floor}; raise --target-bytes/--target-ratio (ratio >= {floor / raw:.3f})"
        )
    options, _used = allocate(ladders, target - overhead)
    out: dict[str, dict[str, str]] = {s.name: {} for s in sources}
    for (member, key), opt in zip(keys, options):
        out[member][key] = opt
    return out


def member_budget(src: Source, budget: Budget) -> Budget:
    """The budget a member's tensors are planned with: lossless for a model served as it is (a quantised
    checkpoint: every tensor of it comes back bit for bit), else ``budget``."""
    return Budget(lossless=True) if src.stored_lossless else budget


def _mapping(src: Source, base: Source, alignment: Alignment | None) -> dict[str, str]:
    """Member tensor -> the backbone tensor it is predicted from: the alignment's, else the same name."""
    if alignment is not None:
        return alignment.mapping
    return {k: k for k in src.keys() if k in base}


def write_delta(
    member: Source,
    base: Source,
    backbone_sha: str | Callable[[], str],
    path: Path,
    budget: Budget,
    progress: Progress | None = None,
    options: dict[str, str] | None = None,
    fast_load: bool = False,
    alignment: Alignment | None = None,
    workers: int = 1,
    executor: Any | None = None,
    device: str = "cpu",
    writer: ThreadPoolExecutor | None = None,
    pending: list[Future[Any]] | None = None,
) -> tuple[list[Record], dict[str, int]]:
    """Plan and encode every tensor of ``member`` against ``base``; returns the records and part sizes.
    ``alignment`` says which backbone tensor each member tensor is predicted from (None: the one of its name);
    a tensor it leaves out is stored dense.
    ``options`` (from :func:`allocate_family`) fixes each tensor's option instead of the per-tensor budget.
    ``fast_load``: k-bit codes are stored as bit planes (spec 4.3, a version-3 delta), used as they are by a
    loader, instead of zstd frames that must be decoded (which are ~1-25% smaller). ``workers``: tensors
    planned at once (:func:`wfactor.executor.ordered_map`); the bytes written are the same for any number.
    ``writer`` (with ``pending``): the final file is written from the spool on that thread while the caller
    goes on (planning the next member); its future goes into ``pending``, and the file exists once it is done.
    ``backbone_sha`` (the digest the delta is tied to) may be a function, called when the file is finished."""
    spool = SpoolWriter(path)
    records: list[Record] = []
    sizes: dict[str, int] = {}
    total, done = member.nbytes, 0
    mapping = _mapping(member, base, alignment)
    tensor_budget = member_budget(member, budget)

    def jobs() -> list[tuple[int, str, str | None]]:
        """(record position, tensor, the earlier tensor it is tied to): tied weights (lm_head = embed_tokens)
        are found here, in order, by content; each is stored once and the others become same_as records."""
        seen: dict[tuple[str, tuple[int, ...], str], list[str]] = {}  # content key -> first tensors with it
        out = []
        for pos, key in enumerate(member.keys()):
            ck, _constant = member.content(key)
            earlier = seen.setdefault(ck, [])
            tied = None
            if member.info(key).nbytes > 0:
                tied = next((k for k in earlier if member.same_bytes(key, member, k)), None)
            out.append((pos, key, tied))
            if tied is None:
                earlier.append(key)
        return out

    def plan(job: tuple[int, str, str | None]) -> Planned | None:
        pos, key, tied = job
        if tied is not None:
            return None
        option = options.get(key) if options else None
        return plan_member_tensor(member, base, key, mapping.get(key), tensor_budget, option, fast_load, pos, device)

    try:
        job_list = jobs()
        by_name: dict[str, Record] = {}
        if executor is None:
            results = ordered_map(plan, job_list, workers, one_torch_thread)
        else:  # another executor (wfactor.distributed.RayExecutor): the same per-tensor function, elsewhere
            specs = [
                None
                if tied is not None
                else (pos, key, mapping.get(key), tensor_budget, options.get(key) if options else None, fast_load)
                for pos, key, tied in job_list
            ]
            results = executor.plans(member, base, specs)
        for (_pos, key, tied), planned in zip(job_list, results):
            info = member.info(key)
            if planned is None:
                assert tied is not None
                first = by_name[tied]
                records.append(Record(key, info.shape, info.dtype, None, error=dict(first.error), same_as=tied))
            else:
                for spec in planned.record.part_specs():
                    arr = planned.stored[spec.key]
                    # compressed parts are stored as one 1-D U8 tensor holding the zstd frame (spec 4.3)
                    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data  # no copy
                    spool.add(spec.key, spec.dtype if spec.encoding == "raw" else "U8", arr.shape, data)
                    sizes[spec.key] = int(arr.nbytes)
                records.append(planned.record)
                by_name[key] = planned.record
            done += info.nbytes
            if progress:
                progress(member.name, done, total)
        def meta() -> dict[str, str]:
            return {
                META_KIND: "delta",
                META_VERSION: str(delta_version(records)),
                META_MEMBER: member.name,
                META_BACKBONE: backbone_sha if isinstance(backbone_sha, str) else backbone_sha(),
                META_RECORDS: _records_json(records),
            }

        if writer is not None and pending is not None:

            def finish() -> str:
                try:
                    return spool.finish(meta())
                except BaseException:
                    spool.abort()
                    raise

            pending.append(writer.submit(finish))
        else:
            spool.finish(meta())
    except BaseException:
        spool.abort()
        raise
    return records, sizes


def delta_version(records: list[Record]) -> int:
    """The lowest version that describes these records (spec 8): 4 with a low-precision dtype or a rescale
    term, 3 with a bitplanes part, else 1."""
    return max([FORMAT_VERSION] + [record_version(r) for r in records])


def _records_json(records: list[Record]) -> str:
    return json.dumps([r.to_json() for r in records], separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def member_entry(
    src: Source,
    root: Path,
    rel: str,
    records: list[Record],
    sizes: dict[str, int],
    budget: Budget,
    related: bool,
    aux_name: str | None = None,
    alignment: Alignment | None = None,
) -> tuple[MemberEntry, MemberReport]:
    """The manifest entry and the report of a member whose delta was written at ``root/rel``; copies its
    config files to ``aux/<aux_name or name>/`` (shared by ``factor`` and ``add``). The alignment goes into
    the entry's plan when it is more than same names (so a family without towers is written as before)."""
    delta = FileRef.of(root, rel)
    rep = _summarise(src.name, src.nbytes, records, sizes, delta.size)
    rep.related = related
    plan = rep.to_json()
    plan.pop("name")
    plan.pop("alignment")
    quantization = src.quantization()
    if quantization is not None:
        rep.quantization = plan["quantization"] = quantization
    if alignment is not None:
        rep.alignment = alignment.to_json()
        if not alignment.trivial:
            plan["alignment"] = alignment.to_json(names=False)
    plan["budget"] = budget.to_json()
    entry = MemberEntry(
        name=src.name,
        delta=delta,
        tensors=[TensorMeta(k, src.info(k).shape, src.info(k).dtype) for k in src.keys()],
        original_bytes=src.nbytes,
        source={"path": str(src.path), "files": [p.name for p in src.files]} | ({"hub": src.hub} if src.hub else {}),
        aux_files=_copy_aux(src, root, aux_name or src.name),
        plan=plan,
        components=member_components(src),
    )
    return entry, rep


def _copy_aux(src: Source, root: Path, name: str) -> list[FileRef]:
    refs = []
    if src.aux_files:
        (root / AUX_DIR / name).mkdir(parents=True, exist_ok=True)
    for p in src.aux_files:
        rel = f"{AUX_DIR}/{name}/{aux_relpath(src, p)}"  # a pipeline's files keep their folders (spec 3.3)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, root / rel)
        refs.append(FileRef.of(root, rel))
    return refs


def _write_family(
    sources: Sequence[Source],
    base_src: Source,
    tmp: Path,
    budget: Budget,
    alignments: dict[str, Alignment],
    origin: dict[str, Any],
    progress: Progress | None,
    max_shard_bytes: int | None = None,
    fast_load: bool = False,
    workers: int = 1,
    executor: Any | None = None,
    device: str = "cpu",
) -> tuple[Manifest, list[MemberReport]]:
    """Write backbone, deltas and manifest into the (new, empty) directory ``tmp``. With ``max_shard_bytes``
    the backbone is sharded (spec 2.1, a version-2 family) when it does not fit in one shard; with
    ``fast_load`` k-bit codes are stored as bit planes (a version-3 family, when any delta has them)."""
    # the models side by side: the members, plus the base when the user gave one
    raw_bytes = (base_src.nbytes if origin.get("kind") in ("base", "bases") else 0) + sum(s.nbytes for s in sources)
    (tmp / DELTAS_DIR).mkdir(parents=True)
    entries: list[MemberEntry] = []
    reports: list[MemberReport] = []
    written: list[tuple[Source, str, list[Record], dict[str, int]]] = []
    pending: list[Future[Any]] = []
    # One writer thread writes the backbone while the first member is planned, then each delta's file from
    # its spool while the next member is planned (in that order: a delta's header names the backbone's
    # digest, known by then).
    with ThreadPoolExecutor(1) as writer:

        def write_backbone_files() -> tuple[FileRef, list[FileRef]]:
            """(the backbone's FileRef, or its shard list's; the shards' FileRefs, [] unsharded)."""
            sharded = write_backbone_sharded(base_src, tmp, max_shard_bytes, progress) if max_shard_bytes else None
            if sharded is not None:
                return sharded
            write_backbone(base_src, tmp / BACKBONE_NAME, progress)
            return FileRef.of(tmp, BACKBONE_NAME), []

        backbone_ref = writer.submit(write_backbone_files)
        pending.append(backbone_ref)
        try:
            options: dict[str, dict[str, str]] = {}
            if budget.global_target:
                backbone, shards = backbone_ref.result()
                options = allocate_family(
                    sources,
                    base_src,
                    budget,
                    backbone.size + sum(r.size for r in shards),
                    progress,
                    alignments,
                    raw_bytes,
                    workers,
                )
            for src in sources:
                rel = f"{DELTAS_DIR}/{src.name}.safetensors"
                # what does not align is stored dense: all of an unrelated member (stored whole, compressed)
                records, sizes = write_delta(
                    src,
                    base_src,
                    lambda: backbone_ref.result()[0].sha256,
                    tmp / rel,
                    budget,
                    progress,
                    options.get(src.name),
                    fast_load,
                    alignments[src.name],
                    workers,
                    executor,
                    device,
                    writer,
                    pending,
                )
                written.append((src, rel, records, sizes))
        finally:
            for fut in pending:  # every file done (or failed) before this returns or raises
                fut.exception()
        for fut in pending:
            fut.result()
        backbone, shards = backbone_ref.result()
    # raised to 3 by a delta with bit planes, to 4 by low-precision tensors anywhere
    version = backbone_version(base_src, SHARDED_FORMAT_VERSION if shards else FORMAT_VERSION)
    for src, rel, records, sizes in written:
        al = alignments[src.name]
        version = max(version, delta_version(records))
        entry, rep = member_entry(src, tmp, rel, records, sizes, budget, al.related, alignment=al)
        entries.append(entry)
        reports.append(rep)
    manifest = Manifest(
        backbone,
        entries,
        created_by=f"wfactor {__version__}",
        format_version=version,
        backbone_origin=origin,
        backbone_shards=shards,
    )
    manifest.write_atomic(tmp)
    fsync_dir(tmp)
    return manifest, reports


def alignments(
    sources: Sequence[Source],
    backbone: Source,
    rules: Sequence[Rule] = (),
    infer: bool = True,
    workers: int = 1,
) -> dict[str, Alignment]:
    """Each member aligned to ``backbone`` (:mod:`wfactor.align`; the verdict is `wfactor analyze`'s rule, one
    rule for both commands, spec/ANALYZE.md). The backbone itself, when it is a member, aligns by its names.
    With ``infer``, every tensor's content fingerprint (the candidate key of content alignment and tied
    weights, :func:`wfactor.arrays.fingerprint`; a match is then confirmed byte for byte) is computed first
    on ``workers`` threads (SHA-256 releases the GIL), then the members are aligned on ``workers`` threads,
    one member each."""
    if infer and workers > 1:
        models = [backbone] + [s for s in sources if s is not backbone]
        todo = [(m, k) for m in models for k in m.keys() if m.info(k).nbytes]
        for _ in ordered_map(lambda job: job[0].content(job[1]), todo, workers):
            pass
    index = BackboneIndex(backbone, content=infer)

    def one(s: Source) -> Alignment:  # members align independently: one per worker (the index is read-only)
        return align(
            s, index, rules_for(s.name, rules), infer=infer, sample=VERDICT_SAMPLE, trust_identity=s is backbone
        )

    return {s.name: a for s, a in zip(sources, ordered_map(one, sources, workers, one_torch_thread))}


ESTIMATE_SHARE = 8  # every 8th tensor (by name, at least ESTIMATE_MIN of each member) is planned for the estimate
ESTIMATE_MIN = 8
ESTIMATE_SAMPLE_NOTE = f"every {ESTIMATE_SHARE}th tensor of each member (at least {ESTIMATE_MIN}), planned"


def estimate_family_bytes(
    sources: Sequence[Source], backbone: Source, aligned: dict[str, Alignment], budget: Budget, workers: int
) -> int:
    """An estimate of the family's bytes with ``backbone``: the backbone's bytes, plus for each member the
    planned bytes of a deterministic sample of its tensors (every ESTIMATE_SHARE-th by name, at least
    ESTIMATE_MIN), scaled up by the member's bytes over the sample's, plus its records' header estimate. A
    member that is the backbone itself costs its headers only."""
    total = backbone.nbytes
    for src in sources:
        total += _header_overhead(src)
        if src is backbone:
            continue
        keys = src.keys()
        step = max(1, min(ESTIMATE_SHARE, len(keys) // ESTIMATE_MIN))
        sample = keys[::step]
        mapping = aligned[src.name].mapping
        tensor_budget = member_budget(src, budget)
        if tensor_budget.global_target:
            tensor_budget = Budget(max_rel_error=budget.max_rel_error)  # a per-tensor estimate of its share

        def planned(key: str, src: Source = src, mapping: dict[str, str] = mapping, b: Budget = tensor_budget) -> int:
            return plan_member_tensor(src, backbone, key, mapping.get(key), b, None, False, 0).nbytes

        got = sum(ordered_map(planned, sample, workers, one_torch_thread))
        share = sum(src.info(k).nbytes for k in sample)
        total += int(round(got * (src.nbytes / share))) if share else 0
    return total


def _unrelated(aligned: dict[str, Alignment]) -> set[str]:
    return {name for name, a in aligned.items() if not a.related}


_P = ParamSpec("_P")
_R = TypeVar("_R")




def check_device(device: str, executor: str = "local") -> str:
    """The planning device: ``cpu``, or ``cuda``/``cuda:N`` when torch sees that GPU (else a one-line error).
    On CUDA, torch's deterministic algorithms are switched on (and cuBLAS given the fixed workspace that
    needs), so that a GPU plans the same bytes every run."""
    import re

    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:[0-9]+)?", device):
        raise InputError(f"--device must be cpu, cuda or cuda:N, found {device!r}")
    if executor != "local":
        raise InputError("--device cuda plans on this machine's GPU: drop --executor ray (Ray workers plan on CPU)")
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        why = (
            f"torch {torch.__version__} is a CPU-only build"
            if torch.version.cuda is None
            else f"torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s)"
        )
        raise InputError(f"--device {device}: no such CUDA device ({why}); plan on the CPU (--device cpu, the default)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    return device


def single_threaded(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with one torch thread: matrix products and SVDs sum in an order that depends on the thread
    count, and the low-rank factors and the measured errors are written to the family. With the count fixed,
    the same inputs and options give byte-identical files on every machine setting (tests/test_determinism.py)."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        budget = next((a for a in (*args, *kwargs.values()) if isinstance(a, Budget)), None)
        lossless = budget is not None and budget.lossless
        bounded_heap(streaming=lossless)
        # Lossy planning is torch's: it is loaded here and held to one thread. A lossless run is torch-free
        # (wfactor.exact); its quantised weights, if any, load torch later and are planned elementwise, which
        # gives the same bytes on any number of threads.
        if not lossless:
            import torch  # noqa: F401
        torch_mod = sys.modules.get("torch")
        before = torch_mod.get_num_threads() if torch_mod is not None else None
        one_torch_thread()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch_mod is not None and before is not None:
                torch_mod.set_num_threads(before)

    return run


@single_threaded
def factor(
    members: Sequence[str],
    base: str | Sequence[str] | None,
    out: str | os.PathLike[str],
    budget: Budget | None = None,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | str | None = None,
    fast_load: bool = False,
    maps: Sequence[str | Rule] = (),
    infer: bool = True,
    workers: int | None = None,
    exhaustive: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    backbone_dtype: str = "keep",
    device: str = "cpu",
) -> FactorReport:
    """Factor ``members`` (each ``[NAME=]PATH``) into a family directory ``out``.

    ``base``: a path, or several ``NAME=PATH`` (one backbone holding each base under its tower namespace
    ``NAME/``, spec/FORMAT.md section 2.2). Every member is aligned to the backbone before planning
    (:mod:`wfactor.align`): same names, the ``maps`` rules (``[MEMBER:]FROM=TO``), prefix rules inferred from
    names and shapes and kept only where the aligned tensors are related, and bit-identical content. What
    aligns is delta-coded, the rest of the member stored dense. ``infer=False``: same names and ``maps`` only.

    ``executor="ray"`` plans the members' tensors as Ray tasks (:mod:`wfactor.distributed`; ``ray_address``,
    else ``RAY_ADDRESS``, else a local Ray instance) and writes the same bytes as a local run.

    ``workers``: tensors planned at once, on threads (default: every available core). Each tensor is planned
    on one thread with one torch thread, so the family's bytes are the same for any number of workers; memory
    grows by about ``2 * workers`` tensors being planned (each a few times its size) over one worker.

    ``max_shard_size`` (bytes, or "2GB", "1.5GiB") splits a backbone larger than that into shards (a
    version-2 family, spec/FORMAT.md section 2.1); without it, or when it fits, the backbone is one file.

    Side effect on Linux: glibc's mmap threshold is fixed for the rest of the process, at 1 MiB (16 MiB by a
    first factoring that is lossless; :func:`bounded_heap`), which keeps memory bounded while streaming: later
    allocations above it are fresh mappings, returned to the system when freed.

    ``fast_load``: k-bit codes are stored as bit planes rather than zstd frames (a version-3 family,
    spec/FORMAT.md section 4.3): a loader uses them without decoding (``wfactor.torch.attach`` keeps them as
    they are; a GPU can unpack them), for ~1% more bytes at 5-8 bits and ~25% more at 3-4 bits.

    With ``base``, the base becomes the backbone. Without it, the medoid member and the element-wise
    consensus of the related members are the candidates: each one's family bytes are estimated from a
    deterministic sample of tensors (:func:`estimate_family_bytes`) and only the smaller is factored;
    ``exhaustive=True`` factors both and keeps the smaller (twice the work). Members unrelated to
    the backbone are stored whole and flagged (``MemberReport.related``). Returns what was written, per
    member: bytes, ratio, worst error, codecs.

    ``backbone_dtype="fp8"`` stores the backbone's floating-point matrices in F8_E4M3 with one scale per row
    (:class:`wfactor.quantized.Fp8Backbone`, a version-4 family): a resident backbone takes a quarter of
    float32's memory, half of bfloat16's. Each member is planned, within ``budget``, as its change from the
    base carried over onto that fp8 view, so rebuilt members carry the backbone's fp8 rounding (as an fp8
    checkpoint does) on top of the budget. Not with a lossless budget, quantised members or Ray.

    ``device="cuda"`` (or ``"cuda:N"``) plans on that GPU: SVDs, quantisation searches and error measurements
    run there, parts are encoded on the host. The bytes are the same for any number of workers and from run
    to run on the same GPU model with the same torch and CUDA versions (deterministic algorithms are required,
    :func:`check_device`); another device type (the CPU) rounds SVDs and products differently, so its lossy
    records differ in their last bits. Lossless families are the same bytes on every device.
    """
    budget = budget or Budget()
    budget.validate()
    n_workers = resolve_workers(workers)
    device = check_device(device, executor)
    if backbone_dtype not in ("keep", "fp8"):
        raise InputError(f"--backbone-dtype must be keep or fp8, found {backbone_dtype!r}")
    if backbone_dtype == "fp8" and (budget.lossless or executor != "local"):
        raise InputError(
            "--backbone-dtype fp8 rounds the backbone, so members cannot come back bit for bit: drop "
            + ("--lossless" if budget.lossless else "--executor ray (an fp8 backbone is planned locally)")
        )
    if executor not in ("local", "ray"):
        raise InputError(f"--executor must be local or ray, found {executor!r}")
    remote: Any = None
    if executor == "ray":
        from .distributed import RayExecutor

        remote = RayExecutor(ray_address)
    from .format.shards import parse_size

    max_shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    out = Path(out)
    recover(out)  # what a killed earlier run left beside ``out``: restore an interrupted swap, drop temp dirs
    if out.exists() and not force:
        raise InputError(f"{out}: already exists; choose another -o or pass --force to replace it")
    if not members:
        raise InputError("no members given: pass at least one [NAME=]PATH")
    bases = [] if base is None else [base] if isinstance(base, str) else list(base)
    rules = [r if isinstance(r, Rule) else parse_map(r) for r in maps]
    peft_base = split_base(bases[0])[1] if len(bases) == 1 else None  # the base of PEFT adapter members
    opened: list[Source] = []
    sources: list[Source] = []
    try:
        for arg in members:
            src = open_source(arg, base=peft_base)  # a PEFT adapter directory is base + adapter
            opened.append(src)
            check_member_name(src.name, arg)
            if any(s.name == src.name for s in sources):
                raise InputError(f"{arg}: member name {src.name!r} is used twice; name members with NAME=PATH")
            sources.append(src)
        check_rule_members(rules, [s.name for s in sources])
        candidates: list[tuple[Source, dict[str, Any], dict[str, Alignment]]] = []
        out.parent.mkdir(parents=True, exist_ok=True)
        work = temp_name(out)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        try:
            if bases:
                base_src, base_origin = open_bases(bases)
                opened.append(base_src)
                candidates.append((base_src, base_origin, alignments(sources, base_src, rules, infer, n_workers)))
            else:
                dist = pairwise(sources)
                everyone = list(range(len(sources)))
                center = medoid(dist, everyone, widest(sources, everyone))
                first = _unrelated(alignments(sources, sources[center], rules, infer, n_workers))
                related = [i for i in everyone if sources[i].name not in first]
                center = medoid(dist, related, widest(sources, related))
                aligned = alignments(sources, sources[center], rules, infer, n_workers)
                unrelated = _unrelated(aligned)
                related = [i for i in everyone if sources[i].name not in unrelated]
                med = sources[center]
                candidates.append((med, {"kind": "medoid", "member": med.name}, aligned))
                if len(related) > 1:
                    write_consensus([sources[i] for i in related], work / "consensus.safetensors")
                    cons = open_source(str(work / "consensus.safetensors"), name="consensus")
                    opened.append(cons)
                    origin = {"kind": "consensus", "members": [sources[i].name for i in related]}
                    candidates.append((cons, origin, alignments(sources, cons, rules, infer, n_workers)))
            estimated: dict[str, int] = {}
            if len(candidates) > 1 and not exhaustive:
                # estimate each candidate's family from a sample of tensors, then factor only the smallest
                est = [estimate_family_bytes(sources, c[0], c[2], budget, n_workers) for c in candidates]
                estimated = {c[1]["kind"]: e for c, e in zip(candidates, est)}
                best = min(range(len(candidates)), key=lambda i: (est[i], i))
                candidates = [candidates[best]]
            if backbone_dtype == "fp8":
                quantised = [s.name for s in sources if s.stored_lossless]
                if quantised:
                    raise InputError(
                        f"member {quantised[0]!r} is a quantised checkpoint; --backbone-dtype fp8 factors float "
                        "members only (factor quantised checkpoints against a float backbone)"
                    )
            results = []
            for k, (bsrc, origin, aligned) in enumerate(candidates):
                tmp = work / f"family-{k}"
                written = bsrc
                if backbone_dtype == "fp8":
                    from .quantized import Fp8Backbone

                    written = Fp8Backbone(bsrc.name, bsrc.path, [], inner=bsrc)
                    origin = dict(origin, backbone_dtype="fp8")
                _man, reports = _write_family(
                    sources, written, tmp, budget, aligned, origin, progress, max_shard_bytes, fast_load, n_workers,
                    remote, device,
                )  # fmt: skip
                size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
                results.append((size, k, tmp, reports, bsrc))
            size, k, chosen, reports, bsrc = min(results, key=lambda r: (r[0], r[1]))
            tried = {candidates[r[1]][1]["kind"]: r[0] for r in results}
            extra: dict[str, Any] = {}
            if len(results) > 1:
                extra = {"tried_bytes": tried}
            elif estimated:
                extra = {"estimated_bytes": estimated, "sample": ESTIMATE_SAMPLE_NOTE}
            if extra:
                man = read_manifest(chosen)
                man.backbone_origin = dict(man.backbone_origin, **extra)
                man.write_atomic(chosen)
            # the old family (if any) stays whole until the new one takes its name (spec 9.1)
            replace_dir(chosen, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        backbone_size = read_manifest(out).backbone_bytes
        rep = FactorReport(out, backbone_size, bsrc.nbytes if bases else 0, reports, budget)
        rep.backbone_origin = dict(candidates[k][1], **(extra or {"tried_bytes": tried}))
        if backbone_dtype == "fp8":
            rep.backbone_origin["backbone_dtype"] = "fp8"
        return rep
    finally:
        for s in opened:
            s.close()
