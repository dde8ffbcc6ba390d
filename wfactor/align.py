"""Alignment: which backbone tensor each member tensor is predicted from (spec/ANALYZE.md section 4).

One tower often lives in several models under other names: a chat model's ``model.layers.3.mlp.up_proj``
is a VLM's ``model.language_model.layers.3.mlp.up_proj`` and a reranker's ``model.layers.3...`` next to
its own ``score``; a T5 encoder is ``encoder.*`` in one model, ``text_encoder_3/encoder.*`` in a pipeline
and ``language_model.encoder.*`` in BLIP-2. Before planning, every member tensor is matched to a backbone
tensor, in this order:

1. **Explicit rules** (``--map [MEMBER:]FROM=TO``): a member tensor ``FROM<rest>`` is predicted from the
   backbone tensor ``TO<rest>``. Taken as given (their verdict is reported), first to last; a rule that
   maps nothing, or maps a tensor onto one of another number of dimensions or kind, is an error.
2. **Name rules**, identity first: ``""=""`` (the same name) and prefix rewrites inferred from names and
   shapes. For each member tensor the longest ``.``/``/``-bounded suffix (of at least two components) that
   ends some backbone name proposes the rule that swaps the two prefixes; each proposal is scored by the
   bytes it maps onto backbone tensors of the very same shape. Rules are tried by score (ties: fewer
   characters, then alphabetical: the same choice every run), each on the tensors no earlier rule took,
   and kept only if those tensors are related by the verdict of `wfactor analyze` (drift, not names:
   an unrelated model with matching shapes and names is not aligned).
3. **Content**: a member tensor bit-identical (dtype, shape, bytes) to a backbone tensor is an identical
   reference to it, whatever the names (constant tensors excepted: equal bytes say nothing about a
   relation there). It replaces a rule's choice unless that choice is bit-identical too.

A member is related when any of its tensors aligns; the rest of it is stored dense. The result is data
(:class:`Alignment`); ``factor`` records it in the deltas' records (``base`` names) and, when it is more
than the identity, in the manifest's member plan (informative).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .drift import compare_tensor, summarize, verdict
from .errors import MapError
from .format.constants import FLOAT_DTYPES, MEMBER_NAME_RE
from .format.safetensors_io import TensorInfo
from .sources import Source

SEPARATORS = "./"
MIN_SUFFIX_PARTS = 2  # ".weight" alone would pair any two layers
MAX_PER_SUFFIX = 8  # backbone names proposed per member tensor (a suffix shared by more says little)
MAX_CANDIDATES = 64  # inferred rules evaluated per member, by votes
VERDICT_SAMPLE = 1 << 16  # elements per tensor read for a rule's verdict (factor's relatedness sample)

ContentKey = tuple[str, tuple[int, ...], str]  # (dtype, shape, fingerprint of the bytes: Source.content)


@dataclass(frozen=True)
class Rule:
    """``src<rest>`` in the member is ``dst<rest>`` in the backbone; ``member``: only for that member."""

    src: str
    dst: str
    member: str | None = None

    def apply(self, name: str) -> str | None:
        return self.dst + name[len(self.src) :] if name.startswith(self.src) else None

    @property
    def label(self) -> str:
        return f"{self.src}={self.dst}"


IDENTITY = Rule("", "")


def parse_map(arg: str) -> Rule:
    """``[MEMBER:]FROM=TO`` -> Rule (``FROM`` or ``TO`` may be empty: ``bert.=`` drops a prefix)."""
    if "=" not in arg:
        raise MapError(
            f"--map {arg!r}: expected [MEMBER:]FROM=TO, a prefix of the member's tensor names and the backbone "
            "prefix it stands for (e.g. --map vlm:model.language_model.=model.)"
        )
    left, dst = arg.split("=", 1)
    member = None
    if ":" in left:
        head, rest = left.split(":", 1)
        if MEMBER_NAME_RE.match(head):
            member, left = head, rest
    if left == dst:
        raise MapError(f"--map {arg!r}: FROM and TO are the same prefix; same names are aligned without a rule")
    return Rule(left, dst, member)


def _kind_compatible(m: TensorInfo, b: TensorInfo) -> bool:
    """Can ``b`` predict ``m`` (spec 4.1): as many dimensions; both floating point, or the same integer dtype."""
    if len(m.shape) != len(b.shape):
        return False
    mf, bf = m.dtype in FLOAT_DTYPES, b.dtype in FLOAT_DTYPES
    return mf == bf and (mf or m.dtype == b.dtype)


def _suffixes(name: str) -> Iterable[tuple[int, str]]:
    """(start, suffix) of every separator-bounded suffix with at least MIN_SUFFIX_PARTS parts, longest first."""
    starts = [0] + [i + 1 for i, c in enumerate(name) if c in SEPARATORS]
    for i in starts:
        s = name[i:]
        if sum(s.count(c) for c in SEPARATORS) + 1 >= MIN_SUFFIX_PARTS:
            yield i, s


class BackboneIndex:
    """A backbone's names by suffix and its tensors by content, built once per backbone (one read of it)."""

    def __init__(self, backbone: Source, content: bool = True) -> None:
        self.source = backbone
        self.infos = {k: backbone.info(k) for k in backbone.keys()}
        self.by_suffix: dict[str, list[str]] = {}
        for k in self.infos:  # sorted: the lists are in name order
            for _i, s in _suffixes(k):
                self.by_suffix.setdefault(s, []).append(k)
        self.by_content: dict[ContentKey, list[str]] = {}  # candidates, in name order (Source.same_bytes decides)
        self.content_of: dict[str, ContentKey] = {}
        if content:
            for k, info in self.infos.items():
                if info.nbytes == 0:
                    continue
                ck, constant = backbone.content(k)
                self.content_of[k] = ck
                if not constant:  # equal bytes of constant tensors say nothing about a relation
                    self.by_content.setdefault(ck, []).append(k)


@dataclass
class RuleUse:
    """One rule as tried on one member: what it maps, whether it was kept, and why."""

    rule: Rule
    origin: str  # explicit | identity | inferred
    accepted: bool
    tensors: int = 0  # tensors it aligned (accepted) or would have (rejected)
    nbytes: int = 0
    reason: str = ""
    median_drift: float | None = None  # byte-weighted median rel_drift of its sampled matrices

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.rule.src,
            "to": self.rule.dst,
            "origin": self.origin,
            "accepted": self.accepted,
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "median_drift": None if self.median_drift is None else float(f"{self.median_drift:.4g}"),
            "reason": self.reason,
        }


@dataclass
class Alignment:
    """Member tensor -> backbone tensor, with how each was found and what was left member-only."""

    member: str
    mapping: dict[str, str] = field(default_factory=dict)
    via: dict[str, str] = field(default_factory=dict)  # member tensor -> rule label, or "content"
    rules: list[RuleUse] = field(default_factory=list)
    member_bytes: int = 0
    aligned_bytes: int = 0
    content_tensors: int = 0  # aligned by content to a tensor no rule gave it
    content_bytes: int = 0
    member_only: list[str] = field(default_factory=list)
    member_only_bytes: int = 0
    reason: str = ""  # the verdict's words (of the identity rule when it is the only one tried)

    @property
    def related(self) -> bool:
        return bool(self.mapping)

    @property
    def aligned_share(self) -> float:
        return self.aligned_bytes / self.member_bytes if self.member_bytes else 0.0

    @property
    def accepted(self) -> list[RuleUse]:
        return [u for u in self.rules if u.accepted]

    @property
    def trivial(self) -> bool:
        """Only same names (or nothing) aligned: what a family without towers records (no alignment entry)."""
        return self.content_tensors == 0 and all(u.rule == IDENTITY for u in self.accepted)

    def to_json(self, names: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rules": [u.to_json() for u in self.rules],
            "aligned_tensors": len(self.mapping),
            "aligned_bytes": self.aligned_bytes,
            "aligned_share": round(self.aligned_share, 6),
            "by_content": self.content_tensors,
            "by_content_bytes": self.content_bytes,
            "member_only_tensors": len(self.member_only),
            "member_only_bytes": self.member_only_bytes,
        }
        if names:
            out["member_only"] = list(self.member_only)
        return out


def _propose(member: Source, index: BackboneIndex) -> list[Rule]:
    """Inferred prefix rewrites, most voted first (at most MAX_CANDIDATES)."""
    votes: dict[Rule, int] = {}
    for m in member.keys():
        for i, s in _suffixes(m):
            hits = index.by_suffix.get(s)
            if hits:
                for b in hits[:MAX_PER_SUFFIX]:
                    r = Rule(m[:i], b[: len(b) - len(s)])
                    votes[r] = votes.get(r, 0) + 1
                break
    ranked = sorted(votes, key=lambda r: (-votes[r], len(r.src) + len(r.dst), r.src, r.dst))
    return ranked[:MAX_CANDIDATES]


def _pairs(rule: Rule, member: Source, index: BackboneIndex) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(member, backbone) pairs the rule maps, the bytes of those with equal shapes, and the names it maps onto
    a backbone tensor that cannot predict them (another number of dimensions or kind)."""
    pairs, bad = [], []
    exact = 0
    for m in member.keys():
        b = rule.apply(member.align_name(m))  # a packed quantised weight aligns as the float weight it holds
        if b is None or b not in index.infos:
            continue
        mi, bi = member.align_info(m), index.infos[b]
        if not _kind_compatible(mi, bi):
            bad.append(m)
            continue
        pairs.append((m, b))
        if tuple(mi.shape) == tuple(bi.shape):
            exact += mi.nbytes
    return pairs, exact, bad


def _rule_verdict(
    member: Source, backbone: Source, pairs: list[tuple[str, str]], sample: int | None
) -> tuple[bool, str, float | None]:
    """analyze's verdict over these pairs alone (member tensors compared with their aligned base tensors)."""
    analyses = []
    for m, b in pairs:
        bi = backbone.info(b)
        w, mdtype = member.analysis_array(m)  # a quantised weight: dequantised
        t = backbone.array(b)
        analyses.append(compare_tensor(m, w, t, member_dtype=mdtype, base_dtype=bi.dtype, ranks=False, sample=sample))
        del w, t
    summary, _groups = summarize(analyses)
    shares_nothing = not any(a.shape == a.base_shape for a in analyses)
    related, reason = verdict(summary, shares_nothing)
    return related, reason, summary.verdict_median_drift


def align(
    member: Source,
    index: BackboneIndex,
    rules: Sequence[Rule] = (),
    *,
    infer: bool = True,
    sample: int | None = VERDICT_SAMPLE,
    trust_identity: bool = False,
) -> Alignment:
    """Align ``member`` to the backbone of ``index`` (see the module docstring). ``rules``: the explicit ones
    for this member. ``infer=False``: same names and explicit rules only, no inferred rules and no content
    matches (how wfactor aligned before towers). ``trust_identity``: the member is the backbone itself (the
    medoid): same names are kept without a verdict."""
    backbone = index.source
    out = Alignment(member.name, member_bytes=member.nbytes)
    tried: list[tuple[Rule, str]] = [(r, "explicit") for r in rules]
    tried.append((IDENTITY, "identity"))
    if infer:
        tried += [(r, "inferred") for r in _propose(member, index) if r != IDENTITY and r not in rules]
    evaluated = []
    for rule, origin in tried:
        pairs, exact, bad = _pairs(rule, member, index)
        if origin == "explicit":
            where = f"--map {(rule.member + ':') if rule.member else ''}{rule.label} ({member.name})"
            if bad:
                mi, bi = member.info(bad[0]), index.infos[rule.apply(bad[0]) or ""]
                raise MapError(
                    f"{where}: tensor {bad[0]!r} is {list(mi.shape)} x {mi.dtype}, its backbone tensor "
                    f"{rule.apply(bad[0])!r} {list(bi.shape)} x {bi.dtype}: it cannot be predicted from it; "
                    "fix FROM/TO"
                )
            if not pairs or exact == 0:
                hint = (
                    "no member tensor starts with FROM"
                    if not any(k.startswith(rule.src) for k in member.keys())
                    else "no FROM tensor has a TO tensor of its shape in the backbone"
                )
                raise MapError(f"{where}: maps no tensor: {hint}; check the names with `wfactor inspect` or analyze")
        if exact == 0:
            continue
        evaluated.append((rule, origin, pairs, exact))
    head = [e for e in evaluated if e[1] != "inferred"]
    rest = sorted(
        (e for e in evaluated if e[1] == "inferred"),
        key=lambda e: (-e[3], -len(e[2]), len(e[0].src) + len(e[0].dst), e[0].src, e[0].dst),
    )
    identity_reason = ""
    for rule, origin, pairs, _exact in head + rest:
        free = [(m, b) for m, b in pairs if m not in out.mapping]
        if not free:
            continue
        median: float | None
        if origin == "identity" and trust_identity:
            related, reason, median = True, "the backbone itself", 0.0
        else:
            related, reason, median = _rule_verdict(member, backbone, free, sample)
        if origin == "identity":
            identity_reason = reason
        accepted = related or origin == "explicit"
        use = RuleUse(rule, origin, accepted, len(free), sum(member.info(m).nbytes for m, _ in free), reason, median)
        out.rules.append(use)
        if accepted:
            for m, b in free:
                out.mapping[m] = b
                out.via[m] = rule.label
    # content: a bit-identical backbone tensor, whatever its name
    for m in member.keys() if infer else ():
        info = member.info(m)
        if info.nbytes == 0:
            continue
        ck, _constant = member.content(m)
        candidates = index.by_content.get(ck)
        if not candidates:
            continue
        have = out.mapping.get(m)
        if have is not None and index.content_of.get(have) == ck and member.same_bytes(m, index.source, have):
            continue  # the rule's base is bit-identical already
        same = next((b for b in candidates if member.same_bytes(m, index.source, b)), None)
        if same is None:
            continue
        out.mapping[m] = same
        out.via[m] = "content"
        out.content_tensors += 1
        out.content_bytes += info.nbytes
    out.aligned_bytes = sum(member.info(m).nbytes for m in out.mapping)
    out.member_only = [m for m in member.keys() if m not in out.mapping]
    out.member_only_bytes = sum(member.info(m).nbytes for m in out.member_only)
    if out.trivial:
        out.reason = identity_reason or (
            "no tensor has both a name and a shape in common with the base: a different architecture"
        )
    elif out.related:
        kept = [f"{u.rule.label!r} ({u.tensors} tensors: {u.reason})" for u in out.accepted]
        if out.content_tensors:
            kept.append(f"{out.content_tensors} bit-identical by content")
        out.reason = f"aligned {out.aligned_share:.0%} of its bytes: " + ", ".join(kept)
    else:
        out.reason = "no part aligns with the backbone: " + (
            identity_reason or "no rule maps its tensors onto related backbone tensors"
        )
    return out


def rules_for(member: str, rules: Sequence[Rule]) -> list[Rule]:
    """The explicit rules that apply to ``member`` (its own, and those without a member), in order."""
    return [r for r in rules if r.member is None or r.member == member]


def check_rule_members(rules: Sequence[Rule], members: Sequence[str]) -> None:
    for r in rules:
        if r.member is not None and r.member not in members:
            raise MapError(f"--map {r.member}:{r.label}: no member named {r.member!r} (members: {', '.join(members)})")
