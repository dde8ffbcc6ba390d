"""Models as lazy tensor streams: :class:`Source` (one model's tensors, read one at a time through memory
maps), the helpers every kind of input shares (member names, ``NAME=PATH``, shard indexes, config files),
and :class:`TowersSource` (several bases as one backbone). Which kind an argument is, and opening it, is
:func:`wfactor.inputs.open_source`.

Tensors are read one at a time through memory maps (never a whole model in memory), through the same
validating reader that guards family files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import bits, bits_equal, fingerprint
from .errors import InputError, NotFoundError
from .format.constants import MEMBER_NAME_RE
from .format.safetensors_io import SafetensorsFile, TensorInfo
from .format.shards import index_shard_names

if TYPE_CHECKING:  # torch is imported where a tensor is asked for: lossless factoring never does (wfactor.exact)
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
AUX_MAX_BYTES = 64 << 20
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter directory (wfactor.peft)


def default_member_name(path: Path) -> str:
    stem = path.name if path.is_dir() else path.stem
    if stem == "model" and not path.is_dir():
        stem = path.parent.name
    return clean_member_name(stem)


def clean_member_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-") or "member"
    return name[:128]


def split_spec(arg: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain PATH (even one containing '=') -> (None, PATH)."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
        if MEMBER_NAME_RE.match(name):
            return name, path
        raise InputError(
            f"{arg}: member name {name!r} must be letters, digits, '.', '_' or '-' (at most 128), "
            "starting with a letter or digit"
        )
    return None, arg


@dataclass
class Source:
    """One model: its tensors (lazy), their shards, and the config/tokenizer files beside them."""

    name: str
    path: Path
    files: list[Path]
    aux_files: list[Path] = field(default_factory=list)
    hub: str | None = None  # "org/name@<commit>" when the model came from the Hugging Face Hub
    # how to open this model again in another process (wfactor.distributed): ("source", arg, name, base) or
    # ("bases", specs); set by wfactor.inputs, None for a Source made by hand
    origin: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._open: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, tuple[Path, TensorInfo]] = {}
        self._in_file: dict[str, str] = {}  # tensor name -> its name inside its file (they differ in pipelines)
        try:
            for prefix, files in self.layout():
                for f in files:
                    sf = SafetensorsFile(f)
                    self._open[f] = sf
                    for key, info in sf.tensors.items():
                        full = prefix + key
                        if full in self._where:
                            raise InputError(
                                f"{f}: tensor {key!r} also appears in {self._where[full][0]}; shards must not overlap"
                            )
                        self._where[full] = (f, info)
                        self._in_file[full] = key
        except BaseException:
            self.close()
            raise

    def layout(self) -> list[tuple[str, list[Path]]]:
        """(name prefix, files) groups this model's tensors come from: one group, no prefix, for a model;
        one per component for a pipeline (:class:`wfactor.pipelines.PipelineSource`)."""
        return [("", list(self.files))]

    def keys(self) -> list[str]:
        return sorted(self._where)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._where[key][1]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor named {key!r}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def array(self, key: str) -> np.ndarray:
        """One tensor as a private numpy storage array (spec 6: BF16 as uint16, F8 as uint8) over a
        copy-on-write mapping of the file (no copy: its pages stay the page cache's, so streaming a model costs
        no anonymous memory for it). Torch-free."""
        return self._mapped(key)

    def _mapped(self, key: str) -> np.ndarray:
        f, _info = self._where[key]
        return self._open[f].mapped(self._in_file[key])

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor as a private CPU tensor of its stored dtype, over the mapping of :meth:`array`."""
        from .tensors import from_storage

        f, info = self._where[key]
        return from_storage(self._mapped(key), info.dtype)

    def raw_bytes(self, key: str) -> bytes:
        """One tensor's stored bytes, exactly as in the source file."""
        f, _info = self._where[key]
        return self._open[f].read_bytes(self._in_file[key])

    # a quantised checkpoint (wfactor.quantized) is served as it is: every tensor of it is stored lossless
    stored_lossless = False

    def quantization(self) -> dict[str, Any] | None:
        """What the factor report says of a quantised checkpoint's quantisation; None for other models."""
        return None

    def content(self, key: str) -> tuple[tuple[str, tuple[int, ...], str], bool]:
        """((dtype, shape, fingerprint of the bytes), whether every element is the same) of one tensor: the key
        that tied weights and alignment by content look tensors up by, confirmed by :meth:`same_bytes`
        (:func:`wfactor.arrays.fingerprint` samples 64 KiB, so equal keys are only candidates). Computed
        once per opened model, however many backbone candidates or passes ask."""
        cache: dict[str, tuple[tuple[str, tuple[int, ...], str], bool]] = self.__dict__.setdefault("_content", {})
        got = cache.get(key)
        if got is None:
            info = self.info(key)
            a = self.array(key).reshape(-1)
            constant = False
            if a.size:
                u = bits(a)
                # every element the first one, bit for bit (most tensors fail on their middle or last element)
                constant = bool(u[-1] == u[0] and u[a.size // 2] == u[0] and (u == u[0]).all())
            got = cache[key] = ((info.dtype, tuple(info.shape), fingerprint(a)), constant)
        return got

    def same_bytes(self, key: str, other: Source, other_key: str) -> bool:
        """Whether this tensor and ``other``'s ``other_key`` are the same tensor bit for bit (dtype, shape, bytes)."""
        a, b = self.info(key), other.info(other_key)
        if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
            return False
        return bits_equal(self.array(key), other.array(other_key))

    # a quantised backbone (wfactor.quantized.Fp8Backbone): records predicted from it start with a rescale term
    rescaled_view = False

    def has_prescale(self, key: str) -> bool:
        """Whether :meth:`prescale` has scales for this tensor (without loading them)."""
        return False

    def prescale(self, key: str) -> torch.Tensor | None:
        """For a quantised member's weight stored as round(W / s): its scales s, one per row (float32);
        None for every other tensor (:class:`wfactor.quantized.QuantizedSource`)."""
        return None

    def align_name(self, key: str) -> str:
        """The name alignment matches with backbone names: the tensor's own, or for a packed quantised weight
        (``...weight_packed``, ``...qweight``) the float weight it stands for (``...weight``)."""
        return key

    def align_info(self, key: str) -> TensorInfo:
        """The dtype and shape alignment checks against a backbone tensor: the tensor's own, or for a packed
        quantised weight those of the float weight it stands for (F32, [out, in])."""
        return self.info(key)

    def packed(self, key: str) -> Any:
        """A packed quantised weight's layout (:class:`wfactor.quantized.PackedWeight`), None for every other
        tensor: such a weight is planned as a requant record (spec 4.2)."""
        return None

    def planning_view(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the backbone tensor as a reader sees it, the original tensor it stands for, the per-row scales t of
        the rescale term every record predicted from it starts with): the tensor itself, None, None, except
        for a quantised backbone (:class:`wfactor.quantized.Fp8Backbone`: its view B / t, the original, t)."""
        return self.tensor(key), None, None

    def analysis_array(self, key: str) -> tuple[np.ndarray, str]:
        """The tensor as analysis compares it with a base (a storage array), and its dtype: itself, or for a
        quantised weight its dequantised values W = Q * s in float32."""
        return self.array(key), self.info(key).dtype

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self._where.values())

    def dtype_of(self, key: str) -> torch.dtype:
        from .tensors import TORCH_DTYPES

        return TORCH_DTYPES[self.info(key).dtype]

    def close(self) -> None:
        for sf in self._open.values():
            sf.close()
        self._open.clear()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def quantization_config(folder: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of ``folder/config.json``, or None (no config, or not quantised): a
    quantised checkpoint is opened as :class:`wfactor.quantized.QuantizedSource`."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # not ours to judge: the config is copied as it is
    q = obj.get("quantization_config") if isinstance(obj, dict) else None
    return q if isinstance(q, dict) else None


def aux_files(folder: Path, exclude: set[Path]) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if p in exclude or not p.is_file() or p.name == INDEX_NAME:
            continue
        if p.suffix in AUX_SUFFIXES and p.stat().st_size <= AUX_MAX_BYTES:
            out.append(p)
    return out


def index_files(index: Path) -> list[Path]:
    """The shard files of a local safetensors index, each checked to exist beside it."""
    files = []
    for n in index_shard_names(index.read_bytes(), str(index)):
        p = index.parent / n
        if not p.is_file():
            raise NotFoundError(f"{index}: shard {n} is missing")
        files.append(p)
    return files


TOWER_SEP = "/"


@dataclass
class TowersSource(Source):
    """Several bases as one backbone (``--base NAME=PATH``, repeated): tensor ``NAME/<name>`` is tensor
    ``<name>`` of base NAME (spec/FORMAT.md section 2.2). ``towers``: (NAME, its opened Source) in order."""

    towers: list[tuple[str, Source]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._open = {}
        self._where = {}
        self._of: dict[str, tuple[Source, str]] = {}
        for tname, src in self.towers:
            for k in src.keys():
                self._of[f"{tname}{TOWER_SEP}{k}"] = (src, k)

    def keys(self) -> list[str]:
        return sorted(self._of)

    def info(self, key: str) -> TensorInfo:
        if key not in self._of:
            raise NotFoundError(f"{self.path}: no tensor named {key!r}")
        src, k = self._of[key]
        return src.info(k)

    def __contains__(self, key: str) -> bool:
        return key in self._of

    def tensor(self, key: str) -> torch.Tensor:
        src, k = self._of[key]
        return src.tensor(k)

    def array(self, key: str) -> np.ndarray:
        src, k = self._of[key]
        return src.array(k)

    def raw_bytes(self, key: str) -> bytes:
        src, k = self._of[key]
        return src.raw_bytes(k)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s in self.towers)

    def close(self) -> None:
        for _, s in self.towers:
            s.close()
