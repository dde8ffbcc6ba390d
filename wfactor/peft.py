"""PEFT LoRA adapters read as members: a PEFT adapter directory (with its base model) as one model.

Import (``wfactor factor ... NAME=ADAPTER_DIR --base BASE``). A directory holding ``adapter_config.json`` and
``adapter_model.safetensors`` is read as ``base + scaling * (lora_B @ lora_A)`` for every targeted module,
tensor by tensor (:class:`AdapterSource`), with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), ``r`` and ``lora_alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern`` as PEFT
does, the update transposed with ``fan_in_fan_out`` and for embeddings; full weights saved by
``modules_to_save`` replace the base's. DoRA, LoRA biases and other PEFT methods are refused.

Exporting a member as an adapter is :mod:`wfactor.peft_export`. Nothing here imports peft: the adapter is
plain JSON plus safetensors.
"""


from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, NotFoundError
from .format.safetensors_io import SafetensorsFile, TensorInfo, loads_strict
from .sources import ADAPTER_CONFIG, AUX_MAX_BYTES, AUX_SUFFIXES, Source, is_adapter_dir  # noqa: F401
from .tensors import TORCH_DTYPES, compute_torch_dtype, from_storage, to_storage

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
EMBEDDING_LEAVES = ("wte", "wpe")
SHOW = 5  # tensor names quoted in a refusal


@dataclass
class AdapterConfig:
    path: Path
    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    fan_in_fan_out: bool

    def scaling(self, module: str, rank: int, where: str) -> float:
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        if r != rank:
            raise InputError(f"{where}: lora_A has rank {rank}, {self.path} says r = {r} for module {module!r}")
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching a suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def read_adapter_config(path: Path) -> AdapterConfig:
    where = path / ADAPTER_CONFIG
    try:
        obj = loads_strict(where.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object")
    kind = obj.get("peft_type")
    if kind != "LORA":
        raise InputError(f"{where}: peft_type {kind!r}; only LoRA adapters (peft_type 'LORA') can be read")
    if obj.get("use_dora"):
        raise InputError(f"{where}: a DoRA adapter (use_dora: true); only plain LoRA can be merged into a member")
    for key in ("lora_bias", "use_qalora", "layer_replication", "trainable_token_indices", "target_parameters"):
        if obj.get(key):
            raise InputError(f"{where}: {key} is set; wfactor reads plain LoRA adapters only")
    r, alpha = obj.get("r"), obj.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InputError(f"{where}: r must be a positive integer, found {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InputError(f"{where}: lora_alpha must be a number, found {alpha!r}")
    rank_pattern = obj.get("rank_pattern") or {}
    alpha_pattern = obj.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise InputError(f"{where}: rank_pattern and alpha_pattern must be objects")
    return AdapterConfig(
        path=where,
        r=r,
        lora_alpha=float(alpha),
        rank_pattern={str(k): int(v) for k, v in rank_pattern.items()},
        alpha_pattern={str(k): float(v) for k, v in alpha_pattern.items()},
        use_rslora=bool(obj.get("use_rslora", False)),
        fan_in_fan_out=bool(obj.get("fan_in_fan_out", False)),
    )


_LORA_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


class AdapterSource(Source):
    """A member given as a PEFT LoRA adapter on a base model: the base's tensors, with every targeted module's
    weight rebuilt as ``W + scaling * delta`` when it is read (one tensor at a time, nothing precomputed)."""

    def __init__(self, name: str, path: Path, base: Source) -> None:
        aux = {p.name: p for p in base.aux_files}
        for p in sorted(path.iterdir()):
            if (
                p.is_file()
                and p.suffix in AUX_SUFFIXES
                and p.name != ADAPTER_CONFIG
                and p.stat().st_size <= AUX_MAX_BYTES
            ):
                aux[p.name] = p  # tokenizer files shipped with the adapter win over the base's
        super().__init__(name, path, list(base.files), [aux[k] for k in sorted(aux)])
        self.config = read_adapter_config(path)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise NotFoundError(f"{path}: {ADAPTER_WEIGHTS} is missing (adapter_model.bin is not read: convert it)")
        self._adapter = SafetensorsFile(weights)
        self._lora: dict[str, tuple[str, str, str, str]] = {}  # base tensor -> (module, kind, key A, key B)
        self._full: dict[str, str] = {}  # base tensor -> adapter key (modules_to_save weights)
        pairs: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for key in self._adapter.tensors:
            bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            for suffix, (kind, role) in _LORA_SUFFIXES.items():
                if bare.endswith(suffix):
                    module = bare[: -len(suffix)]
                    pairs.setdefault(module, {})[role] = key
                    kinds[module] = kind
                    break
            else:
                if "lora_" in bare or "magnitude" in bare:
                    raise InputError(f"{weights}: tensor {key!r} is not a plain LoRA weight (DoRA or LoRA bias?)")
                if bare not in self._where:
                    raise InputError(
                        f"{weights}: tensor {key!r} is neither a LoRA factor nor a tensor of the base {base.path}"
                    )
                self._full[bare] = key
        for module, roles in sorted(pairs.items()):
            if set(roles) != {"A", "B"}:
                raise InputError(f"{weights}: module {module!r} has lora_{''.join(roles)} without its pair")
            target = f"{module}.weight"
            if target not in self._where:
                raise InputError(
                    f"{weights}: module {module!r} targets {target!r}, which the base {base.path} does not have "
                    "(is --base the adapter's base model?)"
                )
            self._lora[target] = (module, kinds[module], roles["A"], roles["B"])
            self._check_shapes(target, weights)
        self._base_src = base

    def _check_shapes(self, target: str, weights: Path) -> None:
        module, kind, ka, kb = self._lora[target]
        a, b = self._adapter.tensors[ka].shape, self._adapter.tensors[kb].shape
        w = self.info(target).shape
        if kind == "linear" and self.config.fan_in_fan_out:
            w = tuple(reversed(w))
        want = (w[0], w[1]) if kind == "linear" and len(w) == 2 else (w[1], w[0]) if len(w) == 2 else None
        if want is None or len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != want:
            raise InputError(
                f"{weights}: module {module!r}: lora_A {list(a)} and lora_B {list(b)} do not fit the base's "
                f"{target!r} of shape {list(self.info(target).shape)}"
            )
        self.config.scaling(module, a[0], str(weights))

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        info = self._adapter.tensors[key]
        return from_storage(self._adapter.numpy(key), info.dtype)

    def info(self, key: str) -> TensorInfo:
        if key in self._full:
            a = self._adapter.tensors[self._full[key]]
            return TensorInfo(key, a.dtype, a.shape, a.begin, a.end)
        return super().info(key)

    def tensor(self, key: str) -> torch.Tensor:
        if key in self._full:
            return self._adapter_tensor(self._full[key]).clone()
        w = super().tensor(key)
        if key not in self._lora:
            return w
        module, kind, ka, kb = self._lora[key]
        c = compute_torch_dtype(super().info(key).dtype)
        a, b = self._adapter_tensor(ka).to(c), self._adapter_tensor(kb).to(c)
        scaling = self.config.scaling(module, a.shape[0], str(self.path))
        d = b @ a
        if kind == "embedding" or self.config.fan_in_fan_out:
            d = d.T
        return (w.to(c) + d * scaling).to(w.dtype)

    def array(self, key: str) -> np.ndarray:
        if key in self._full or key in self._lora:  # merged here: base + scaling * B A
            return to_storage(self.tensor(key))
        return super().array(key)

    def raw_bytes(self, key: str) -> bytes:
        if key in self._full or key in self._lora:
            return to_storage(self.tensor(key)).tobytes()
        return super().raw_bytes(key)

    @property
    def nbytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.keys())

    def dtype_of(self, key: str) -> torch.dtype:
        return TORCH_DTYPES[self.info(key).dtype]

    def close(self) -> None:
        super().close()
        self._adapter.close()
        self._base_src.close()


def open_adapter(name: str, path: Path, base_src: Source) -> AdapterSource:
    """``base + adapter`` as a member, over the opened base ``base_src`` (closed with the member, or here if
    the adapter is refused)."""
    try:
        return AdapterSource(name, path, base_src)
    except BaseException:
        base_src.close()
        raise

