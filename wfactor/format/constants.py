"""File names, version numbers and numeric limits of the wfactor format (spec/FORMAT.md, section 7)."""

from __future__ import annotations

import re

import numpy as np

FORMAT_VERSION = 1  # what is written for a family without a sharded backbone (spec section 8)
SHARDED_FORMAT_VERSION = 2  # a family with a sharded backbone (spec section 2.1)
PLANES_FORMAT_VERSION = 3  # a delta with a `bitplanes` part, and a family holding one (spec sections 4.3, 8)
LOW_PRECISION_FORMAT_VERSION = 4  # files with F8 / unsigned 16-64-bit tensors or a `rescale` term (spec 6, 4.2)
REQUANT_FORMAT_VERSION = 5  # a delta with a `requant` term: packed integer codes predicted (spec 4.2, 5.4)
MAX_FORMAT_VERSION = 5  # the newest version this reader reads
BACKBONE_LIST_NAME = "backbone.sha256"  # the shard list of a sharded backbone
BACKBONE_SHARD_PREFIX = "backbone"
MANIFEST_NAME = "wfactor.json"
MANIFEST_FORMAT = "wfactor.family"
BACKBONE_NAME = "backbone.safetensors"
DELTAS_DIR = "deltas"
AUX_DIR = "aux"

# Metadata keys in a delta file's safetensors __metadata__.
META_VERSION = "wfactor.format_version"
META_KIND = "wfactor.kind"
META_MEMBER = "wfactor.member"
META_BACKBONE = "wfactor.backbone_sha256"
META_RECORDS = "wfactor.records"

# Limits (spec section 7). Checked before anything is allocated.
MAX_SAFETENSORS_HEADER = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_NDIM = 8
MAX_NUMEL = 1 << 40
MAX_NAME_BYTES = 1024
MAX_KEY_BYTES = 1280  # safetensors keys: part keys are a tensor name plus a short suffix
MAX_MEMBERS = 10_000
MAX_TERMS = 8
MIN_BITS, MAX_BITS = 2, 8

MEMBER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# safetensors dtype string -> (numpy storage dtype, itemsize). BF16 has no numpy type: it is carried as
# uint16 bit patterns and only torch (or a reader's own code) gives it meaning.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
    # version 4 (spec 6): 8-bit floats are carried as their uint8 bit patterns, as BF16 is as uint16
    "F8_E4M3": (np.dtype("u1"), 1),
    "F8_E5M2": (np.dtype("u1"), 1),
    "U16": (np.dtype("<u2"), 2),
    "U32": (np.dtype("<u4"), 4),
    "U64": (np.dtype("<u8"), 8),
}
F8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"}) | F8_DTYPES
# dtypes that make a file version 4 (spec 8)
LOW_PRECISION_DTYPES = F8_DTYPES | {"U16", "U32", "U64"}
# dtypes the safetensors format defines that this version does not read (error `unsupported_dtype`, not
# `not_safetensors`: the file is fine, the reader is behind)
SAFETENSORS_ONLY_DTYPES = frozenset({"F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})
PART_ENCODINGS = frozenset({"raw", "zstd", "zstd_planes", "bitplanes"})


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][1]
