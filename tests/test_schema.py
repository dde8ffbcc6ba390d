"""spec/schema.json describes the JSON parts of real families (manifest and delta records)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT

from wfactor.format.constants import META_RECORDS
from wfactor.format.safetensors_io import SafetensorsFile

SCHEMA = json.loads((ROOT / "spec" / "schema.json").read_text())


def validator(ref: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**SCHEMA, "$ref": ref})


@pytest.mark.parametrize("which", ["lossless_family", "lossy_family"])
def test_fixture_families_match_the_schema(which: str, request: pytest.FixtureRequest) -> None:
    fam: Path = request.getfixturevalue(which)
    manifest = json.loads((fam / "wfactor.json").read_text())
    errors = list(validator("#/$defs/manifest").iter_errors(manifest))
    assert not errors, [e.message for e in errors[:3]]
    for m in manifest["members"]:
        with SafetensorsFile(fam / m["delta"]["path"]) as f:
            records = json.loads(f.metadata[META_RECORDS])
        errors = list(validator("#/$defs/records").iter_errors(records))
        assert not errors, [e.message for e in errors[:3]]
        assert len(records) == len(m["tensors"])


def test_schema_rejects_what_the_spec_forbids() -> None:
    v = validator("#/$defs/manifest")
    good = {
        "format": "wfactor.family",
        "format_version": 1,
        "members": [],
        "backbone": {"path": "backbone.safetensors", "sha256": "a" * 64, "size": 1},
    }
    v.validate(good)
    for bad_path in ("../x", "/abs", "a/./b"):
        bad = json.loads(json.dumps(good))
        bad["backbone"]["path"] = bad_path
        assert not v.is_valid(bad), bad_path
    bad = dict(good, format="other")
    assert not v.is_valid(bad)
    r = validator("#/$defs/record")
    rec = {
        "name": "w",
        "shape": [2],
        "dtype": "F32",
        "base": "w",
        "terms": [{"codec": "quant", "params": {"bits": 12}, "parts": {}}],
    }
    assert not r.is_valid(rec)
