"""Attention the bridge cannot split, split by the adapter at the Hugging Face projections.

For GPT-J, GPT-Neo, OPT, XGLM, Llama-4 (text), PhiMoE and the ModernBERT decoder, TransformerLens's bridge wraps the
attention as a plain ``AttentionBridge``: it has no per-head query/key/value inputs and no
per-head outputs. The adapter supplies them (``ModelAdapter.own_attention``): each head's
(group's) copy of the block's input, normalised by the block's own pre-attention norm and
projected by that head's rows of ``q_proj``/``k_proj``/``v_proj``; each head's output from its
columns of the output projection. These families are in the architecture matrix, so single
edges and whole receivers against plain Hugging Face hooks, random sparse circuits through every
pass and EAP are tested there (tests/engine/test_architectures.py, tests/engine/test_sparse_circuits.py). Here:
unchanged copies through every supplied hook give the Hugging Face model's logits; no hook is
left after an exception. JetMoE (a mixture of attention heads) and AFMoE and Laguna (an output
gate computed from the layer's input, outside q/k/v) are refused with one line.
"""

from __future__ import annotations

import pytest
import torch
from architectures import build, load_dtype
from helpers import adapter_for
from tiny_models import random_pair, tiny_tokenizer

from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.checks import check_model
from circuitfinder.engine.precision import exact_tolerance
from circuitfinder.errors import UserError

FAMILIES = ["gptj", "gpt-neo", "opt", "xglm", "llama4-text", "phimoe", "modernbert-decoder"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("qkv-split-tok"))


def _identity(x, hook=None):
    return x


def _copy(x, hook=None):
    return x + 0  # a new tensor: the adapter rebuilds the attention output from the heads' results


@pytest.mark.parametrize("name", FAMILIES)
def test_split_attention_gives_the_hugging_face_logits_and_passes_the_check_at_load(name, tokenizer):
    adapter = adapter_for(name, tokenizer)
    assert adapter.own_attention is not None and adapter.shape.parallel == (name == "gptj")
    hf = build(name, dtype=load_dtype(name))
    clean, _ = random_pair()
    with torch.no_grad():
        want = hf(clean).logits
        plain = adapter.logits(clean)
        L = adapter.shape.n_layers
        every = [(f"blocks.{l}.hook_{s}_input", _identity) for l in range(L) for s in "qkv"]
        every += [(f"blocks.{l}.attn.hook_result", _copy) for l in range(L)]
        with adapter.hooks(every):
            split = adapter.logits(clean)
    working = torch.float32 if adapter.dtype == torch.float64 else adapter.dtype  # two implementations
    tol = exact_tolerance(working, L, want.abs().max().item())
    assert (plain - want).abs().max().item() <= tol
    assert (split - want).abs().max().item() <= tol
    if adapter.dtype == torch.float64:  # the copies and the heads' sum are exact to float64's rounding
        assert (split - plain).abs().max().item() <= 1e-12 * want.abs().max().item()
    check_model(adapter)


def test_the_hooks_the_adapter_supplies_for_split_attention_are_removed_after_an_exception(tokenizer):
    adapter = adapter_for("gptj", tokenizer)

    def boom(x, hook=None):
        raise RuntimeError("inside a hook")

    modules = [m for p in adapter.own_attention for m in (p.q, p.k, p.v, p.o)]
    for name in ("blocks.1.hook_k_input", "blocks.1.attn.hook_result"):
        with pytest.raises(RuntimeError, match="inside a hook"):
            with adapter.hooks(
                [
                    ("blocks.0.hook_q_input", _identity),
                    ("blocks.0.attn.hook_result", _identity),
                    (name, boom),
                    ("blocks.2.hook_mlp_in", _identity),
                ]
            ):
                adapter.logits(torch.zeros((1, 4), dtype=torch.long))
        assert adapter.hook_count() == 0
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
        assert all(not block.mlp._forward_pre_hooks for block in adapter.bridge.blocks)


@pytest.mark.parametrize("name", ["afmoe", "laguna"])
def test_an_attention_output_gate_read_from_the_layer_input_is_refused_with_one_line(name, tokenizer):
    """AFMoE and Laguna multiply each head's output by a gate computed from the layer's input: a
    path from the residual stream into the heads that no q/k/v receiver carries."""
    with pytest.raises(UserError, match="separate query/key/value inputs") as refused:
        ModelAdapter.from_hf(
            build(name, dtype=torch.float32), tokenizer, name=f"tiny-{name}", hf_id=name, dtype=torch.float32
        )
    message = str(refused.value)
    assert (
        "\n" not in message
        and type(build(name)).__name__ in message
        and "outside the query/key/value projections" in message
    )


def test_a_mixture_of_attention_heads_is_refused_with_one_line(tokenizer):
    with pytest.raises(UserError, match="separate query/key/value inputs") as refused:
        ModelAdapter.from_hf(
            build("jetmoe", dtype=torch.float32), tokenizer, name="tiny-jetmoe", hf_id="jetmoe", dtype=torch.float32
        )
    message = str(refused.value)
    assert "\n" not in message and "JetMoeForCausalLM" in message and "mixture of attention heads" in message


def test_direct_effects_are_left_unmeasured_where_a_head_sits_before_the_unembedding(tokenizer):
    """The ModernBERT decoder's logits pass a dense layer, a GELU and a norm after the final norm:
    a head's direct effect is not the final norm and W_U of its output, so roles leave it NaN."""
    import math

    from helpers import adapter_for
    from tiny_models import tiny_task

    from circuitfinder.graphs.roles import measure_roles

    assert adapter_for("llama", tokenizer).unembedding_is_linear
    adapter = adapter_for("modernbert-decoder", tokenizer)
    assert not adapter.unembedding_is_linear
    table = measure_roles(adapter, tiny_task(), max_prompts=4)
    assert table["direct_effect"].map(math.isnan).all() and not table["previous_token"].map(math.isnan).any()
