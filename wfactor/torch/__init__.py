"""Factored runtime: run family members straight from the shared backbone plus their deltas.

``attach`` swaps a freshly built torch module's weights for a family member's: low-rank deltas stay
factored (``FactoredLinear`` / ``FactoredEmbedding`` compute ``x @ B.T + (x @ V.T) @ U.T`` without
materialising the member's weight), and tensors identical to the backbone are the backbone's own
storage, shared by every attached member. ``MultiModel`` runs one batch whose rows belong to different
members.

    import wfactor, wfactor.torch as wt
    fam = wfactor.open_family("family")
    with wt.empty_weights():  # parameters on the meta device: no weight memory, no random init
        model = MyModel(config)
    model = wt.attach(model, fam, "chat", device="cuda")
    multi = wt.MultiModel(fam, ["chat", "code"], lambda name: MyModel(config), device="cuda")
    logits = multi(ids, ["chat", "code", "chat"])
"""

from __future__ import annotations

from .attach import attach, lowrank_factors
from .empty import empty_weights
from .layers import FactoredEmbedding, FactoredLinear
from .multi import MultiModel

__all__ = ["FactoredEmbedding", "FactoredLinear", "MultiModel", "attach", "empty_weights", "lowrank_factors"]
