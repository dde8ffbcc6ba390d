"""The command line through click's CliRunner: outputs, --json, one-line errors and exit codes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import FAMILY, invoke, one_line_error


def test_factor_inspect_verify_materialize(tmp_path: Path) -> None:
    fam = tmp_path / "fam"
    code, out, _ = invoke(
        "factor",
        f"lora={FAMILY / 'lora'}",
        f"{FAMILY / 'top_ft'}",
        "--base",
        str(FAMILY / "base"),
        "-o",
        str(fam),
        "--json",
    )
    assert code == 0
    rep = json.loads(out)
    assert [m["name"] for m in rep["members"]] == ["lora", "top_ft"]  # name defaults to the directory
    assert rep["family_bytes"] < rep["original_bytes"]
    code, out, _ = invoke("inspect", str(fam), "--json")
    assert code == 0 and json.loads(out)["members"][0]["plan"]["codecs"]["lowrank"]["tensors"] == 16
    code, out, _ = invoke("inspect", str(fam / "deltas" / "lora.safetensors"), "--json")
    assert code == 0 and json.loads(out)["member"] == "lora"
    code, out, _ = invoke("verify", str(fam), "--against", f"lora={FAMILY / 'lora'}", "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = invoke("materialize", str(fam), "lora", "-o", str(tmp_path / "m"), "--json")
    assert code == 0 and json.loads(out)["files"] == ["config.json", "model.safetensors", "tokenizer_config.json"]
    code, out, _ = invoke(
        "factor", f"lora={FAMILY / 'lora'}", "--base", str(FAMILY / "base"), "-o", str(tmp_path / "t")
    )
    assert code == 0 and "total" in out and "lowrank" in out


def test_verify_exits_1_on_mismatch(tmp_path: Path) -> None:
    fam = tmp_path / "fam"
    assert invoke("factor", f"lora={FAMILY / 'lora'}", "--base", str(FAMILY / "base"), "-o", str(fam), "-q")[0] == 0
    # compare against the wrong original: every merged tensor differs beyond its recorded error
    code, out, _ = invoke("verify", str(fam), "--against", f"lora={FAMILY / 'full_ft'}")
    assert code == 1 and "FAIL" in out and "FAILED" in out
    data = bytearray((fam / "backbone.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (fam / "backbone.safetensors").write_bytes(bytes(data))
    code, out, _ = invoke("verify", str(fam), "--json")
    assert code == 1 and "sha256" in json.loads(out)["problems"][0]


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (
            ["factor", "missing/path", "--base", str(FAMILY / "base"), "-o", "OUT"],
            "not_found",
            "missing/path: no such file or directory",
        ),
        (
            ["factor", str(FAMILY / "lora"), "--base", str(FAMILY / "lora" / "config.json"), "-o", "OUT"],
            "not_safetensors",
            "config.json",
        ),
        (["factor", "bad name=x", "--base", str(FAMILY / "base"), "-o", "OUT"], "input", "member name 'bad name'"),
        (["inspect", "nowhere"], "not_found", "nowhere: no such family directory"),
        (
            ["factor", f"a={FAMILY / 'lora'}", f"a={FAMILY / 'top_ft'}", "--base", str(FAMILY / "base"), "-o", "OUT"],
            "input",
            "used twice",
        ),
        (
            ["factor", str(FAMILY / "lora"), "--base", str(FAMILY / "base"), "-o", "OUT", "--max-rel-error", "0"],
            "input",
            "must be > 0",
        ),
    ],
)
def test_user_mistakes_get_one_line_errors(tmp_path: Path, args: list[str], code: str, fragment: str) -> None:
    args = [str(tmp_path / "OUT") if a == "OUT" else a for a in args]
    exit_code, _, err = invoke(*args)
    assert exit_code == 2
    one_line_error(err, code)
    assert fragment in err
    assert not (tmp_path / "OUT").exists()


def test_not_safetensors_input_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    code, _, err = invoke("factor", str(tmp_path / "m"), "--base", str(FAMILY / "base"), "-o", str(tmp_path / "o"))
    assert code == 2
    one_line_error(err, "not_safetensors")
    assert str(tmp_path / "m" / "model.safetensors") in err


def test_delta_against_another_backbone_is_refused_by_the_cli(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("factor", f"lora={FAMILY / 'lora'}", "--base", str(FAMILY / "base"), "-o", str(a), "-q")[0] == 0
    assert invoke("factor", f"lora={FAMILY / 'lora'}", "--base", str(FAMILY / "unrelated"), "-o", str(b), "-q")[0] == 0
    shutil.copyfile(b / "backbone.safetensors", a / "backbone.safetensors")  # same size: passes the cheap check
    man = json.loads((a / "wfactor.json").read_text())
    man["backbone"] = json.loads((b / "wfactor.json").read_text())["backbone"]
    (a / "wfactor.json").write_text(json.dumps(man))
    code, _, err = invoke("materialize", str(a), "lora", "-o", str(tmp_path / "m"))
    assert code == 1
    one_line_error(err, "backbone_mismatch")
    assert "lora.safetensors" in err


def test_unknown_member(tmp_path: Path) -> None:
    fam = tmp_path / "fam"
    invoke("factor", f"lora={FAMILY / 'lora'}", "--base", str(FAMILY / "base"), "-o", str(fam), "-q")
    code, _, err = invoke("materialize", str(fam), "nope", "-o", str(tmp_path / "m"))
    assert code == 2
    one_line_error(err, "not_found")
    assert "members: lora" in err


def test_help_texts_have_examples() -> None:
    for cmd in ("factor", "materialize", "verify", "inspect"):
        code, out, _ = invoke(cmd, "--help")
        assert code == 0 and "Example" in out


def test_progress_is_plain_lines_without_a_terminal_and_silent_with_q(tmp_path: Path) -> None:
    """Not a terminal (a CI log): one plain line per finished step, with its bytes and rate; -q: nothing."""
    args = ["factor", f"lora={FAMILY / 'lora'}", "--base", str(FAMILY / "base"), "--lossless"]
    code, _out, err = invoke(*args, "-o", str(tmp_path / "a"))
    assert code == 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert any(ln.startswith("backbone: ") for ln in lines) and any(ln.startswith("lora: ") for ln in lines)
    assert all(re.fullmatch(r"[\w .-]+: .+ in \d+\.\d s \(.+/s\)", ln) for ln in lines), lines
    code, _out, err = invoke(*args, "-o", str(tmp_path / "b"), "-q")
    assert code == 0 and err.strip() == ""
