"""Codecs: each term of a member tensor's reconstruction is one codec, one module each.

``member = round_T(cast_C(base view) + term_1 + ... + term_k)`` then optionally ``XOR residual``
(spec/FORMAT.md section 5). Each codec module exposes ``encode`` (planning side) and ``decode`` (the term as
a compute-dtype tensor on the requested device). :mod:`wfactor.codecs.registry` maps names to modules.

The package imports nothing itself (the codecs use torch; :mod:`wfactor.codecs.base` does not), so that
torch-free code (:mod:`wfactor.exact`) can use ``Encoded``; ``CODECS`` and ``decode_term`` load the registry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CODECS", "decode_term"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
