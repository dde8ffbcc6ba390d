"""The README's CLI reference is generated from --help; it must not drift from the commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from wfactor import clidoc
from wfactor.cli import main as group

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cli_reference_matches_help() -> None:
    text = README.read_text(encoding="utf-8")
    expected = clidoc.splice(text, clidoc.render(group))
    assert text == expected, "README.md's CLI reference differs from the commands' --help: run `make docs`"


def test_every_command_is_documented_with_an_example() -> None:
    body = clidoc.render(group)
    import click

    ctx = click.Context(group, info_name="wfactor")
    for name in group.list_commands(ctx):
        assert f"### `wfactor {name}`" in body
        cmd = group.get_command(ctx, name)
        assert cmd is not None and cmd.help and "wfactor " + name in cmd.help, f"{name}: --help lacks an example"


def test_check_mode_detects_drift(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{clidoc.START}\nold text\n{clidoc.END}\noutro\n", encoding="utf-8")
    assert clidoc.main([str(stale), "--check"]) == 1
    assert clidoc.main([str(stale)]) == 0
    fixed = stale.read_text(encoding="utf-8")
    assert fixed.startswith("intro\n") and fixed.endswith("outro\n") and "### `wfactor factor`" in fixed
    assert clidoc.main([str(stale), "--check"]) == 0


def test_missing_markers_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "README.md"
    p.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        clidoc.main([str(p)])
