"""Shared fixtures: the committed fixture family, factored once per session (lossless and default lossy)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
FAMILY = FIXTURES / "family"
MEMBERS = ["full_ft", "top_ft", "lora", "bf16", "vocab_grown", "unrelated"]
RELATED = [m for m in MEMBERS if m != "unrelated"]

if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

# Nothing is fetched from the Hugging Face Hub at test time: a missing path that looks like a Hub id
# (org/name) is looked up in the local cache only. tests/test_hub.py lays out its own cache.
os.environ["HF_HUB_OFFLINE"] = "1"

# Verified-file stamps (wfactor/format/stamps.py) go to a cache of this test session, never to ~/.cache.
os.environ["WFACTOR_CACHE"] = tempfile.mkdtemp(prefix="wfactor-test-cache-")

# One torch thread in the test process: the fixtures are tiny, and on a small shared CI machine a thread
# pool spinning against other processes makes them 10-50x slower. (factor() pins one thread by itself.)
torch.set_num_threads(1)


def member_args() -> list[str]:
    return [f"{m}={FAMILY / m}" for m in MEMBERS]


@pytest.fixture(scope="session")
def lossless_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wfactor

    out = tmp_path_factory.mktemp("lossless") / "fam"
    wfactor.factor(member_args(), base=str(FAMILY / "base"), out=out, budget=wfactor.Budget(lossless=True))
    return out


@pytest.fixture(scope="session")
def lossy_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wfactor

    out = tmp_path_factory.mktemp("lossy") / "fam"
    wfactor.factor(member_args(), base=str(FAMILY / "base"), out=out)
    return out


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from wfactor.cli import main

    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def one_line_error(stderr: str, code: str) -> str:
    """Assert stderr is exactly one line ``error[code]: ...`` without a traceback; return it."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error[{code}]: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def zstd_spy_class(calls: list[tuple[int, int]]) -> type:
    """A stand-in for ``zstandard.ZstdDecompressor`` that records (declared content size, output limit) of
    every decode into ``calls``; ``decompressobj`` (only for parts of 0 bytes, whose frames must declare 0)
    records (0, -write_size). It wraps the real decompressor (the C type is not made for subclassing)."""
    import zstandard

    real = zstandard.ZstdDecompressor

    class Spy:
        def __init__(self, *args: Any, **kw: Any) -> None:
            self._real = real(*args, **kw)

        def decompress(self, data: Any, max_output_size: int = 0, **kw: Any) -> bytes:
            calls.append((zstandard.get_frame_parameters(data).content_size, max_output_size))
            out: bytes = self._real.decompress(data, max_output_size=max_output_size, **kw)
            return out

        def decompressobj(self, *args: Any, **kw: Any) -> Any:
            calls.append((0, -kw.get("write_size", args[0] if args else 0)))
            return self._real.decompressobj(*args, **kw)

    return Spy
