"""Build a model without allocating or initialising its weights, for ``attach`` to fill.

A model built on the meta device has no storage for anything, buffers included, and buffers that a
module computes at construction (rotary inverse frequencies, position ids) are not in a checkpoint: they
would stay meta. ``empty_weights()`` puts only the **parameters** on the meta device, as they are
registered, so initialisers run on meta (free) and buffers are computed for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def empty_weights() -> Iterator[None]:
    """Inside, every parameter a module registers is moved to the meta device at once::

        with wfactor.torch.empty_weights():
            model = LlamaForCausalLM(config)     # no weight memory, no random init
        model = wfactor.torch.attach(model, family, "chat", device="cuda")

    Not thread-safe: it patches ``nn.Module.register_parameter`` while it is active."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
