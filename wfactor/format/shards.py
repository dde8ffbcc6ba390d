"""Sharded safetensors outputs: size parsing, shard planning and the transformers-style index.

A sharded model is ``<prefix>-00001-of-0000N.safetensors`` ... plus ``<prefix>.safetensors.index.json``
= ``{"metadata": {"total_size": bytes of tensor data}, "weight_map": {tensor: shard file}}``, as
transformers' ``save_pretrained`` writes it, so ``from_pretrained(DIR)`` loads it directly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from .safetensors_io import Entry, loads_strict, write_streaming

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int, what: str = "--max-shard-size") -> int:
    """``"500MB"``, ``"2GB"``, ``"1.5GiB"``, ``"4096"`` -> bytes (decimal units are powers of 10, ``*iB`` of 2)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE_RE.match(str(text))
        unit = m[2].upper() if m else ""
        if not m or unit not in _UNITS:
            raise InputError(f"{what} {text!r}: expected a size such as 500MB, 2GB, 1.5GiB or a number of bytes")
        n = int(float(m[1]) * _UNITS[unit])
    if n <= 0:
        raise InputError(f"{what} {text!r}: must be more than 0 bytes")
    return n


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy, in the given order, like transformers: a shard takes tensors until the next would push its data
    past ``max_bytes``; a tensor larger than ``max_bytes`` gets a shard of its own. Never an empty shard."""
    shards: list[list[Entry]] = []
    size = 0
    for e in entries:
        if not shards or (size + e.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards or [[]]


def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """The index file's text (keys sorted: deterministic)."""
    obj = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_sharded(
    out: Path,
    prefix: str,
    entries: list[Entry],
    produce: Callable[[Entry], bytes | memoryview],
    metadata: dict[str, str] | None,
    max_bytes: int,
) -> list[tuple[Path, Path]]:
    """Write the shards and the index of ``entries`` into ``out`` under temporary names (``.NAME.tmp``).

    Returns (temporary, final) pairs, the index last, for the caller to rename once everything else it
    writes is ready; on error, the temporary files written so far are removed."""
    groups = plan_shards(entries, max_bytes)
    pairs: list[tuple[Path, Path]] = []
    weight_map: dict[str, str] = {}
    try:
        for i, group in enumerate(groups):
            name = shard_name(prefix, i, len(groups))
            tmp = out / f".{name}.tmp"
            pairs.append((tmp, out / name))
            write_streaming(tmp, group, produce, metadata)
            weight_map.update((e.name, name) for e in group)
        index = f"{prefix}.safetensors.index.json"
        tmp = out / f".{index}.tmp"
        pairs.append((tmp, out / index))
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(index_json(weight_map, sum(e.nbytes for e in entries)))
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        for t, _ in pairs:
            t.unlink(missing_ok=True)
        raise
    return pairs


def write_backbone_shards(
    root: Path,
    prefix: str,
    entries: list[Entry],
    produce: Callable[[Entry], bytes | memoryview],
    metadata: dict[str, str],
    max_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
) -> list[str]:
    """Write a sharded backbone's shards into ``root`` (a family being built in a temporary directory);
    returns their relative paths in order. A single shard is not written: the caller writes one file."""
    groups = plan_shards(entries, max_bytes)
    names = [shard_name(prefix, i, len(groups)) for i in range(len(groups))]
    for name, group in zip(names, groups):
        write_streaming(root / name, group, produce, metadata, on_bytes)
    return names


def index_shard_names(raw: bytes | str, where: str) -> list[str]:
    """The shard files a safetensors index (``model.safetensors.index.json``, transformers' layout) names:
    its ``weight_map``'s values, sorted and distinct, each a plain file name beside the index. The one parser
    of such indexes, for local directories and for Hub repositories alike."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        weight_map = loads_strict(text)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
        values = list(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise InputError(f'{where}: not a safetensors index (expected JSON with a "weight_map" object)') from None
    for n in values:
        if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", "..") or n.startswith("."):
            raise InputError(f"{where}: shard name {n!r} must be a plain file name in the same directory")
    return sorted(set(values))
