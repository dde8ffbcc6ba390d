"""Codecs: each term of a member tensor's reconstruction is one codec, one module each.

``member = round_T(cast_C(base view) + term_1 + ... + term_k)`` then optionally ``XOR residual``
(spec/FORMAT.md section 5). Each codec module exposes ``encode`` (planning side) and ``decode`` (the term as
a compute-dtype tensor on the requested device). :mod:`wfactor.codecs.registry` maps names to modules.
"""

from .registry import CODECS, decode_term

__all__ = ["CODECS", "decode_term"]
