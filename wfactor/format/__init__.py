"""The wfactor format in code: constants and limits, safetensors I/O, parts, records, manifest.

Nothing here imports torch: a family can be parsed and validated with json, numpy and zstandard alone.
"""

from .constants import FORMAT_VERSION
from .delta import DeltaFile
from .manifest import FileRef, Manifest, MemberEntry, TensorMeta, read_manifest, sha256_file
from .parts import PartSpec, encode_part, read_part
from .records import Record, Term
from .safetensors_io import SafetensorsFile

__all__ = [
    "FORMAT_VERSION",
    "DeltaFile",
    "FileRef",
    "Manifest",
    "MemberEntry",
    "PartSpec",
    "Record",
    "SafetensorsFile",
    "TensorMeta",
    "Term",
    "encode_part",
    "read_part",
    "read_manifest",
    "sha256_file",
]
