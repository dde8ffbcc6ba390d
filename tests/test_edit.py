"""Growing families in place (wfactor/edit.py): `wfactor add` and `wfactor remove`, atomic, other members'
files untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from conftest import FAMILY, MEMBERS, invoke, one_line_error

import wfactor
from wfactor import edit
from wfactor.format.manifest import read_manifest


def digests(root: Path) -> dict[str, str]:
    """Every file under the family directory (hidden ones included) -> sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def referenced(root: Path) -> set[str]:
    man = read_manifest(root)
    refs = {"wfactor.json", man.backbone.path} | {r.path for r in man.backbone_shards}
    for m in man.members:
        refs |= {m.delta.path} | {a.path for a in m.aux_files}
    return refs


@pytest.fixture
def fam(lossy_family: Path, tmp_path: Path) -> Path:
    out = tmp_path / "fam"
    shutil.copytree(lossy_family, out)
    return out


def verify(root: Path, **against: Path) -> dict:
    args = [f"--against={k}={v}" for k, v in against.items()]
    code, out, err = invoke("verify", str(root), "--json", *args)
    assert code == 0, out + err
    return json.loads(out)


def test_remove_then_add_back_gives_identical_bytes(fam: Path) -> None:
    before = digests(fam)
    old_entry = read_manifest(fam).member("top_ft")
    code, out, err = invoke("remove", str(fam), "top_ft", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["removed"] == "top_ft" and "top_ft" not in rep["members"] and rep["freed_bytes"] > old_entry.delta.size
    after = digests(fam)
    gone = {k for k in before if k not in after}
    assert gone == {old_entry.delta.path} | {a.path for a in old_entry.aux_files}
    assert not (fam / "aux" / "top_ft").exists()
    assert all(after[k] == before[k] for k in after if k != "wfactor.json")  # nobody else was touched
    assert set(after) == referenced(fam)
    verify(fam)

    code, out, err = invoke("add", str(fam), f"top_ft={FAMILY / 'top_ft'}", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["name"] == "top_ft" and rep["related"] is True and rep["delta_bytes"] == old_entry.delta.size
    again = digests(fam)
    # deterministic: the same member and budget against the same backbone give the same delta, byte for byte
    assert {k: v for k, v in again.items() if k != "wfactor.json"} == {
        k: v for k, v in before.items() if k != "wfactor.json"
    }
    new_entry = read_manifest(fam).member("top_ft")
    assert new_entry.to_json() == old_entry.to_json()
    assert read_manifest(fam).members[-1].name == "top_ft"  # appended
    verify(fam, top_ft=FAMILY / "top_ft")


def test_refusals_are_one_line_and_change_nothing(fam: Path) -> None:
    before = digests(fam)
    cases = [
        (("add", str(fam), f"lora={FAMILY / 'top_ft'}"), "input", "already has a member named 'lora'"),
        (("add", str(fam), f"x={FAMILY / 'top_ft'}", "--target-bytes", "100000"), "input", "whole family"),
        (("add", str(fam), f"x={FAMILY / 'top_ft'}", "--target-ratio", "0.3"), "input", "whole family"),
        (("add", str(fam), f"x={FAMILY / 'top_ft'}", "--max-rel-error", "0"), "input", "must be > 0"),
        (("add", str(fam), "x=/no/such/model"), "not_found", "no such file"),
        (("add", str(fam / "nope"), f"x={FAMILY / 'top_ft'}"), "not_found", "no such family"),
        (("remove", str(fam), "nope"), "not_found", "no member named 'nope'"),
    ]
    for args, code, words in cases:
        rc, _, err = invoke(*args)
        assert rc == 2, (args, err)
        assert words in one_line_error(err, code), args
    assert digests(fam) == before
    for name in ["full_ft", "top_ft", "lora", "bf16", "vocab_grown"]:
        edit.remove(fam, name)
    rc, _, err = invoke("remove", str(fam), "unrelated")
    assert rc == 2 and "only member" in one_line_error(err, "input")
    assert read_manifest(fam).members[0].name == "unrelated"
    assert set(digests(fam)) == referenced(fam)


@pytest.mark.parametrize("where", ["write_delta", "replace_manifest"])
def test_failed_add_leaves_the_family_as_it_was(fam: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Stopped while the delta is being written, or after every new file is in place but before the manifest
    is replaced: the family is byte for byte what it was, with no stray file."""
    before = digests(fam)
    real = getattr(edit, where)

    def crash(*args: object, **kw: object) -> object:
        if where == "write_delta":
            Path(str(args[3])).write_bytes(b"half a delta")  # its temporary name
        else:
            assert (fam / "deltas" / "extra.safetensors").is_file() and (fam / "aux" / "extra").is_dir()
        raise KeyboardInterrupt

    monkeypatch.setattr(edit, where, crash)
    with pytest.raises(KeyboardInterrupt):
        edit.add(fam, f"extra={FAMILY / 'unrelated'}")
    assert digests(fam) == before
    assert sorted(p.name for p in (fam / "aux").iterdir()) == sorted(MEMBERS)
    monkeypatch.setattr(edit, where, real)
    edit.add(fam, f"extra={FAMILY / 'unrelated'}")  # and the same add then succeeds
    assert read_manifest(fam).members[-1].name == "extra"


def test_force_replaces_a_member_with_a_peft_adapter_on_the_backbone(fam: Path, tmp_path: Path) -> None:
    """Export member lora as a PEFT adapter, then add it back in place of lora: base = the backbone."""
    before = digests(fam)
    code, _, err = invoke("export-peft", str(fam), "lora", "-o", str(tmp_path / "lora-peft"))
    assert code == 0, err
    with wfactor.open_family(fam) as f:
        want = f.state_dict("lora")
    code, out, err = invoke("add", str(fam), f"lora={tmp_path / 'lora-peft'}", "--json")
    assert code == 2 and "--force" in one_line_error(err, "input")
    code, out, err = invoke("add", str(fam), f"lora={tmp_path / 'lora-peft'}", "--force", "--lossless", "--json")
    assert code == 0, err
    entry = read_manifest(fam).member("lora")
    assert entry.delta.path == "deltas/lora@1.safetensors"  # never written over a referenced file
    after = digests(fam)
    assert "deltas/lora.safetensors" not in after and set(after) == referenced(fam)
    assert [m.name for m in read_manifest(fam).members] == MEMBERS  # replaced in place, order kept
    schema = json.loads((FAMILY.parents[1] / "spec" / "schema.json").read_text())
    jsonschema.validate(json.loads((fam / "wfactor.json").read_text()), {**schema, "$ref": "#/$defs/manifest"})
    assert json.loads(out)["name"] == "lora"
    for k, v in after.items():
        if k.startswith("deltas/") and "lora" not in k:
            assert before[k] == v
    with wfactor.open_family(fam) as f:
        got = f.state_dict("lora")
    for k, w in want.items():
        assert float((got[k] - w).norm()) <= 1e-6 * float(w.norm()), k  # base + U V, computed twice


def test_add_to_a_sharded_family_unrelated_and_adapter_members(lossy_family: Path, tmp_path: Path) -> None:
    """A version-2 family (sharded backbone): add an unrelated model (stored whole, flagged) and a PEFT
    adapter on the backbone; both rebuild exactly (lossless), and remove frees their files."""
    fam = tmp_path / "sharded"
    wfactor.factor(
        [f"lora={FAMILY / 'lora'}"], str(FAMILY / "base"), fam, wfactor.Budget(lossless=True), max_shard_size=300_000
    )
    assert read_manifest(fam).backbone_shards
    rep = edit.add(fam, f"stranger={FAMILY / 'unrelated'}", wfactor.Budget(lossless=True))
    assert rep.related is False and read_manifest(fam).member("stranger").plan["related"] is False
    code, _, err = invoke("export-peft", str(lossy_family), "lora", "-o", str(tmp_path / "lora-peft"))
    assert code == 0, err
    code, _, err = invoke("add", str(fam), f"peft={tmp_path / 'lora-peft'}", "--lossless", "-q")
    assert code == 0, err
    verify(fam, stranger=FAMILY / "unrelated")
    with wfactor.open_family(lossy_family) as f:
        want = f.state_dict("lora")
    with wfactor.open_family(fam) as f:
        got = f.state_dict("peft")
    for k, w in want.items():
        assert float((got[k] - w).norm()) <= 1e-6 * float(w.norm()), k
    shards = {k: v for k, v in digests(fam).items() if k.startswith("backbone")}
    for name in ("peft", "stranger"):
        edit.remove(fam, name)
    assert set(digests(fam)) == referenced(fam) and [m.name for m in read_manifest(fam).members] == ["lora"]
    assert {k: v for k, v in digests(fam).items() if k.startswith("backbone")} == shards
