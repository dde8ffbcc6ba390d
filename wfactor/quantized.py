"""Quantised checkpoints as members, recognised from ``quantization_config`` in their config.json.

- **compressed-tensors** (vLLM / llm-compressor), ``format: float-quantized``: each quantised Linear's
  ``weight`` is F8 (E4M3 or E5M2) holding round(W / s), with ``weight_scale`` s per output channel
  (``[out, 1]`` or ``[out]``) or per tensor (``[1]``, ``[]``). Such a weight is predicted from its float
  base as round(B / s) (the ``rescale`` term, spec/FORMAT.md 4.2) and stored **lossless**: the XOR of the
  codes that differ (none for a plain quantised copy of the base, few for a quantised fine-tune); the scales
  are member tensors stored as they are. Analysis compares the dequantised weight Q * s with the base, so a
  quantised copy is related and its drift is its quantisation error.
- **Packed integer codes**: compressed-tensors ``pack-quantized`` (``weight_packed`` [out, ceil(in*b/32)]
  int32, ``weight_scale`` [out, groups], ``weight_shape``) and ``int-quantized`` (int8 ``weight``), and the
  GPTQ layout (``qweight`` [ceil(in*b/32), out] int32, ``scales`` [groups, out], ``qzeros``, ``g_idx``),
  symmetric or with one zero point for the whole tensor: each packed weight is aligned with the float base
  tensor of its logical name (``...weight``) and predicted by quantising it with the member's own scales
  (the ``requant`` term, spec 4.2 and 5.4), plus a code correction for the codes that differ. Its analysis
  compares the dequantised weight (u - z) * s. Zero points that vary within a tensor, AWQ's interleaved
  packing and compressed-tensors ``marlin-24`` are stored as they are, bit for bit.

Any other ``quant_method`` is refused with a one-line error rather than misread.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .codecs import requant
from .errors import InputError
from .format.constants import F8_DTYPES
from .format.safetensors_io import TensorInfo
from .sources import Source, quantization_config  # noqa: F401  (re-exported)

FLOAT_FORMATS = ("float-quantized", "naive-quantized")
KNOWN_STORED_AS_IS = {
    ("compressed-tensors", "int-quantized"),
    ("compressed-tensors", "pack-quantized"),
    ("compressed-tensors", "marlin-24"),
    ("gptq", None),
    ("awq", None),
}
METHODS = ("compressed-tensors", "gptq", "awq")


def check_method(q: dict[str, Any], where: str) -> tuple[str, str | None]:
    """(quant_method, format) of a quantization_config, or a one-line error for a method wfactor does not know."""
    method = q.get("quant_method")
    fmt = q.get("format") if method == "compressed-tensors" else None
    if method not in METHODS:
        raise InputError(
            f"{where}: quantization_config has quant_method {method!r}, which wfactor does not read; "
            f"expected one of {', '.join(METHODS)} (or dequantise the checkpoint first)"
        )
    if method == "compressed-tensors" and fmt not in FLOAT_FORMATS and (method, fmt) not in KNOWN_STORED_AS_IS:
        raise InputError(
            f"{where}: compressed-tensors format {fmt!r} is not one wfactor reads; expected float-quantized, "
            "naive-quantized, int-quantized or pack-quantized"
        )
    return str(method), fmt


@dataclass(frozen=True)
class PackedWeight:
    """One packed integer weight of a quantised member, as the ``requant`` term predicts it (spec 4.2)."""

    logical: str  # the float weight it stands for (``...weight``): its name for alignment with the base
    layout: str  # rows | columns | codes (wfactor.codecs.requant)
    bits: int
    rows: int  # m': output channels
    inputs: int  # n': input channels
    group_size: int
    zero: int  # the unsigned zero point, one for the whole tensor
    scales: str  # the member tensor holding its scales
    groups: str | None = None  # the member tensor holding each input's group (GPTQ's g_idx)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bits": self.bits,
            "inputs": self.inputs,
            "group_size": self.group_size,
            "zero": self.zero,
            "layout": self.layout,
            "scales": self.scales,
        }
        if self.groups is not None:
            out["groups"] = self.groups
        return out


@dataclass
class QuantizedSource(Source):
    """A quantised checkpoint: its tensors as stored, plus per quantised weight the scales that predict it."""

    method: str = ""
    quant_format: str | None = None
    _scales: dict[str, str] = field(default_factory=dict, repr=False)  # weight -> its weight_scale tensor
    _packed: dict[str, PackedWeight] = field(default_factory=dict, repr=False)  # packed weight -> its layout
    unpredicted: dict[str, str] = field(default_factory=dict, repr=False)  # packed weight -> why not predicted

    qconfig: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_format not in FLOAT_FORMATS:
            try:
                self._check_packed()
                self._find_packed()
            except BaseException:
                self.close()
                raise
            return
        try:
            for key in self.keys():
                info = self.info(key)
                if info.dtype not in F8_DTYPES or not key.endswith("weight"):
                    continue
                scale = key + "_scale"
                if scale not in self:
                    raise InputError(
                        f"{self.path}: tensor {key!r} is {info.dtype} but {scale!r} is missing; a float-quantized "
                        "weight needs its scales"
                    )
                m = info.shape[0] if info.shape else 1
                sshape = tuple(self.info(scale).shape)
                if sshape not in ((m, 1), (m,), (1,), (), (1, 1)):
                    raise InputError(
                        f"{self.path}: tensor {scale!r} is {list(sshape)}, which does not fit {key!r} "
                        f"{list(info.shape)}: expected [{m}, 1] or [{m}] (per channel) or [1] (per tensor); "
                        "group and block scales are not supported"
                    )
                self._scales[key] = scale
        except BaseException:
            self.close()
            raise

    def _bits(self) -> int | None:
        """The weights' bit width from the config (compressed-tensors ``config_groups``, GPTQ/AWQ ``bits``)."""
        if self.method == "compressed-tensors":
            widths = {
                g.get("weights", {}).get("num_bits")
                for g in (self.qconfig.get("config_groups") or {}).values()
                if isinstance(g, dict) and isinstance(g.get("weights"), dict)
            }
            widths.discard(None)
            return int(widths.pop()) if len(widths) == 1 else None
        bits = self.qconfig.get("bits", self.qconfig.get("w_bit"))
        return int(bits) if isinstance(bits, int) else None

    def _check_packed(self) -> None:
        """Packed and integer checkpoints, stored as they are, are still checked for what would make them
        unloadable: ``weight_packed`` against ``weight_shape`` (pack-quantized), int8-held codes within the
        bit width (int-quantized), ``qweight`` rows against ``g_idx`` (GPTQ)."""
        bits = self._bits()
        for key in self.keys():
            if key.endswith("weight_packed") and bits:
                stem = key[: -len("weight_packed")]
                shape_key = stem + "weight_shape"
                if shape_key not in self:
                    raise InputError(
                        f"{self.path}: tensor {key!r} has no {shape_key!r}; pack-quantized weights need it"
                    )
                want = [int(x) for x in self.tensor(shape_key).reshape(-1).tolist()]
                have = list(self.info(key).shape)
                if len(want) != 2 or have != [want[0], -(-want[1] * bits // 32)]:
                    cols = -(-want[1] * bits // 32) if len(want) == 2 else "?"
                    raise InputError(
                        f"{self.path}: tensor {key!r} is {have} x {self.info(key).dtype}, but {shape_key} {want} "
                        f"at {bits} bits packs into [{want[0] if want else '?'}, {cols}] int32; the checkpoint is "
                        "damaged or its config names another bit width"
                    )
            elif self.quant_format == "int-quantized" and key.endswith("weight") and bits and bits < 8:
                if self.info(key).dtype == "I8":
                    codes = self.tensor(key)
                    lo, hi = (int(x) for x in torch.aminmax(codes)) if codes.numel() else (0, 0)
                    q = 1 << (bits - 1)
                    if lo < -q or hi > q - 1:
                        raise InputError(
                            f"{self.path}: tensor {key!r} holds codes {lo}..{hi}, outside the {bits}-bit range "
                            f"{-q}..{q - 1} its config declares"
                        )
            elif self.method == "gptq" and key.endswith("qweight") and bits:
                g_idx = key[: -len("qweight")] + "g_idx"
                if g_idx in self:
                    rows = self.info(key).shape[0] if self.info(key).shape else 0
                    n = self.info(g_idx).shape[0] if self.info(g_idx).shape else 0
                    if rows * 32 // bits != n:
                        raise InputError(
                            f"{self.path}: tensor {key!r} has {rows} packed rows, which hold {rows * 32 // bits} "
                            f"inputs at {bits} bits, but {g_idx!r} lists {n}"
                        )

    def _find_packed(self) -> None:
        """Every packed weight the requant term can predict (see the module docstring); the others are listed
        in ``unpredicted`` with the reason, and stored as they are."""
        bits = self._bits()
        if bits is None:
            return
        if self.method == "compressed-tensors":
            group = self._ct_group_size()
            for key in self.keys():
                if key.endswith("weight_packed"):
                    stem = key[: -len("weight_packed")]
                    shape = [int(x) for x in self.tensor(stem + "weight_shape").reshape(-1).tolist()]
                    self._add_packed(key, stem, "rows", bits, shape[0], shape[1], group)
                elif self.quant_format == "int-quantized" and key.endswith("weight") and self.info(key).dtype == "I8":
                    stem = key[: -len("weight")]
                    rows, inputs = (list(self.info(key).shape) + [0, 0])[:2]
                    self._add_packed(key, stem, "codes", bits, rows, inputs, group)
        elif self.method == "gptq":
            group = self.qconfig.get("group_size", -1)
            for key in self.keys():
                if key.endswith("qweight") and len(self.info(key).shape) == 2:
                    stem = key[: -len("qweight")]
                    words, rows = self.info(key).shape
                    self._add_packed(key, stem, "columns", bits, rows, words * 32 // bits, group)
        else:
            for key in self.keys():
                if key.endswith("qweight"):
                    self.unpredicted[key] = "AWQ packs codes in an interleaved order: stored as it is"

    def _ct_group_size(self) -> int | None:
        for g in (self.qconfig.get("config_groups") or {}).values():
            w = g.get("weights") if isinstance(g, dict) else None
            if isinstance(w, dict):
                if w.get("symmetric") is False:
                    return None
                return int(w["group_size"]) if w.get("strategy") == "group" and w.get("group_size") else -1
        return -1

    def _add_packed(
        self, key: str, stem: str, layout: str, bits: int, rows: int, inputs: int, group: Any
    ) -> None:
        scale_key = stem + ("scales" if layout == "columns" else "weight_scale")
        if group is None:
            self.unpredicted[key] = "asymmetric (zero points per group): stored as it is"
            return
        float_scales = scale_key in self and self.info(scale_key).dtype in ("F32", "F16", "BF16")
        if not float_scales or rows <= 0 or inputs <= 0:
            self.unpredicted[key] = f"no floating-point {scale_key!r}: stored as it is"
            return
        if self.info(scale_key).numel != 1 and self.info(scale_key).numel % rows:
            raise InputError(
                f"{self.path}: tensor {scale_key!r} is {list(self.info(scale_key).shape)}, which does not fit {key!r} "
                f"with {rows} output channels: expected [{rows}, groups] (or [groups, {rows}] for GPTQ)"
            )
        groups_key = stem + ("g_idx" if layout == "columns" else "weight_g_idx")
        groups = groups_key if groups_key in self and self.info(groups_key).dtype in ("I32", "I64") else None
        ngroups = max(1, self.info(scale_key).numel // rows)
        size = inputs if not isinstance(group, int) or group <= 0 else group
        if groups is None and ngroups not in (1, -(-inputs // size)):
            raise InputError(
                f"{self.path}: tensor {scale_key!r} holds {ngroups} groups per output channel, but {inputs} inputs in "
                f"groups of {size} make {-(-inputs // size)}; the checkpoint is damaged or its config names another "
                "group size"
            )
        zero = 1 << (bits - 1)
        if layout == "columns":
            zero_or_reason = self._gptq_zero(stem, bits, rows)
            if isinstance(zero_or_reason, str):
                self.unpredicted[key] = zero_or_reason
                return
            zero = zero_or_reason
        elif stem + "weight_zero_point" in self:
            zp = self.tensor(stem + "weight_zero_point")
            if zp.numel() and bool((zp != 0).any()):
                self.unpredicted[key] = "zero points are not all 0: stored as it is"
                return
        self._packed[key] = PackedWeight(
            stem + "weight", layout, bits, rows, inputs, min(size, inputs), zero, scale_key, groups
        )

    def _gptq_zero(self, stem: str, bits: int, rows: int) -> int | str:
        """GPTQ's zero point when ``qzeros`` holds one value (v1 checkpoints store z - 1), or why not."""
        qz = stem + "qzeros"
        if qz not in self:
            return 1 << (bits - 1)
        t = self.tensor(qz)
        if t.dim() != 2 or t.dtype != torch.int32 or t.shape[1] != requant.words(rows, bits):
            return f"{qz!r} is not [groups, {requant.words(rows, bits)}] int32: stored as it is"
        z = requant.unpack_rows(t, bits, rows)
        lo, hi = int(z.min()), int(z.max())
        if lo != hi:
            return "zero points vary within the tensor: stored as it is"
        v2 = str(self.qconfig.get("checkpoint_format", "gptq")) == "gptq_v2"
        return lo if v2 else min(lo + 1, (1 << bits) - 1)

    def packed(self, key: str) -> PackedWeight | None:
        """The layout of a packed integer weight the requant term predicts, or None."""
        return self._packed.get(key)

    def align_name(self, key: str) -> str:
        pw = self._packed.get(key)
        return pw.logical if pw is not None else key

    def align_info(self, key: str) -> TensorInfo:
        pw = self._packed.get(key)
        if pw is None:
            return self.info(key)
        return TensorInfo(pw.logical, "F32", (pw.rows, pw.inputs), 0, pw.rows * pw.inputs * 4)

    def dequantized(self, key: str) -> torch.Tensor:
        """A packed weight's float32 values (u - z) * s, [out, in]."""
        pw = self._packed[key]
        g = self.tensor(pw.groups) if pw.groups is not None else None
        return requant.dequantize_packed(self.tensor(key), pw.params(), self.tensor(pw.scales), g)

    def has_prescale(self, key: str) -> bool:
        return key in self._scales

    def prescale(self, key: str) -> torch.Tensor | None:
        scale = self._scales.get(key)
        if scale is None:
            return None
        info = self.info(key)
        m = info.shape[0] if info.shape else 1
        s = self.tensor(scale).to(torch.float32).reshape(-1)
        return s.expand(m).contiguous() if s.numel() == 1 else s

    def analysis_array(self, key: str) -> tuple[np.ndarray, str]:
        if key in self._packed:
            return self.dequantized(key).to(torch.float32).numpy(), "F32"
        s = self.prescale(key)
        if s is None:
            return super().analysis_array(key)
        q = self.tensor(key).to(torch.float32)
        return (q.reshape(s.numel(), -1) * s[:, None]).reshape(q.shape).numpy(), "F32"

    @property
    def quantized_weights(self) -> list[str]:
        return sorted(self._scales)

    stored_lossless = True

    def quantization(self) -> dict[str, Any] | None:
        """What the factor report says of the member's quantisation."""
        if self.quant_format in FLOAT_FORMATS:
            return {
                "method": self.method,
                "format": self.quant_format,
                "quantized_weights": len(self._scales),
                "predicted_from_backbone": True,
                "note": "lossless: codes predicted as round(B / s), XOR residual",
            }
        out: dict[str, Any] = {
            "method": self.method,
            "format": self.quant_format,
            "quantized_weights": len(self._packed) + len(self.unpredicted),
            "predicted_from_backbone": bool(self._packed),
            "note": "lossless: packed codes predicted by quantising the base with the member's scales (requant), "
            "code corrections for those that differ",
        }
        if self.unpredicted:
            reasons = sorted(set(self.unpredicted.values()))
            out["not_predicted"] = {"weights": len(self.unpredicted), "why": reasons}
        return out


FP8_MAX = 448.0  # the largest finite F8_E4M3 value
FP8_MIN_ELEMENTS = 4096  # smaller matrices (and every vector, integer and F8 tensor) stay as they are


@dataclass
class Fp8Backbone(Source):
    """A backbone stored in F8_E4M3 with one scale per row (``factor --backbone-dtype fp8``), for serving on a
    smaller GPU: every floating-point matrix of ``inner`` with at least FP8_MIN_ELEMENTS elements is held as
    codes c = round_F8(B / s), s = max|row| / 448, and each member record predicted from it starts with a
    ``rescale`` term by t = 1 / s (float32), so that the reader's view of the backbone is c / t ~= B (spec
    4.2, 5.1 step 1a). Members are planned as their change from the base carried over onto that view,
    W' = W + (c / t - B): tensors a member left unchanged cost nothing, and every member carries the
    backbone's fp8 rounding, as an fp8 checkpoint of it would."""

    inner: Source | None = None
    rescaled_view = True

    def __post_init__(self) -> None:
        self._open = {}
        self._where = {}
        assert self.inner is not None
        self._inner = self.inner
        self._quantized = {
            k
            for k in self._inner.keys()
            if self._inner.info(k).dtype in ("F64", "F32", "F16", "BF16")
            and len(self._inner.info(k).shape) == 2
            and self._inner.info(k).numel >= FP8_MIN_ELEMENTS
        }

    def keys(self) -> list[str]:
        return self._inner.keys()

    def info(self, key: str) -> TensorInfo:
        info = self._inner.info(key)
        if key not in self._quantized:
            return info
        return TensorInfo(info.name, "F8_E4M3", tuple(info.shape), 0, info.numel)

    def __contains__(self, key: str) -> bool:
        return key in self._inner

    def _codes(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(F8 codes, t = 1 / s per row as float32) of a quantised matrix."""
        b = self._inner.tensor(key).to(torch.float32)
        amax = b.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        codes = (b / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes, (1.0 / s).to(torch.float32)

    def tensor(self, key: str) -> torch.Tensor:
        return self._codes(key)[0] if key in self._quantized else self._inner.tensor(key)

    def array(self, key: str) -> np.ndarray:
        if key not in self._quantized:
            return self._inner.array(key)
        return self._codes(key)[0].view(torch.uint8).numpy()

    def raw_bytes(self, key: str) -> bytes:
        if key not in self._quantized:
            return self._inner.raw_bytes(key)
        return bytes(self._codes(key)[0].view(torch.uint8).numpy().tobytes())

    def planning_view(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if key not in self._quantized:
            return self._inner.tensor(key), None, None
        codes, t = self._codes(key)  # quantised once per planned tensor
        return codes.to(torch.float32) / t[:, None], self._inner.tensor(key), t

    @property
    def nbytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys())

    def close(self) -> None:
        """The inner backbone is closed by whoever opened it."""


def dequantizable(name: str, rec: Any, names: Collection[str]) -> bool:
    """Whether record ``rec`` (of tensor ``name``) holds a weight :func:`dequantize_tensors` turns into floats:
    a requant record (packed int4/int8 codes), or an F8 ``...weight`` beside its ``..._scale`` in ``names``."""
    if rec.terms and rec.terms[0].codec == "requant":
        return True
    return rec.dtype in F8_DTYPES and name.endswith("weight") and name + "_scale" in names


def dequantize_tensors(
    sd: dict[str, torch.Tensor], records: dict[str, Any], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """A rebuilt quantised member's tensors with every weight the family predicted from its float base (a
    ``requant`` record: packed int4/int8 codes; an F8 ``...weight`` with its ``...weight_scale``) replaced by
    its float values under its float name (``...weight``), in the dtype of its scales: (u - z) * s, Q * s.
    The scales, group indices, zero points and shapes those weights used are dropped. ``records``: the
    member's records by the names of ``sd`` (which lack ``prefix``, a component's namespace, that the records'
    references carry); weights stored as they are (not predicted) stay packed."""

    def ref(full: object) -> str:
        return str(full)[len(prefix) :] if str(full).startswith(prefix) else str(full)

    out = dict(sd)
    drop: set[str] = set()
    for name, rec in records.items():
        if name not in sd or not dequantizable(name, rec, sd):
            continue
        if rec.terms and rec.terms[0].codec == "requant":
            p = rec.terms[0].params
            scales = sd[ref(p["scales"])]
            groups = sd[ref(p["groups"])] if p.get("groups") is not None else None
            w = requant.dequantize_packed(sd[name], p, scales, groups)
            stem = name[: -len("qweight")] if name.endswith("qweight") else name.rsplit("weight", 1)[0]
            del out[name]
            out[stem + "weight"] = w.to(scales.dtype if scales.is_floating_point() else torch.float32)
            drop |= {ref(p["scales"]), ref(p.get("groups")), stem + "weight_shape", stem + "qzeros"}
            drop |= {stem + "weight_zero_point"}
        else:  # an F8 weight and its per-channel (or per-tensor) scale
            scale = sd[name + "_scale"]
            q = sd[name].to(torch.float32)
            m = q.shape[0] if q.dim() else 1
            s = scale.to(torch.float32).reshape(-1)
            s = s.expand(m) if s.numel() == 1 else s
            w = (q.reshape(m, -1) * s[:, None]).reshape(q.shape)
            out[name] = w.to(scale.dtype if scale.dtype != torch.float32 else torch.float32)
            drop.add(name + "_scale")
    for k in drop:
        out.pop(k, None)
    return out
