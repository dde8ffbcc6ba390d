"""Per-tensor records of a delta file (spec/FORMAT.md section 4) and their structural validation.

Validation here needs only the record and the backbone's shapes; checks that need the stored values
(sparse indices in range, quant codes within the bit width) run when the part is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import CodecError, LimitError
from .codec_schema import CODEC_NAMES, REQUANT_LAYOUTS, SCHEMAS, check_params, matrix_view
from .constants import DTYPES, FLOAT_DTYPES, LOW_PRECISION_DTYPES, MAX_TERMS
from .parts import PartSpec
from .safetensors_io import check_name, check_shape

CODECS = CODEC_NAMES


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix view of a tensor: rows = first dimension, cols = product of the rest (1-D: one row)."""
    return matrix_view(shape)


@dataclass
class Term:
    codec: str
    params: dict[str, Any]
    parts: dict[str, PartSpec]

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "params": dict(self.params),
            "parts": {role: p.to_json() for role, p in sorted(self.parts.items())},
        }


@dataclass
class Record:
    name: str
    shape: tuple[int, ...]
    dtype: str
    base: str | None
    terms: list[Term] = field(default_factory=list)
    residual: PartSpec | None = None
    error: dict[str, float] = field(default_factory=dict)
    same_as: str | None = None

    @property
    def codec(self) -> str:
        """A one-word summary used in reports: identical, base, dense, lowrank+quant, ..., with +residual."""
        if self.same_as is not None:
            return "tied"
        if not self.terms:
            words = ["identical" if self.residual is None and self.error.get("rel_l2", 0.0) == 0.0 else "base"]
        else:
            words = [t.codec for t in self.terms]
        if self.residual is not None:
            words.append("residual")
        return "+".join(words)

    def part_specs(self) -> list[PartSpec]:
        specs = [p for t in self.terms for p in t.parts.values()]
        if self.residual is not None:
            specs.append(self.residual)
        return specs

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "base": self.base}
        out["terms"] = [t.to_json() for t in self.terms]
        out["residual"] = self.residual.to_json() if self.residual is not None else None
        # RFC 8259 JSON has no NaN/Infinity: a non-finite error is written as null
        # (four significant digits: the error is informative, and headers stay small)
        out["error"] = {k: (float(f"{v:.4g}") if math.isfinite(v) else None) for k, v in self.error.items()}
        if self.same_as is not None:
            out["same_as"] = self.same_as
        return out


def _requant_params(obj: dict[str, Any]) -> object | None:
    """The params of a record's requant term in its raw JSON (before the terms are validated), else None."""
    terms = obj.get("terms")
    if isinstance(terms, list):
        for t in terms:
            if isinstance(t, dict) and t.get("codec") == "requant":
                return t.get("params", {})
    return None


def _expect(part: PartSpec, where: str, role: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    if part.shape != shape or part.dtype not in dtypes:
        raise CodecError(
            f"{where}: part {role!r} must be {list(shape)} x {'|'.join(dtypes)}, "
            f"found {list(part.shape)} x {part.dtype}"
        )


def record_version(rec: Record) -> int:
    """The lowest format version that can hold this record (spec 8): 5 for a requant term, 4 for a
    low-precision dtype (F8, U16, U32, U64) or a rescale term, 3 for a bitplanes part, else 1."""
    term_version = max((SCHEMAS[t.codec].version for t in rec.terms), default=1)
    if term_version >= 5:
        return term_version
    if rec.dtype in LOW_PRECISION_DTYPES or term_version >= 4:
        return 4
    if any(s.encoding == "bitplanes" for s in rec.part_specs()):
        return 3
    return 1


def validate_term(term: Term, shape: tuple[int, ...], dtype: str, where: str) -> None:
    """A term against its codec's schema (:data:`wfactor.format.codec_schema.SCHEMAS`): parts, params, shapes."""
    schema = SCHEMAS.get(term.codec)
    if schema is None:
        raise CodecError(f"{where}: unknown codec {term.codec!r}; this reader knows {', '.join(CODECS)}")
    roles = set(term.parts)
    if roles != set(schema.roles):
        want = " and ".join(repr(r) for r in schema.roles)
        raise CodecError(
            f"{where}: {schema.name} needs exactly the part{'s' if len(schema.roles) > 1 else ''} {want}, "
            f"found {sorted(roles)}"
        )
    if len(shape) < schema.min_ndim:
        raise CodecError(
            f"{where}: {schema.name} needs a tensor of at least {schema.min_ndim} dimensions, found {list(shape)}"
        )
    try:
        if schema.name == "requant":  # string parameters and a shape that follows from them: its own check
            params = check_requant(term.params, shape, dtype, where)
        else:
            params = check_params(schema, term.params, shape, where)
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    m, n = rows_cols(shape)
    for ps in schema.parts:
        _expect(term.parts[ps.role], where, ps.role, ps.dims(m, n, shape, params), ps.dtypes or (dtype,))


def _int(params: dict[str, Any], name: str, low: int, high: int, where: str) -> int:
    v = params.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{where}: parameter {name!r} must be an integer, found {v!r}")
    if not low <= v <= high:
        raise ValueError(f"{where}: requant {name} {v} must lie in {low}..{high}")
    return v


def check_requant(params: dict[str, Any], shape: tuple[int, ...], dtype: str, where: str) -> dict[str, int]:
    """A requant term's parameters against its record (spec 4.2): bits 1..8, inputs n' >= 1, group_size
    1..n', zero 0..2^b - 1, a layout, the ``scales`` record's name (and ``groups``'), and the record's shape
    and dtype as the layout packs [m', n'] codes. Returns the integer parameters with ``rows`` = m'."""
    bits = _int(params, "bits", 1, 8, where)
    inputs = _int(params, "inputs", 1, 1 << 40, where)
    _int(params, "group_size", 1, inputs, where)
    _int(params, "zero", 0, (1 << bits) - 1, where)
    layout = params.get("layout")
    if layout not in REQUANT_LAYOUTS:
        raise ValueError(f"{where}: requant layout {layout!r} must be one of {', '.join(REQUANT_LAYOUTS)}")
    for key in ("scales", "groups"):
        v = params.get(key)
        if (key == "scales" or v is not None) and not isinstance(v, str):
            raise ValueError(f"{where}: requant {key} must name a record of the delta, found {v!r}")
    unknown = set(params) - {"bits", "inputs", "group_size", "zero", "layout", "scales", "groups"}
    if unknown:
        raise ValueError(f"{where}: requant has no parameter {sorted(unknown)[0]!r}")
    if len(shape) != 2:
        raise ValueError(f"{where}: a requant record is a matrix, found shape {list(shape)}")
    rows = shape[1] if layout == "columns" else shape[0]
    words = -(-inputs * bits // 32)
    want = {"rows": ((rows, words), "I32"), "columns": ((words, rows), "I32"), "codes": ((rows, inputs), "I8")}
    wshape, wdtype = want[str(layout)]
    if (tuple(shape), dtype) != (wshape, wdtype):
        raise ValueError(
            f"{where}: a requant record of layout {layout} for {inputs} inputs at {bits} bits is "
            f"{list(wshape)} x {wdtype}, found {list(shape)} x {dtype}"
        )
    out = {k: int(params[k]) for k in ("bits", "inputs", "group_size", "zero")}
    out["rows"] = rows
    return out


def requant_base_shape(rec: Record) -> tuple[int, int] | None:
    """The [m', n'] base shape of a requant record, or None for any other record."""
    if not rec.terms or rec.terms[0].codec != "requant":
        return None
    p = rec.terms[0].params
    return (rec.shape[1] if p["layout"] == "columns" else rec.shape[0], int(p["inputs"]))


def record_from_json(obj: Any, base_shapes: dict[str, tuple[tuple[int, ...], str]] | None, where: str) -> Record:
    """Parse and structurally validate one record against the backbone's {name: (shape, dtype)}.

    ``base_shapes=None`` (a delta inspected without its backbone) skips the checks against the backbone."""
    if not isinstance(obj, dict):
        raise CodecError(f"{where}: each record must be a JSON object")
    name = check_name(obj.get("name"), where, bad=CodecError)
    where = f"{where}: tensor {name!r:.80}"
    missing = [k for k in ("shape", "dtype", "base") if k not in obj]
    if missing:
        raise CodecError(f"{where}: a record needs name, shape, dtype and base; {missing[0]!r} is missing")
    shape = check_shape(obj.get("shape"), where, CodecError)
    dtype = obj.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CodecError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    base = obj.get("base")
    if base is not None and not isinstance(base, str):
        raise CodecError(f"{where}: base must be a tensor name or null")
    if base is not None and base_shapes is not None:
        if base not in base_shapes:
            raise CodecError(f"{where}: base tensor {base!r} is not in the backbone")
        bshape, bdtype = base_shapes[base]
        requant = _requant_params(obj)
        if requant is not None:  # spec 4.2: a float base of exactly [m', n'], whatever the record's dtype
            if not isinstance(requant, dict) or bdtype not in FLOAT_DTYPES:
                raise CodecError(f"{where}: base {base!r} is {bdtype}; a requant record needs a floating-point base")
        elif len(bshape) != len(shape):
            raise CodecError(f"{where}: base {base!r} has {len(bshape)} dimensions, the tensor {len(shape)}")
        elif (dtype in FLOAT_DTYPES) != (bdtype in FLOAT_DTYPES) or (dtype not in FLOAT_DTYPES and dtype != bdtype):
            raise CodecError(f"{where}: base {base!r} is {bdtype}; a {dtype} tensor cannot be predicted from it")
    raw_terms = obj.get("terms", [])
    if not isinstance(raw_terms, list) or len(raw_terms) > MAX_TERMS:
        raise LimitError(f"{where}: terms must be a list of at most {MAX_TERMS}")
    terms: list[Term] = []
    for t in raw_terms:
        if not isinstance(t, dict) or not isinstance(t.get("parts"), dict) or not isinstance(t.get("params", {}), dict):
            raise CodecError(f"{where}: each term must be an object with codec, params and parts")
        parts = {str(r): PartSpec.from_json(p, f"{where}: part {r!r}") for r, p in t["parts"].items()}
        term = Term(str(t.get("codec")), dict(t.get("params", {})), parts)
        validate_term(term, shape, dtype, where)
        terms.append(term)
    if any(t.codec == "rescale" for t in terms[1:]) or (terms and terms[0].codec == "rescale" and base is None):
        raise CodecError(f"{where}: a rescale term must be the first term, of a record with a base")
    if any(t.codec == "requant" for t in terms):
        if len(terms) != 1 or base is None:
            raise CodecError(f"{where}: a requant term must be the only term, of a record with a base")
        want = requant_base_shape(Record(name, shape, dtype, base, terms))
        if base_shapes is not None and base in base_shapes and tuple(base_shapes[base][0]) != want:
            found = list(base_shapes[base][0])
            raise CodecError(f"{where}: base {base!r} is {found}; this requant record packs a {list(want or ())} base")
    elif dtype not in FLOAT_DTYPES and any(t.codec != "dense" for t in terms):
        raise CodecError(f"{where}: a {dtype} tensor may only use the dense codec (or requant)")
    if any(t.codec == "dense" for t in terms) and (len(terms) != 1 or base is not None):
        raise CodecError(f"{where}: a dense term must be the only term, with base null")
    same_as = obj.get("same_as")
    if same_as is not None:
        if not isinstance(same_as, str) or base is not None or terms or obj.get("residual") is not None:
            raise CodecError(f"{where}: a same_as record names a tensor and has no base, terms or residual")
    elif base is None and [t.codec for t in terms] != ["dense"]:  # spec 4.1: exactly one dense term
        raise CodecError(f"{where}: a record without a base needs a dense term, and no other term")
    residual = None
    if obj.get("residual") is not None:
        residual = PartSpec.from_json(obj["residual"], f"{where}: residual")
        _expect(residual, where, "residual", shape, (dtype,))
        if any(t.codec == "lowrank" for t in terms):
            raise CodecError(f"{where}: a residual cannot follow a lowrank term (its rounding is not reproducible)")
    err = obj.get("error", {})
    if not isinstance(err, dict):
        raise CodecError(f"{where}: error must be an object")
    error = {k: float(v) for k, v in err.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rec = Record(name, shape, dtype, base, terms, residual, error, same_as)
    keys = [p.key for p in rec.part_specs()]
    if len(set(keys)) != len(keys):
        raise CodecError(f"{where}: two parts share one key")
    return rec
