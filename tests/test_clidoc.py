"""docs/cli.md, the CLI reference, is generated from --help and must not drift from the commands; the
README and docs/ link only to files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wfactor import clidoc
from wfactor.cli import main as group

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"


def test_cli_reference_matches_help() -> None:
    text = CLI_DOC.read_text(encoding="utf-8")
    expected = clidoc.splice(text, clidoc.render(group))
    assert text == expected, "docs/cli.md differs from the commands' --help: run `make docs`"
    assert clidoc.main([str(CLI_DOC), "--check"]) == 0


def test_readme_links_to_the_reference_and_keeps_none_of_its_own() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/cli.md" in readme
    assert clidoc.START not in readme and clidoc.END not in readme


def test_every_command_is_documented_with_an_example() -> None:
    body = clidoc.render(group)
    import click

    ctx = click.Context(group, info_name="wfactor")
    for name in group.list_commands(ctx):
        assert f"## `wfactor {name}`" in body
        cmd = group.get_command(ctx, name)
        assert cmd is not None and cmd.help and "wfactor " + name in cmd.help, f"{name}: --help lacks an example"


def test_check_mode_detects_drift(tmp_path: Path) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text(f"intro\n{clidoc.START}\nold text\n{clidoc.END}\noutro\n", encoding="utf-8")
    assert clidoc.main([str(stale), "--check"]) == 1
    assert clidoc.main([str(stale)]) == 0
    fixed = stale.read_text(encoding="utf-8")
    assert fixed.startswith("intro\n") and fixed.endswith("outro\n") and "## `wfactor factor`" in fixed
    assert clidoc.main([str(stale), "--check"]) == 0


def test_missing_markers_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "cli.md"
    p.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        clidoc.main([str(p)])


def test_missing_file_is_created_and_check_reports_it(tmp_path: Path) -> None:
    p = tmp_path / "docs" / "cli.md"
    assert clidoc.main([str(p), "--check"]) == 1
    assert not p.exists()
    assert clidoc.main([str(p)]) == 0
    text = p.read_text(encoding="utf-8")
    assert text.startswith("# Command-line reference\n") and "## `wfactor verify`" in text
    assert clidoc.main([str(p), "--check"]) == 0


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: markup dropped, lower case, punctuation removed, spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path):
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_in_the_readme_and_docs_resolve() -> None:
    """Every relative link in README.md and docs/*.md names an existing file, and every #anchor a heading."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for line in _prose(page):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    broken.append(f"{page.name}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
