"""How a set of models relates to one base, tensor by tensor: the numbers that say whether a family is worth
factoring, and which members belong in it (spec/ANALYZE.md describes every figure and the verdict rule).

    report = analyze(["chat=ckpt/chat", "ckpt/code"], base="ckpt/base")
    report = analyze(["ckpt/base", "ckpt/chat"], base=None)   # the first model is the base

Inputs are opened with :func:`wfactor.sources.open_source` and read one tensor at a time through memory
maps: at any moment only one member tensor, its base tensor and their difference are in memory, and the
float64 statistics run over chunks of them. Nothing here renders; the CLI does (``wfactor analyze``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .align import Alignment, BackboneIndex, Rule, align, check_rule_members, parse_map, rules_for
from .drift import (  # noqa: F401  (re-exported: the drift figures are part of this module's API)
    FULL_SVD_MAX_DIM,
    RANDOM_SVD_SEED,
    RANK_ENERGY,
    RELATED_MAX_DRIFT,
    RELATED_MIN_CLOSE_SHARE,
    STATUSES,
    GroupSummary,
    MemberSummary,
    Progress,
    TensorAnalysis,
    compare_tensor,
    component_summaries,
    effective_rank,
    group_of,
    json_number,
    natural_key,
    summarize,
    verdict,
)
from .errors import InputError
from .inputs import open_bases, open_source
from .sources import Source
from .version import __version__

ANALYSIS_VERSION = 1


@dataclass
class MemberAnalysis:
    """One member: the verdict, its summaries, and every tensor (member's tensors, then base-only ones)."""

    name: str
    path: str
    related: bool
    reason: str
    shares_nothing: bool
    summary: MemberSummary
    groups: list[GroupSummary]
    tensors: list[TensorAnalysis]
    components: list[GroupSummary] = field(default_factory=list)  # pipeline members only (spec/ANALYZE.md 3)
    alignment: dict[str, Any] | None = None  # spec/ANALYZE.md 4: rules, coverage, member-only tensors

    def tensor(self, name: str) -> TensorAnalysis:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def group(self, name: str) -> GroupSummary | None:
        for g in self.groups:
            if g.name == name:
                return g
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "related": self.related,
            "reason": self.reason,
            "shares_nothing": self.shares_nothing,
            "summary": self.summary.to_json(),
            "components": [c.to_json() for c in self.components],
            "alignment": self.alignment,
            "groups": [g.to_json() for g in self.groups],
            "tensors": [t.to_json() for t in self.tensors],
        }


@dataclass
class ModelInfo:
    name: str
    path: str
    tensors: int
    nbytes: int


@dataclass
class AnalysisReport:
    """The whole analysis: the base, the members in argument order, and the layer blocks in model order."""

    base: ModelInfo
    models: list[MemberAnalysis]
    groups: list[str] = field(default_factory=list)
    ranks: bool = True

    def member(self, name: str) -> MemberAnalysis:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """The stable JSON document of spec/ANALYZE.md (RFC 8259: non-finite numbers are null)."""
        return {
            "analysis_version": ANALYSIS_VERSION,
            "created_by": f"wfactor {__version__}",
            "base": {
                "name": self.base.name,
                "path": self.base.path,
                "tensors": self.base.tensors,
                "bytes": self.base.nbytes,
            },
            "thresholds": {
                "related_max_drift": RELATED_MAX_DRIFT,
                "related_min_close_share": RELATED_MIN_CLOSE_SHARE,
                "rank_energy": RANK_ENERGY,
            },
            "ranks": self.ranks,
            "groups": list(self.groups),
            "models": [m.to_json() for m in self.models],
        }


# -- the analysis ----------------------------------------------------------------------------------------
def analyze_member(
    member: Source,
    base: Source,
    *,
    ranks: bool = True,
    progress: Progress | None = None,
    sample: int | None = None,
    alignment: Alignment | None = None,
) -> MemberAnalysis:
    """Compare one opened member with the opened base, one tensor pair at a time (``sample``: see
    ``compare_tensor``). ``alignment`` (:func:`wfactor.align.align`) says which base tensor each member tensor
    is compared with; without it, tensors are compared by name. A member tensor the alignment leaves out is
    still compared with the base tensor of its name, if any, for information; the verdict is the alignment's
    when it is more than same names."""
    tensors: list[TensorAnalysis] = []
    total = member.nbytes
    done = 0
    mapping = alignment.mapping if alignment is not None else {}
    for key in member.keys():
        info = member.info(key)
        own = member.align_name(key)
        bname = mapping.get(key, own if own in base else None)
        if bname is None:
            ta = TensorAnalysis(
                key, group_of(key), "only_in_member", False, list(info.shape), info.dtype, None, None, info.nbytes
            )
        else:
            binfo = base.info(bname)
            w, mdtype = member.analysis_array(key)  # a quantised weight: its dequantised values
            b = base.array(bname)
            ta = compare_tensor(key, w, b, member_dtype=mdtype, base_dtype=binfo.dtype, ranks=ranks, sample=sample)
            ta.base = bname
            del w, b
        tensors.append(ta)
        done += info.nbytes
        if progress is not None:
            progress(member.name, done, total)
    used = {t.base for t in tensors if t.base is not None}
    for key in base.keys():
        if key not in used:
            binfo = base.info(key)
            tensors.append(
                TensorAnalysis(
                    key, group_of(key), "only_in_base", False, None, None, list(binfo.shape), binfo.dtype, binfo.nbytes
                )
            )
    summary, groups = summarize(tensors)
    shares_nothing = not any(t.shape is not None and t.shape == t.base_shape for t in tensors)
    related, reason = verdict(summary, shares_nothing)
    if alignment is not None and not alignment.trivial:
        related, reason = alignment.related, alignment.reason
    from .pipelines import PipelineSource

    pipeline = isinstance(member, PipelineSource) or isinstance(base, PipelineSource)
    comps = component_summaries(tensors) if pipeline else []
    out = MemberAnalysis(
        member.name, str(member.path), related, reason, shares_nothing, summary, groups, tensors, comps
    )
    if alignment is not None:
        out.alignment = alignment_json(alignment, tensors)
    return out


def alignment_json(alignment: Alignment, tensors: list[TensorAnalysis]) -> dict[str, Any]:
    """The alignment of one member with, per rule, the drift of the blocks it aligned (spec/ANALYZE.md 4)."""
    out = alignment.to_json()
    by_name = {t.name: t for t in tensors if t.status != "only_in_base"}
    for use, js in zip(alignment.rules, out["rules"]):
        mine = [by_name[m] for m, via in alignment.via.items() if via == use.rule.label and m in by_name]
        js["blocks"] = [g.to_json() for g in summarize(mine)[1]] if use.accepted else []
    return out


def analyze(
    members: Sequence[str],
    base: str | Sequence[str] | None = None,
    *,
    ranks: bool = True,
    progress: Progress | None = None,
    maps: Sequence[str | Rule] = (),
    infer: bool = True,
) -> AnalysisReport:
    """Compare each ``[NAME=]PATH`` in ``members`` with ``base``, tensor by tensor, after aligning each member
    to the base (:mod:`wfactor.align`: same names, ``maps`` rules ``[MEMBER:]FROM=TO``, inferred prefix
    rules, bit-identical content; ``infer=False`` skips the inferred ones).

    ``base`` is a path, or several ``NAME=PATH`` (one backbone with a tower per base). Without ``base`` the
    first of ``members`` is the base and the others are analysed against it (this command does not choose a
    base itself). ``ranks=False`` skips the effective ranks (the SVDs are the slow part on large models).
    ``progress(member, bytes_done, bytes_total)`` is called after each tensor. Raises a WfactorError
    (one-line message) for unusable inputs.
    """
    args = list(members)
    if base is None or (not isinstance(base, str) and not base):
        if len(args) < 2:
            raise InputError("analyze needs a base: pass --base PATH, or at least two models (the first is the base)")
        base_args: list[str] = [args[0]]
        args = args[1:]
    else:
        base_args = [base] if isinstance(base, str) else list(base)
        if not args:
            raise InputError("no members given: pass at least one [NAME=]PATH to compare with the base")
    rules = [r if isinstance(r, Rule) else parse_map(r) for r in maps]
    opened: list[Source] = []
    try:
        base_src, _origin = open_bases(base_args, name=None)
        opened.append(base_src)
        seen: set[str] = set()
        peft_base = base_args[0] if len(base_args) == 1 else None
        for a in args:
            src = open_source(a, base=peft_base)  # a PEFT adapter directory is base + adapter
            opened.append(src)
            if src.name in seen:
                raise InputError(f"{a}: member name {src.name!r} is used twice; name members with NAME=PATH")
            seen.add(src.name)
        check_rule_members(rules, [s.name for s in opened[1:]])
        index = BackboneIndex(base_src, content=infer)
        models = []
        for src in opened[1:]:
            al = align(src, index, rules_for(src.name, rules), infer=infer)
            models.append(analyze_member(src, base_src, ranks=ranks, progress=progress, alignment=al))
        names = set(base_src.keys())
        for m in models:
            names.update(t.name for t in m.tensors)
        groups = sorted({group_of(n) for n in names}, key=natural_key)
        info = ModelInfo(base_src.name, str(base_src.path), len(base_src.keys()), base_src.nbytes)
        return AnalysisReport(info, models, groups, ranks)
    finally:
        for src in opened:
            src.close()
