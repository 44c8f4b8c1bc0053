"""The patching engine against exact references on tiny random models of both block styles."""

import pytest
import torch
from tiny_models import add_to_receiver_hook, assert_exact, random_pair, tiny, tiny_hf_model  # noqa: F401 (fixture)

from circuitfinder.engine.adapter import ModelShape
from circuitfinder.engine.graph import EdgeGraph, expected_edge_count
from circuitfinder.engine.patching import patched_logits, run_recording_senders


@pytest.mark.parametrize(
    "shape, edges",
    [((12, 12, 12), 32_491), ((30, 9, 3), 70_651), ((18, 4, 1), 5_644), ((1, 1, 1), 8), ((3, 4, 2), None)],
)
def test_edge_count_matches_formula_and_published_counts(shape, edges):
    graph = EdgeGraph(ModelShape(*shape, d_model=8))
    assert graph.n_edges == expected_edge_count(*shape)
    if edges is not None:
        assert graph.n_edges == edges
    assert len(graph.sender_names) == graph.n_senders and len(graph.receiver_names) == graph.n_receivers
    # every edge goes from an earlier sender to a later receiver, and names round-trip
    s, r = torch.nonzero(graph.allowed)[-1].tolist()
    assert graph.edge_index(graph.edge_name(s, r)) == (s, r)


@pytest.mark.parametrize("shape", [(6, 8, 8), (3, 4, 2), (1, 1, 1)])  # Pythia-70m's shape first
def test_parallel_blocks_have_no_head_to_same_layer_mlp_edge(shape):
    L, H, _ = shape
    sequential = EdgeGraph(ModelShape(*shape, d_model=8))
    parallel = EdgeGraph(ModelShape(*shape, d_model=8, parallel=True))
    assert parallel.n_edges == expected_edge_count(*shape, parallel=True) == sequential.n_edges - L * H
    names = {parallel.edge_name(s, r) for s, r in torch.nonzero(parallel.allowed).tolist()}
    for l in range(L):
        assert not any(f"a{l}.h{h}->m{l}" in names for h in range(H))
        assert f"m{l - 1}->m{l}" in names if l else f"input->m{l}" in names
        assert f"a{l}.h0->logits" in names and (l == 0 or f"a{l - 1}.h{H - 1}->m{l}" in names)
    # the only difference: exactly those L·H edges
    assert (sequential.allowed & ~parallel.allowed).sum() == L * H and not (
        parallel.allowed & ~sequential.allowed
    ).any()


def test_layer_zero_receivers_read_only_the_input():
    graph = EdgeGraph(ModelShape(2, 3, 1, 8))
    assert graph.allowed[:, graph.receiver_names.index("a0.h2<q>")].nonzero().flatten().tolist() == [0]
    # an MLP reads its own layer's heads; the logits read everything
    mlp0 = graph.receiver_names.index("m0")
    assert graph.allowed[:, mlp0].sum() == 1 + 3
    assert graph.allowed[:, -1].all()


def _baselines(tiny, clean, corrupted):
    graph = EdgeGraph(tiny.shape)
    corrupted_senders, corrupted_logits = run_recording_senders(tiny, graph, corrupted)
    clean_senders, clean_logits = run_recording_senders(tiny, graph, clean)
    return graph, corrupted_senders, corrupted_logits, clean_senders, clean_logits


def test_full_circuit_is_clean_run_and_empty_circuit_is_corrupted_run(tiny):
    clean, corrupted = random_pair()
    graph, corr_senders, corr_logits, _, clean_logits = _baselines(tiny, clean, corrupted)
    assert (clean_logits - corr_logits).abs().max() > 1.0  # the two runs differ: the test can fail
    none_removed = torch.zeros(graph.n_senders, graph.n_receivers)
    all_removed = torch.ones(graph.n_senders, graph.n_receivers)
    assert_exact(tiny, patched_logits(tiny, graph, clean, corr_senders, none_removed), clean_logits)
    assert_exact(tiny, patched_logits(tiny, graph, clean, corr_senders, all_removed), corr_logits)


def _patch_one_edge(tiny, graph, clean, corr_senders, s, r):
    """The engine's logits with edge (s, r) alone patched."""
    removed = torch.zeros(graph.n_senders, graph.n_receivers)
    removed[s, r] = 1
    return patched_logits(tiny, graph, clean, corr_senders, removed)


def _one_edge_reference_by_hook(tiny, graph, clean, delta, receiver):
    """Clean run with ``delta`` added to one receiver's input through a single hook."""
    with torch.no_grad(), tiny.hooks([add_to_receiver_hook(tiny, graph, receiver, delta)]):
        return tiny.logits(clean)


@pytest.mark.parametrize(
    "edge",
    [
        "input->a0.h1<q>",
        "a0.h2->a1.h3<q>",
        "m0->a2.h0<q>",
        "a1.h0->a2.g1<k>",
        "input->a1.g0<v>",
        "a1.h3->m1",
        "m1->logits",
        "a2.h1->logits",
        "input->logits",
    ],
)
def test_single_edge_patch_matches_hand_built_reference(tiny, edge):
    clean, corrupted = random_pair(seed=1)
    graph, corr_senders, _, clean_senders, clean_logits = _baselines(tiny, clean, corrupted)
    s, r = graph.edge_index(edge)
    patched = _patch_one_edge(tiny, graph, clean, corr_senders, s, r)
    reference = _one_edge_reference_by_hook(tiny, graph, clean, corr_senders[s] - clean_senders[s], r)
    assert (patched - clean_logits).abs().max() > 1e-6  # the edge matters
    assert_exact(tiny, patched, reference)


@pytest.mark.parametrize("edge", ["a1.h3->m1", "m0->m2", "a2.h1->logits", "input->logits"])
def test_mlp_and_logit_edges_match_plain_huggingface_forward(tiny, edge):
    """Reference without TransformerLens: a pre-hook on the Hugging Face norm module that the receiver reads."""
    clean, corrupted = random_pair(seed=2)
    graph, corr_senders, _, clean_senders, _ = _baselines(tiny, clean, corrupted)
    s, r = graph.edge_index(edge)
    patched = _patch_one_edge(tiny, graph, clean, corr_senders, s, r)

    style = tiny.name.removeprefix("tiny-")
    hf = tiny_hf_model(style)
    body = hf.transformer if style == "gpt2" else hf.model
    receiver = graph.receiver_names[r]
    if receiver == "logits":
        module = body.ln_f if style == "gpt2" else body.norm
    else:
        block = (body.h if style == "gpt2" else body.layers)[int(receiver[1:])]
        mlp_norm = {"gpt2": "ln_2", "llama": "post_attention_layernorm", "gemma3": "pre_feedforward_layernorm"}[style]
        module = getattr(block, mlp_norm)
    delta = corr_senders[s] - clean_senders[s]
    handle = module.register_forward_pre_hook(lambda _m, args: (args[0] + delta,))
    try:
        with torch.no_grad():
            reference = hf(clean).logits
    finally:
        handle.remove()
    assert torch.allclose(patched, reference, atol=1e-5, rtol=0)


def test_per_prompt_circuits_match_separate_runs(tiny):
    clean, corrupted = random_pair(batch=2, seed=3)
    graph, corr_senders, *_ = _baselines(tiny, clean, corrupted)
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, graph.n_senders, graph.n_receivers, generator=g) < 0.3).double()
    together = patched_logits(tiny, graph, clean, corr_senders, masks)
    for i in range(2):
        alone = patched_logits(tiny, graph, clean[i : i + 1], corr_senders[:, i : i + 1], masks[i])
        assert_exact(tiny, together[i], alone[0])


def test_no_hook_remains_after_an_exception(tiny):
    clean, _ = random_pair()

    def boom(x, hook=None):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with tiny.hooks([(tiny.receiver_hook("mlp", 0), boom)]):
            tiny.logits(clean)
    assert tiny.hook_count() == 0


def _naive_patched_logits(tiny, graph, clean, corr_senders, removed):
    """The plain formulation: every receiver adds Σ_s removed[s, r] (corrupted_s − current_s) by einsum."""
    from circuitfinder.engine.patching import record_senders_hooks

    diff = corr_senders.clone()
    hooks = record_senders_hooks(tiny, graph, diff, -1.0)
    for point in graph.receiver_points:
        w = removed[: point.n_senders, point.start : point.stop].to(diff.dtype)

        def hook(x, hook=None, point=point, w=w):
            delta = torch.einsum("sbpd,sr->bprd", diff[: point.n_senders], w)
            return x + (delta if point.per_head else delta.squeeze(2))

        hooks.append((tiny.receiver_hook(point.kind, point.layer), hook))
    with torch.no_grad(), tiny.hooks(hooks):
        return tiny.logits(clean)


@pytest.mark.parametrize("kept_fraction", [0.03, 0.5, 0.97])
def test_sparse_and_dense_circuits_match_the_plain_formulation(tiny, kept_fraction):
    """The engine sums whichever side of each receiver is smaller; both sides give the same logits."""
    clean, corrupted = random_pair(seed=4)
    graph, corr_senders, *_ = _baselines(tiny, clean, corrupted)
    kept = torch.rand(graph.allowed.shape, generator=torch.Generator().manual_seed(5)) < kept_fraction
    removed = (graph.allowed & ~kept).double()
    fast = patched_logits(tiny, graph, clean, corr_senders, removed)
    assert_exact(tiny, fast, _naive_patched_logits(tiny, graph, clean, corr_senders, removed))


def test_logits_at_positions_equal_the_full_logits_there(tiny):
    clean, _ = random_pair(batch=3, pos=6)
    positions = torch.tensor([2, 5, 0])
    full = tiny.logits(clean)
    assert torch.allclose(tiny.logits(clean, positions), full[torch.arange(3), positions], atol=1e-12)
    assert tiny.hook_count() == 0


def test_gemma3_head_shares_are_the_heads_parts_of_the_normalised_output(tmp_path):
    """The post-norm rule (adapter docstring): share_h = (1 + w) ⊙ result_h / rms(Σ_h result_h),
    summing to the block's residual term ``hook_attn_out``."""
    from tiny_models import tiny_adapter

    gemma = tiny_adapter("gemma3", tmp_path)
    clean, _ = random_pair()
    names = ["blocks.1.attn.hook_result", "blocks.1.ln1_post.hook_in", "blocks.1.hook_attn_out"]
    result, norm_in, out = gemma.cache(clean, names).values()
    shares = gemma.head_shares(1, result, out)
    assert torch.allclose(shares.sum(2), out, atol=1e-12, rtol=0)
    norm = gemma.bridge.blocks[1].ln1_post
    rms = (norm_in.pow(2).mean(-1, keepdim=True) + norm.original_component.eps).sqrt()
    expected = result * ((1 + norm.weight) / rms).unsqueeze(2)
    assert torch.allclose(shares, expected, atol=1e-5, rtol=0)  # Hugging Face's norm rounds in float32
