"""wfactor: factor families of fine-tuned models into one shared backbone plus small per-model deltas.

Library entry points::

    import wfactor
    report = wfactor.factor(["chat=ckpt/chat", "code=ckpt/code"], base="ckpt/base", out="family")
    fam = wfactor.open_family("family")
    sd = fam.state_dict("chat", device="cuda")

Names load lazily (PEP 562): ``import wfactor`` and ``import wfactor.format`` need neither torch nor any
other heavy module; ``wfactor.factor`` imports what factoring needs the first time it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "DEFAULT_MAX_REL_ERROR": "wfactor.budget",
    "Budget": "wfactor.budget",
    "FactorReport": "wfactor.factoring",
    "factor": "wfactor.factoring",
    "Family": "wfactor.family",
    "open_family": "wfactor.family",
    "WfactorError": "wfactor.errors",
}

__all__ = [
    "DEFAULT_MAX_REL_ERROR",
    "Budget",
    "FactorReport",
    "Family",
    "WfactorError",
    "__version__",
    "factor",
    "open_family",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .budget import DEFAULT_MAX_REL_ERROR, Budget
    from .errors import WfactorError
    from .factoring import FactorReport, factor
    from .family import Family, open_family


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wfactor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
