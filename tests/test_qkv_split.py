"""Attention the bridge cannot split, split by the adapter at the Hugging Face projections.

For GPT-J, GPT-Neo, OPT, XGLM, Llama-4 (text), PhiMoE and the ModernBERT decoder, TransformerLens's bridge wraps the
attention as a plain ``AttentionBridge``: it has no per-head query/key/value inputs and no
per-head outputs. The adapter supplies them (``ModelAdapter.own_attention``): each head's
(group's) copy of the block's input, normalised by the block's own pre-attention norm and
projected by that head's rows of ``q_proj``/``k_proj``/``v_proj``; each head's output from its
columns of the output projection. Here, on the tiny models of ``tests/architectures.py``:
unchanged copies give the Hugging Face model's logits; the check at load passes; one edge into
a query, key and value equals plain Hugging Face hooks that recompute that head's (group's)
projection columns from a shifted input; random sparse circuits equal the slow reference in one
pass, stacked, resumed and differentiated; EAP is the derivative of exact patching; no hook is
left after an exception. JetMoE (a mixture of attention heads) and AFMoE and Laguna (an output
gate computed from the layer's input, outside q/k/v) are refused with one line.
"""

from __future__ import annotations

import pytest
import torch

from architectures import build, load_dtype
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.checks import check_model
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.errors import UserError
import test_architectures as matrix  # its test functions are called here, not imported (pytest would collect them)
import test_sparse_circuits as sparse
from test_architectures import _columns, _module, _one_edge_against_hugging_face, adapter_for
from test_sparse_circuits import _assert_close, random_circuit, slow_patched_logits
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.engine.precision import exact_tolerance
from tiny_models import random_pair, tiny_tokenizer

# (decoder layers, pre-attention norm, attention module (a dotted path), q/k/v projections): all separate
# Linear layers with head-major columns, so the column layout is None in test_architectures' terms.
QKV_SPLIT = {
    "gptj": ("transformer.h", "ln_1", "attn", ("q_proj", "k_proj", "v_proj"), None),
    "gpt-neo": ("transformer.h", "ln_1", "attn.attention", ("q_proj", "k_proj", "v_proj"), None),
    "opt": ("model.decoder.layers", "self_attn_layer_norm", "self_attn", ("q_proj", "k_proj", "v_proj"), None),
    "xglm": ("model.layers", "self_attn_layer_norm", "self_attn", ("q_proj", "k_proj", "v_proj"), None),
    "llama4-text": ("model.layers", "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), None),
    "phimoe": ("model.layers", "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), None),
    "modernbert-decoder": ("model.layers", "attn_norm", "attn", ("q_proj", "k_proj", "v_proj"), None),
}
FAMILIES = list(QKV_SPLIT)


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


def _add_at_split_qkv(hf, name: str, receiver: str, delta: torch.Tensor, n_heads: int, n_groups: int) -> list:
    """Hooks on Hugging Face modules alone: the receiver's head (q) or group (k, v) columns of its
    projection recomputed from the layer's input plus ``delta``, every other column as before."""
    layers, norm_name, attn_path, projections, layout = QKV_SPLIT[name]
    layer = int(receiver[1:].split(".")[0])
    decoder = _module(hf, layers)[layer]
    kind = receiver[-2]
    index = int(receiver.split(".")[1][1:].split("<")[0])
    module = getattr(_module(decoder, attn_path), projections["qkv".index(kind)])
    cols = _columns(layout, kind, index, n_heads, n_groups, module.weight.shape[0])
    kept = {}

    def keep(_m, args, kwargs):
        kept["x"] = args[0] if args else kwargs["hidden_states"]

    def replace(_m, _args, out):
        x = getattr(decoder, norm_name)(kept["x"] + delta.to(kept["x"].dtype))
        full = torch.nn.functional.linear(x, module.weight, module.bias)
        out = out.clone()
        out[..., cols] = full[..., cols]
        return out

    return [decoder.register_forward_pre_hook(keep, with_kwargs=True), module.register_forward_hook(replace)]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("edge", ["input->a1.h2<q>", "a0.h1->a2.g0<k>", "m0->a1.g-1<v>", "a1.h3->a2.h0<q>"])
def test_edges_into_queries_keys_and_values_match_the_hugging_face_modules(name, edge, tokenizer):
    adapter = adapter_for(name, tokenizer)
    H, G = adapter.shape.n_heads, adapter.shape.n_kv_groups
    edge = edge.replace("g-1", f"g{G - 1}")
    _one_edge_against_hugging_face(adapter, name, edge, lambda hf, receiver, delta: _add_at_split_qkv(hf, name, receiver, delta, H, G))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_edge_into_a_query_key_or_value_equals_its_columns_from_the_corrupted_run(name, tokenizer):
    """Receiver-level patches against plain Hugging Face hooks: all of a head's (group's) edges
    removed = that head's (group's) projection columns taken from the corrupted run."""
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(batch=2, pos=5, seed=13)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    clean_logits = adapter.logits(clean)
    hf = build(name, dtype=load_dtype(name))
    layers_path, _, attn_path, projections, layout = QKV_SPLIT[name]
    layers = _module(hf, layers_path)
    H, G = adapter.shape.n_heads, adapter.shape.n_kv_groups
    for receiver in ("a0.h1<q>", f"a1.g{G - 1}<k>", "a2.g0<v>", f"a2.h{H - 1}<q>"):
        layer, kind = int(receiver[1]), receiver[-2]
        index = int(receiver.split(".")[1][1:].split("<")[0])
        module = getattr(_module(layers[layer], attn_path), projections["qkv".index(kind)])
        cols = _columns(layout, kind, index, H, G, module.weight.shape[0])
        seen = {}
        with torch.no_grad():
            handle = module.register_forward_hook(lambda _m, _a, out: seen.__setitem__("x", out.detach().clone()))
            try:
                hf(corrupted)
            finally:
                handle.remove()

            def put(_m, _a, out):
                out = out.clone()
                out[..., cols] = seen["x"][..., cols]
                return out

            handle = module.register_forward_hook(put)
            try:
                want = hf(clean).logits
            finally:
                handle.remove()
        removed = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
        removed[:, graph._receiver_index[receiver]] = 1
        got = patched_logits(adapter, graph, clean, corr, removed * graph.allowed)
        assert (want - clean_logits).abs().max() > 1e-4, receiver
        working = torch.float32 if adapter.dtype == torch.float64 else adapter.dtype
        tol = exact_tolerance(working, adapter.shape.n_layers, want.abs().max().item())
        assert (got - want).abs().max().item() <= tol, receiver


@pytest.mark.parametrize("name", FAMILIES)
def test_random_sparse_circuits_equal_the_slow_reference(name, tokenizer):
    adapter = adapter_for(name, tokenizer)
    graph = EdgeGraph(adapter.shape)
    clean, corrupted = random_pair(batch=2, pos=5, seed=11)
    corr, _ = run_recording_senders(adapter, graph, corrupted)
    for kept, seed, mixed in ((0.05, 0, False), (0.2, 1, True), (0.8, 2, True), (0.99, 3, False)):
        removed = random_circuit(graph, kept, seed, mixed)
        want = slow_patched_logits(adapter, graph, clean, corr, removed)
        got = patched_logits(adapter, graph, clean, corr, removed)
        _assert_close(adapter, got, want, f"one pass, {kept:.0%} kept, seed {seed}")


@pytest.mark.parametrize("name", FAMILIES)
def test_stacked_resumed_and_differentiated_passes(name, tokenizer):
    matrix.test_stacked_circuits_equal_one_copy_per_circuit(name, tokenizer)
    matrix.test_a_pass_resumed_from_an_earlier_ones_blocks_is_the_same_bit_for_bit(name, tokenizer)
    sparse.test_the_differentiable_pass_of_attribution_patches_random_circuits_exactly(name, tokenizer)


@pytest.mark.parametrize("name", ["gptj", "opt", "llama4-text"])
def test_eap_is_the_derivative_of_exact_patching_on_split_attention(name, tokenizer):
    matrix.test_eap_is_the_derivative_of_exact_patching(name, tokenizer)


def test_the_hooks_the_adapter_supplies_for_split_attention_are_removed_after_an_exception(tokenizer):
    adapter = adapter_for("gptj", tokenizer)

    def boom(x, hook=None):
        raise RuntimeError("inside a hook")

    modules = [m for p in adapter.own_attention for m in (p.q, p.k, p.v, p.o)]
    for name in ("blocks.1.hook_k_input", "blocks.1.attn.hook_result"):
        with pytest.raises(RuntimeError, match="inside a hook"):
            with adapter.hooks([("blocks.0.hook_q_input", _identity), ("blocks.0.attn.hook_result", _identity), (name, boom),
                                ("blocks.2.hook_mlp_in", _identity)]):
                adapter.logits(torch.zeros((1, 4), dtype=torch.long))
        assert adapter.hook_count() == 0
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
        assert all(not block.mlp._forward_pre_hooks for block in adapter.bridge.blocks)


@pytest.mark.parametrize("name", ["afmoe", "laguna"])
def test_an_attention_output_gate_read_from_the_layer_input_is_refused_with_one_line(name, tokenizer):
    """AFMoE and Laguna multiply each head's output by a gate computed from the layer's input: a
    path from the residual stream into the heads that no q/k/v receiver carries."""
    with pytest.raises(UserError, match="separate query/key/value inputs") as refused:
        ModelAdapter.from_hf(build(name, dtype=torch.float32), tokenizer, name=f"tiny-{name}", hf_id=name, dtype=torch.float32)
    message = str(refused.value)
    assert "\n" not in message and type(build(name)).__name__ in message and "outside the query/key/value projections" in message


def test_a_mixture_of_attention_heads_is_refused_with_one_line(tokenizer):
    with pytest.raises(UserError, match="separate query/key/value inputs") as refused:
        ModelAdapter.from_hf(build("jetmoe", dtype=torch.float32), tokenizer, name="tiny-jetmoe", hf_id="jetmoe", dtype=torch.float32)
    message = str(refused.value)
    assert "\n" not in message and "JetMoeForCausalLM" in message and "mixture of attention heads" in message


def test_direct_effects_are_left_unmeasured_where_a_head_sits_before_the_unembedding(tokenizer):
    """The ModernBERT decoder's logits pass a dense layer, a GELU and a norm after the final norm:
    a head's direct effect is not the final norm and W_U of its output, so roles leave it NaN."""
    import math

    from circuitfinder.graphs.roles import measure_roles
    from test_architectures import adapter_for
    from test_attribution import tiny_task

    assert adapter_for("llama", tokenizer).unembedding_is_linear
    adapter = adapter_for("modernbert-decoder", tokenizer)
    assert not adapter.unembedding_is_linear
    table = measure_roles(adapter, tiny_task(), max_prompts=4)
    assert table["direct_effect"].map(math.isnan).all() and not table["previous_token"].map(math.isnan).any()
