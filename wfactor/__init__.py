"""wfactor: factor families of fine-tuned models into one shared backbone plus small per-model deltas.

Library entry points::

    import wfactor
    report = wfactor.factor(["chat=ckpt/chat", "code=ckpt/code"], base="ckpt/base", out="family")
    fam = wfactor.open_family("family")
    sd = fam.state_dict("chat", device="cuda")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import WfactorError  # noqa: E402
from .factor import FactorReport, factor  # noqa: E402
from .family import Family, open_family  # noqa: E402
from .plan import DEFAULT_MAX_REL_ERROR, Budget  # noqa: E402

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
