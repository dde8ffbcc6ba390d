"""Quantised checkpoints as members, recognised from ``quantization_config`` in their config.json.

- **compressed-tensors** (vLLM / llm-compressor), ``format: float-quantized``: each quantised Linear's
  ``weight`` is F8 (E4M3 or E5M2) holding round(W / s), with ``weight_scale`` s per output channel
  (``[out, 1]`` or ``[out]``) or per tensor (``[1]``, ``[]``). Such a weight is predicted from its float
  base as round(B / s) (the ``rescale`` term, spec/FORMAT.md 4.2) and stored **lossless**: the XOR of the
  codes that differ (none for a plain quantised copy of the base, few for a quantised fine-tune); the scales
  are member tensors stored as they are. Analysis compares the dequantised weight Q * s with the base, so a
  quantised copy is related and its drift is its quantisation error.
- compressed-tensors ``int-quantized``/``pack-quantized`` and GPTQ/AWQ checkpoints (int32-packed codes,
  ``qweight``/``qzeros``/``scales``/``g_idx``) are recognised and stored as they are, bit for bit, but their
  packed codes are not yet predicted from the backbone: they share only what is bit-identical or aligned
  by name (norms, embeddings, unquantised heads). The report says so.

Any other ``quant_method`` is refused with a one-line error rather than misread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .format.constants import F8_DTYPES
from .sources import Source

FLOAT_FORMATS = ("float-quantized", "naive-quantized")
KNOWN_STORED_AS_IS = {
    ("compressed-tensors", "int-quantized"),
    ("compressed-tensors", "pack-quantized"),
    ("compressed-tensors", "marlin-24"),
    ("gptq", None),
    ("awq", None),
}
METHODS = ("compressed-tensors", "gptq", "awq")


def quantization_config(folder: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of ``folder/config.json``, or None (no config, or not quantised)."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # not ours to judge: the config is copied as it is
    q = obj.get("quantization_config") if isinstance(obj, dict) else None
    return q if isinstance(q, dict) else None


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


@dataclass
class QuantizedSource(Source):
    """A quantised checkpoint: its tensors as stored, plus per quantised weight the scales that predict it."""

    method: str = ""
    quant_format: str | None = None
    _scales: dict[str, str] = field(default_factory=dict, repr=False)  # weight -> its weight_scale tensor

    qconfig: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_format not in FLOAT_FORMATS:
            try:
                self._check_packed()
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

    def prescale(self, key: str) -> torch.Tensor | None:
        scale = self._scales.get(key)
        if scale is None:
            return None
        info = self.info(key)
        m = info.shape[0] if info.shape else 1
        s = self.tensor(scale).to(torch.float32).reshape(-1)
        return s.expand(m).contiguous() if s.numel() == 1 else s

    def analysis_tensor(self, key: str) -> tuple[torch.Tensor, str]:
        s = self.prescale(key)
        if s is None:
            return super().analysis_tensor(key)
        q = self.tensor(key).to(torch.float32)
        return (q.reshape(s.numel(), -1) * s[:, None]).reshape(q.shape), "F32"

    @property
    def quantized_weights(self) -> list[str]:
        return sorted(self._scales)

    stored_lossless = True

    def quantization(self) -> dict[str, Any] | None:
        """What the factor report says of the member's quantisation."""
        predicted = self.quant_format in FLOAT_FORMATS
        return {
            "method": self.method,
            "format": self.quant_format,
            "quantized_weights": len(self._scales),
            "predicted_from_backbone": predicted,
            "note": "lossless: codes predicted as round(B / s), XOR residual"
            if predicted
            else "stored as it is (lossless); packed integer codes are not predicted from the backbone yet",
        }
