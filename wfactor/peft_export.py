"""PEFT LoRA adapters, both ways: export a member whose deltas are low rank as a PEFT adapter directory, and
read a PEFT adapter directory (with its base model) as a member.

Export (``wfactor export-peft``). A member record ``W = B + U V`` (the ``lowrank`` codec, spec/FORMAT.md
section 4.2, against the backbone tensor of the same name and shape) is exactly a LoRA update
``W = B + scaling * lora_B @ lora_A`` with ``lora_B = U`` (out x r), ``lora_A = V`` (r x in) and scaling 1.
PEFT has one ``r`` and one ``lora_alpha`` per adapter (``rank_pattern``/``alpha_pattern`` exist but not every
serving engine reads them), so every module is written at the largest rank r of the member, smaller factors
padded with zeros (exact: zero columns of ``lora_B`` and zero rows of ``lora_A`` add nothing), and
``lora_alpha = r`` so that the scaling is 1. Factors are written in float32 (the stored float16 factors
convert exactly). 2-D ``<module>.weight`` tensors are Linear layers, except modules whose last name component
contains ``embed`` or is ``wte``/``wpe``, which are Embedding layers (PEFT's ``lora_embedding_A``/``B``,
holding ``U^T`` and ``V^T``). Records identical to the backbone need nothing. Any other record (quantised,
sparse, dense, with a residual, tied to another tensor, of another shape, a 1-D norm weight or bias) is not a
LoRA: the export is refused, naming the tensors, unless ``max_rank`` is given. Then each such 2-D tensor's
delta (the rebuilt member tensor minus the backbone tensor, in float32) is replaced by its truncated SVD of
rank <= max_rank and the relative error ``||approx - delta|| / ||delta||`` is reported per tensor; tensors
that cannot be a LoRA at all (1-D, more than 2-D, new or reshaped tensors) are dropped and their drift
``||delta|| / ||backbone||`` reported. Exact low-rank records of rank > max_rank are truncated the same way.

Reading adapters as members lives in :mod:`wfactor.peft`.
"""


from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .codecs.lowrank import spectrum
from .errors import InputError
from .format.atomic import fsync_dir, replace_dir, temp_name
from .format.safetensors_io import Entry, SafetensorsFile, write_streaming
from .peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EMBEDDING_LEAVES, PREFIX, SHOW
from .tensors import from_storage, to_storage


def is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1].lower()
    return "embed" in leaf or leaf in EMBEDDING_LEAVES


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOW])
    return shown + (f" and {len(names) - SHOW} more" if len(names) > SHOW else "")


# -- export -------------------------------------------------------------------------------------------------
@dataclass
class ModuleExport:
    tensor: str
    module: str
    kind: str  # "linear" | "embedding"
    rank: int  # the rank of the update before zero-padding to the adapter's r
    how: str  # "exact" (the member's own low-rank factors) | "svd" (approximated under --max-rank)
    rel_error: float  # ||approx - delta|| / ||delta||, 0 for exact

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "module": self.module,
            "kind": self.kind,
            "rank": self.rank,
            "how": self.how,
            "rel_error": self.rel_error,
        }


@dataclass
class Dropped:
    tensor: str
    reason: str
    rel_drift: float  # ||member - backbone|| / ||backbone|| (inf for a tensor the backbone lacks)

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "reason": self.reason,
            "rel_drift": self.rel_drift if math.isfinite(self.rel_drift) else None,
        }


@dataclass
class PeftExportReport:
    member: str
    output: Path
    r: int
    lora_alpha: int
    max_rank: int | None
    modules: list[ModuleExport] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    bytes: int = 0

    @property
    def worst(self) -> ModuleExport | None:
        return max(self.modules, key=lambda m: m.rel_error, default=None)

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "member": self.member,
            "output": str(self.output),
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "max_rank": self.max_rank,
            "bytes": self.bytes,
            "exact": sum(m.how == "exact" for m in self.modules),
            "approximated": sum(m.how == "svd" for m in self.modules),
            "worst_rel_error": worst.rel_error if worst else 0.0,
            "worst_tensor": worst.tensor if worst else None,
            "modules": [m.to_json() for m in self.modules],
            "dropped": [d.to_json() for d in self.dropped],
        }


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.sqrt()
    return u * root[None, :], root[:, None] * vh


def export_peft(
    family: str | Path,
    name: str,
    out: str | Path,
    max_rank: int | None = None,
    force: bool = False,
) -> PeftExportReport:
    """Write member ``name`` of ``family`` as a PEFT LoRA adapter directory ``out`` (see the module docstring).

    Raises InputError naming the tensors that are not low rank against the backbone, unless ``max_rank``."""
    from .family import Family

    if max_rank is not None and max_rank < 1:
        raise InputError(f"--max-rank must be >= 1, found {max_rank}")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists; choose another -o or pass --force to replace it")
    with Family(family) as fam:
        entry = fam.member(name)
        if getattr(entry, "components", None):
            raise InputError(
                f"member {name!r} is a pipeline ({', '.join(c.name for c in entry.components)}); export-peft writes "
                "an adapter for one model: materialize the member and adapt its component instead"
            )
        bb = {k: shape for k, (shape, _dtype) in fam.base_shapes.items()}
        factors: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}  # tensor -> (module, U, V) in float32
        modules: list[ModuleExport] = []
        dropped: list[Dropped] = []
        refused: list[str] = []
        with fam.open_delta(name) as delta:
            for meta in entry.tensors:
                rec = delta.records[meta.name]
                same_base = (
                    rec.base == rec.name
                    and rec.same_as is None
                    and meta.name in bb
                    and bb[meta.name] == rec.shape
                )
                module = meta.name[: -len(".weight")] if meta.name.endswith(".weight") else None
                if same_base and not rec.terms and rec.residual is None:
                    continue  # identical to the backbone (or the backbone alone met the budget): nothing to add
                lora_ok = module is not None and len(rec.shape) == 2 and same_base
                if (
                    lora_ok
                    and rec.residual is None
                    and len(rec.terms) == 1
                    and rec.terms[0].codec == "lowrank"
                    and (max_rank is None or int(rec.terms[0].params["rank"]) <= max_rank)
                ):
                    where = f"{delta.file.path}: tensor {rec.name!r}"
                    u = _as_float(delta.file, rec.terms[0].parts["u"], where)
                    v = _as_float(delta.file, rec.terms[0].parts["v"], where)
                    assert module is not None
                    factors[meta.name] = (module, u, v)
                    kind = "embedding" if is_embedding(module) else "linear"
                    modules.append(ModuleExport(meta.name, module, kind, int(u.shape[1]), "exact", 0.0))
                    continue
                if max_rank is None:
                    if rec.same_as is not None and meta.name in bb and bb[meta.name] == rec.shape:
                        # a tied tensor may still equal the backbone's own (a tied base): check before refusing
                        y = fam.rebuild(delta, rec, "cpu")
                        base_t = fam.base_tensor(meta.name, "cpu")
                        if y.dtype == base_t.dtype and torch.equal(y, base_t):
                            continue
                    refused.append(meta.name)
                    continue
                y = fam.rebuild(delta, rec, "cpu")
                if meta.name not in bb:
                    dropped.append(Dropped(meta.name, "not in the backbone", math.inf))
                    continue
                base_t = fam.base_tensor(meta.name, "cpu")
                if tuple(base_t.shape) != tuple(y.shape):
                    dropped.append(
                        Dropped(meta.name, f"shape {list(y.shape)}, backbone {list(base_t.shape)}", math.inf)
                    )
                    continue
                if not y.is_floating_point():
                    if not torch.equal(y, base_t):
                        dropped.append(Dropped(meta.name, f"{rec.dtype} tensor differs from the backbone", math.inf))
                    continue
                d = y.to(torch.float32) - base_t.to(torch.float32)
                dn = float(d.norm())
                if dn == 0.0:
                    continue
                drift = dn / max(float(base_t.to(torch.float32).norm()), 1e-30)
                if module is None or d.dim() != 2:
                    what = f"{d.dim()}-D" if d.dim() != 2 else "not a .weight"
                    dropped.append(Dropped(meta.name, f"{what} tensor: no LoRA form", drift))
                    continue
                u_s, s, vh = spectrum(d, max_rank)
                keep = int((s > 0).sum())
                if keep == 0:
                    continue
                u_s, s, vh = u_s[:, :keep], s[:keep], vh[:keep]
                approx = (u_s * s[None, :]) @ vh
                err = float((approx - d).norm()) / dn
                bu, av = _split(u_s, s, vh)
                factors[meta.name] = (module, bu.contiguous(), av.contiguous())
                kind = "embedding" if is_embedding(module) else "linear"
                modules.append(ModuleExport(meta.name, module, kind, keep, "svd", err))
        if refused:
            raise InputError(
                f"member {name!r}: {len(refused)} tensor(s) are not low rank against the backbone "
                f"({_names(refused)}), so they cannot be a LoRA adapter; pass --max-rank R to approximate them "
                "by truncated SVD (errors are reported per tensor; 1-D tensors such as norms and biases are dropped)"
            )
        if not factors:
            raise InputError(f"member {name!r} equals the backbone: there is no update to export as an adapter")
        origin = fam.manifest.backbone_origin
        base_ref = origin.get("path") if origin.get("kind") == "base" else None
    r = max(m.rank for m in modules)
    report = PeftExportReport(name, out, r, r, max_rank, modules, dropped)
    _write_adapter(out, factors, r, base_ref, report)
    return report


def _as_float(file: SafetensorsFile, spec: Any, where: str) -> torch.Tensor:
    from .format.parts import read_part

    return from_storage(read_part(file, spec, where), spec.dtype).to(torch.float32)


def _write_adapter(
    out: Path,
    factors: dict[str, tuple[str, torch.Tensor, torch.Tensor]],
    r: int,
    base_ref: str | None,
    report: PeftExportReport,
) -> None:
    """adapter_model.safetensors + adapter_config.json, written in a temporary directory renamed into place."""
    arrays: dict[str, Any] = {}
    targets: list[str] = []
    for _tensor, (module, u, v) in factors.items():
        k = u.shape[1]
        up = torch.zeros(u.shape[0], r, dtype=torch.float32)
        up[:, :k] = u
        vp = torch.zeros(r, v.shape[1], dtype=torch.float32)
        vp[:k] = v
        if is_embedding(module):  # PEFT: weight += (B @ A).T with A: r x num_embeddings, B: dim x r
            arrays[f"{PREFIX}{module}.lora_embedding_A"] = to_storage(up.T.contiguous())
            arrays[f"{PREFIX}{module}.lora_embedding_B"] = to_storage(vp.T.contiguous())
        else:  # weight += B @ A with A: r x in, B: out x r
            arrays[f"{PREFIX}{module}.lora_A.weight"] = to_storage(vp)
            arrays[f"{PREFIX}{module}.lora_B.weight"] = to_storage(up)
        targets.append(module)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_ref,
        "revision": None,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(targets),
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    work = temp_name(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        entries = [Entry(k, "F32", tuple(a.shape)) for k, a in arrays.items()]
        write_streaming(work / ADAPTER_WEIGHTS, entries, lambda e: arrays[e.name].tobytes(), {"format": "pt"})
        (work / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        fsync_dir(work)
        report.bytes = sum(p.stat().st_size for p in work.iterdir())
        replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- import -------------------------------------------------------------------------------------------------
