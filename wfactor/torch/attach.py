"""attach(): load a family member into a torch module, keeping low-rank deltas factored and backbone
tensors shared (no copies).

Which tensors stay factored: a weight of an ``nn.Linear`` (or an ``nn.Embedding`` without ``max_norm``)
whose record is exactly ``base + lowrank``, ``base + quant`` or ``base + lowrank + quant``, with no
residual and no tie (``same_as``), and whose backbone tensor has the member tensor's shape (the arithmetic
runs in the backbone tensor's dtype, the result is returned in the member's). Every other tensor is taken from
``family.iter_tensors`` (the same values as ``family.state_dict``): tensors identical to the backbone are
the backbone's own cached tensors there, so they stay shared; the rest are materialised per member.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..codecs import quant
from ..errors import CodecError, InputError
from ..family import Family
from ..format.delta import DeltaFile
from ..format.manifest import TensorMeta
from ..format.parts import read_parts, read_planes
from ..format.records import Record
from ..loader import to_device
from ..tensors import TORCH_DTYPES, format_dtype
from .layers import FactoredEmbedding, FactoredLinear, unpack_codes


@dataclass
class LowRankFactors:
    """A member tensor W = backbone[base] + u @ v + diag(scales) codes: u [out, r] and v [r, in] in the backbone
    tensor's dtype (None without a low-rank term), codes [out, in] int8 and scales [out] float32 as stored
    (None without a quant term)."""

    base: str
    base_weight: torch.Tensor
    u: torch.Tensor | None
    v: torch.Tensor | None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    bits: int | None = None
    planes: torch.Tensor | None = None  # the codes as stored bit planes (uint8 [b, out, ceil(in / 8)])


FACTORED_TERMS = (("lowrank",), ("quant",), ("lowrank", "quant"))


def _simple_lowrank(rec: Record, backbone: dict[str, torch.Tensor]) -> bool:
    if rec.same_as is not None or rec.base is None or rec.residual is not None:
        return False
    if tuple(t.codec for t in rec.terms) not in FACTORED_TERMS or len(rec.shape) != 2:
        return False
    base = backbone.get(rec.base)
    target = TORCH_DTYPES.get(rec.dtype)
    return (
        base is not None
        and target is not None
        and target.is_floating_point
        and tuple(base.shape) == tuple(rec.shape)
        and base.dtype.is_floating_point
    )


def lowrank_factors(
    family: Family,
    name: str,
    device: str | torch.device = "cpu",
    only: set[str] | None = None,
    delta: DeltaFile | None = None,
) -> dict[str, LowRankFactors]:
    """The member's tensors that are ``backbone + U @ V`` exactly (see the module docstring), as factors.

    ``base_weight`` is the family's cached backbone tensor on ``device`` itself (``family.backbone(device)``);
    U and V are read from the delta and cast to that tensor's dtype. ``only`` restricts to those names.
    ``delta``: the member's delta already opened with ``family.open_delta`` (else it is opened here).
    """
    if delta is None:
        with family.open_delta(name) as d:
            return lowrank_factors(family, name, device, only, d)
    backbone = family.backbone(device)
    chosen = [
        rec
        for tname, rec in delta.records.items()
        if (only is None or tname in only) and _simple_lowrank(rec, backbone)
    ]
    where = {spec.key: f"{delta.file.path}: tensor {rec.name!r}" for rec in chosen for spec in rec.part_specs()}
    specs = [spec for rec in chosen for spec in rec.part_specs()]
    # codes stored as bit planes are kept as they are (checked, not unpacked); every other part is decoded
    planes = {s.key: read_planes(delta.file, s, where[s.key]) for s in specs if s.encoding == "bitplanes"}
    arrays = read_parts(delta.file, [s for s in specs if s.encoding != "bitplanes"], where)
    out: dict[str, LowRankFactors] = {}
    for rec in chosen:
        assert rec.base is not None
        base = backbone[rec.base]
        f = LowRankFactors(rec.base, base, None, None)
        for term in rec.terms:
            codes_spec = term.parts.get("codes")
            if term.codec == "quant" and codes_spec is not None and codes_spec.key in planes:
                scales_spec = term.parts["scales"]
                f.planes = to_device(planes.pop(codes_spec.key), "U8", base.device)
                f.scales = to_device(arrays.pop(scales_spec.key), scales_spec.dtype, base.device)
                f.scales = f.scales.reshape(rec.shape[0])
                continue
            parts = {
                role: to_device(arrays.pop(spec.key), spec.dtype, base.device)
                for role, spec in term.parts.items()
            }
            if term.codec == "lowrank":
                f.u, f.v = parts["u"].to(base.dtype), parts["v"].to(base.dtype)
            else:  # quant: int8 codes (checked against their bits), one float32 scale per row
                bits = int(term.params["bits"])
                codes = parts["codes"].reshape(rec.shape)
                if not quant.codes_in_range(codes, bits):
                    raise CodecError(
                        f"{where[term.parts['codes'].key]}: quant codes exceed +-{quant.qmax(bits)}, "
                        f"the range of {bits} bits"
                    )
                f.codes, f.scales, f.bits = codes, parts["scales"].reshape(rec.shape[0]), bits
        out[rec.name] = f
    return out


def _default_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _join(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def _factorable(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return type(mod).forward is nn.Linear.forward
    if isinstance(mod, nn.Embedding):
        return type(mod).forward is nn.Embedding.forward and mod.max_norm is None
    return False


def attach(
    module: nn.Module,
    family: Family,
    name: str,
    device: str | torch.device | None = None,
    component: str | None = None,
    packed: bool = True,
    rename: dict[str, str] | None = None,
) -> nn.Module:
    """Give ``module`` (built from the member's config) the weights of family member ``name``.

    Linear / Embedding layers whose weight is ``backbone + U @ V`` become ``FactoredLinear`` /
    ``FactoredEmbedding`` over the shared backbone tensor; every other parameter (and every buffer the
    member has) is loaded from the member, sharing the backbone's storage where identical. Parameters
    are frozen (``requires_grad=False``) and take the member's dtypes. Modifies ``module`` in place and
    returns it (or the replacement layer, if ``module`` itself is a factored Linear/Embedding).

    ``component`` (a pipeline member, e.g. ``"unet"``): ``module`` is that component's model and is matched
    with the component's tensors, namespace stripped. Components identical to the backbone in two members
    are the same backbone tensors in both modules.

    ``packed``: k-bit codes (b < 8) stay packed in b bit planes (b/8 byte per weight) and are unpacked per
    forward; False keeps them as int8 (one byte per weight, no unpacking).

    ``rename``: {member prefix: module prefix}, for a module whose parameter names differ from the checkpoint's
    (transformers 5 keeps LLaVA's ``language_model.model.*`` as ``model.language_model.*`` in memory:
    ``rename={"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
    "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}``); the
    longest matching prefix applies.

    Raises ``InputError`` naming the first module parameter the member lacks, the first member tensor the
    module lacks, or the first tensor whose shapes differ.
    """
    dev = torch.device(device) if device is not None else _default_device(module)
    entry = family.member(name)
    ns = family.component_prefix(name, component)  # "" or "<component>/"
    prefixes = sorted((rename or {}).items(), key=lambda kv: -len(kv[0]))

    def to_module(local: str) -> str:
        for src, dst in prefixes:
            if local.startswith(src):
                return dst + local[len(src) :]
        return local

    # a quantised member (packed int4/int8 codes, fp8 weights) runs materialised: its weights dequantised into
    # the float module built from its config (its float names and shapes), nothing kept factored
    deq = None
    if _quantised(family.records(name)):
        deq = family.state_dict(name, dev, component=component, dequantize=True)
        metas = {to_module(k): TensorMeta(ns + k, tuple(v.shape), format_dtype(v.dtype)) for k, v in deq.items()}
    else:
        metas = {to_module(t.name[len(ns) :]): t for t in entry.tensors if t.name.startswith(ns)}
    member_of = {mod_name: meta.name[len(ns) :] for mod_name, meta in metas.items()}
    where = f"{family.root}: member {name!r}" + (f", component {component!r}" if component else "")

    # -- inventory of the module's tensor slots (every alias of a tied tensor included) ----------------
    params: dict[str, tuple[nn.Module, str, nn.Parameter]] = {}
    buffers: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    modules: list[tuple[str, nn.Module]] = list(module.named_modules(remove_duplicate=False))
    for prefix, mod in modules:
        for local, p in mod._parameters.items():
            if p is not None:
                params[_join(prefix, local)] = (mod, local, p)
        for local, b in mod._buffers.items():
            if b is not None:
                buffers[_join(prefix, local)] = (mod, local, b)
    aliases: dict[int, list[str]] = {}
    for pname, (_, _, p) in params.items():
        aliases.setdefault(id(p), []).append(pname)

    # -- match names and shapes -------------------------------------------------------------------------
    for pname, (_, _, p) in params.items():
        if not any(a in metas for a in aliases[id(p)]):
            raise InputError(f"{where}: the module's parameter {pname!r} is not a tensor of the member")
    slots = {**{k: v[2] for k, v in params.items()}, **{k: v[2] for k, v in buffers.items()}}
    for local, meta in metas.items():
        if local not in slots:
            raise InputError(f"{where}: the member's tensor {local!r} is not a parameter or buffer of the module")
        have = tuple(slots[local].shape)
        if have != tuple(meta.shape):
            raise InputError(
                f"{where}: tensor {local!r} is {list(meta.shape)} in the member, {list(have)} in the module"
            )

    # -- which layers stay factored ---------------------------------------------------------------------
    candidates: dict[str, str] = {}  # weight tensor name -> module path
    for prefix, mod in modules:
        wname = _join(prefix, "weight")
        if deq is None and _factorable(mod) and wname in metas and len(aliases[id(mod.weight)]) == 1:
            candidates[wname] = prefix
    family.backbone(dev)  # fill the cache first, so identical tensors are the cached ones
    loaded: dict[str, torch.Tensor] = {}
    factors: dict[str, LowRankFactors] = {}
    if deq is not None:
        loaded = {to_module(k): v for k, v in deq.items()}
    else:
        loaded, factors = _load(family, name, dev, ns, component, candidates, member_of, to_module)
    return _install(module, params, buffers, aliases, loaded, factors, candidates, metas, modules, dev, where, packed)


def _quantised(records: dict[str, Record]) -> bool:
    """Whether a member holds weights predicted as quantised codes (requant records, F8 weights with scales)."""
    from ..quantized import dequantizable

    return any(dequantizable(n, r, records) for n, r in records.items())


def _load(
    family: Family,
    name: str,
    dev: torch.device,
    ns: str,
    component: str | None,
    candidates: dict[str, str],
    member_of: dict[str, str],
    to_module: Callable[[str], str],
) -> tuple[dict[str, torch.Tensor], dict[str, LowRankFactors]]:
    """The member's tensors for the module, and the factors of the layers that stay factored."""
    loaded: dict[str, torch.Tensor] = {}
    with family.open_delta(name) as delta:  # one digest check for both passes
        delta.file.prefetch()
        only = {ns + member_of[c] for c in candidates}
        found = lowrank_factors(family, name, dev, only, delta) if candidates else {}
        factors = {to_module(k[len(ns) :]): v for k, v in found.items()}
        # -- load everything else (backbone-identical tensors come back as the backbone's own) ---------
        skip = {member_of[k] for k in factors}
        for tname, t in family.iter_open(delta, name, dev, component=component, skip=skip):
            loaded[to_module(tname)] = t
    return loaded, factors


def _install(
    module: nn.Module,
    params: dict[str, tuple[nn.Module, str, nn.Parameter]],
    buffers: dict[str, tuple[nn.Module, str, torch.Tensor]],
    aliases: dict[int, list[str]],
    loaded: dict[str, torch.Tensor],
    factors: dict[str, LowRankFactors],
    candidates: dict[str, str],
    metas: dict[str, TensorMeta],
    modules: list[tuple[str, nn.Module]],
    dev: torch.device,
    where: str,
    packed: bool,
) -> nn.Module:
    """Put ``loaded`` into the module's parameters and buffers, and swap in the factored layers."""
    new_params: dict[int, nn.Parameter] = {}
    for pname, (owner, local, p) in params.items():
        if pname in factors:
            continue
        if id(p) not in new_params:
            src = next(a for a in aliases[id(p)] if a in loaded)
            new_params[id(p)] = nn.Parameter(loaded[src], requires_grad=False)
        owner._parameters[local] = new_params[id(p)]
    for bname, (owner, local, b) in buffers.items():
        if bname in loaded:
            owner._buffers[local] = loaded[bname]
        elif b.device.type == "meta":
            raise InputError(f"{where}: buffer {bname!r} is on the meta device and the member does not hold it")
        else:
            owner._buffers[local] = b.to(dev)

    # -- swap in the factored layers --------------------------------------------------------------------
    replaced: dict[int, nn.Module] = {}
    for wname, prefix in candidates.items():
        if wname not in factors:
            continue
        mod = module.get_submodule(prefix) if prefix else module
        f = factors[wname]
        if f.planes is not None and not packed:  # stored as bit planes, asked for int8: unpack once here
            f.codes = unpack_codes(f.planes, int(f.planes.shape[0]), int(f.base_weight.shape[1]))
            f.planes = None
        if id(mod) not in replaced:
            if isinstance(mod, nn.Linear):
                new: nn.Module = FactoredLinear(
                    f.base_weight, f.u, f.v, mod.bias, f.codes, f.scales, f.bits if packed else None, f.planes
                )
            else:
                assert isinstance(mod, nn.Embedding)
                new = FactoredEmbedding(
                    f.base_weight,
                    f.u,
                    f.v,
                    mod.padding_idx,
                    f.codes,
                    f.scales,
                    TORCH_DTYPES[metas[wname].dtype],
                    f.bits if packed else None,
                    f.planes,
                )
            replaced[id(mod)] = new
        if not prefix:
            return replaced[id(mod)]
    if replaced:
        for _prefix, mod in modules:
            for local, child in list(mod._modules.items()):
                if child is not None and id(child) in replaced:
                    mod._modules[local] = replaced[id(child)]
    return module
