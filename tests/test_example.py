"""fixtures/example_serving.py, the README's serving example, runs and does what it says: a transformers
Llama built from its config with its parameters on the meta device, a member attached (deltas kept
factored), outputs equal to the original member's, and a mixed batch equal to each member alone."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_serving_example(tmp_path: Path) -> None:
    import example_serving

    result = example_serving.main(tmp_path)
    assert set(result["cosine"]) == {"chat", "code"}
    assert result["cosine"]["chat"] >= 0.99999  # a merged LoRA: exact low-rank factors
    assert result["cosine"]["code"] >= 0.999  # a full fine-tune at the default budget
    assert result["factored_layers"]["chat"] >= 4 and result["factored_layers"]["code"] >= 4
    assert result["mixed_batch_max_abs_diff"] == 0.0


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers(tmp_path: Path) -> None:
    """Parameters registered inside empty_weights() are on the meta device, computed buffers are real, and
    the patch is undone afterwards (also when the body raises)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import wfactor.torch as wt

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    with wt.empty_weights():
        model = LlamaForCausalLM(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type != "meta" for b in model.buffers())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="boom"), wt.empty_weights():
        raise RuntimeError("boom")
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
