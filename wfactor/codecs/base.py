"""What every codec's ``encode`` returns: parameters and named arrays ready to become stored parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Encoded:
    """One encoded term. ``arrays`` maps a part role to (numpy storage array, format dtype, encoding)."""

    codec: str
    params: dict[str, Any]
    arrays: dict[str, tuple[np.ndarray, str, str]] = field(default_factory=dict)
