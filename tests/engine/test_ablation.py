"""Counterfactual, mean and zero ablation: exact references on tiny models of both block styles."""

import pytest
import torch
from tiny_models import VOCAB, assert_exact, skip_post_norm, tiny, tiny_hf_model, tiny_task  # noqa: F401 (fixture)

from circuitfinder.engine.ablation import make_ablation, sender_means
from circuitfinder.engine.faithfulness import CircuitEvaluator
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import prune
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.engine.precision import tolerance_for
from circuitfinder.methods.attribution import eap
from circuitfinder.tasks.base import Task, logit_difference

KINDS = ("counterfactual", "mean", "zero")


def _one_batch(tiny, task, kind):
    graph = EdgeGraph(tiny.shape)
    (batch,) = task.batches("discovery", batch_size=len(task))
    return graph, batch, make_ablation(kind, tiny, graph, task).senders(batch)


def ablated_metric(tiny, graph, batch, ablated, removed) -> float:
    """Mean logit difference at the read positions with ``removed`` patch weights from ``ablated``."""
    logits = patched_logits(tiny, graph, batch.clean, ablated, removed, batch.last)
    return float(logit_difference(logits, batch).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_the_full_circuit_is_the_clean_run_under_every_ablation(tiny, kind):
    graph, batch, ablated = _one_batch(tiny, tiny_task(), kind)
    kept_all = torch.zeros(graph.n_senders, graph.n_receivers)
    clean = tiny.logits(batch.clean, batch.last)
    assert_exact(tiny, patched_logits(tiny, graph, batch.clean, ablated, kept_all, batch.last), clean)


def test_the_empty_circuit_differs_between_ablations(tiny):
    """m(∅) is the corrupted run under counterfactual ablation, and something else under mean and zero."""
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    baselines = {k: CircuitEvaluator(tiny, graph, task, "discovery", ablation=k).baseline for k in KINDS}
    assert len({b.clean for b in baselines.values()}) == 1  # the clean run does not depend on the ablation
    empty = [baselines[k].corrupted for k in KINDS]
    assert min(abs(a - b) for i, a in enumerate(empty) for b in empty[i + 1 :]) > 1e-3
    (batch,) = task.batches("discovery", batch_size=len(task))
    corrupted_run = float(logit_difference(tiny.logits(batch.corrupted, batch.last), batch).mean())
    assert baselines["counterfactual"].corrupted == pytest.approx(
        corrupted_run, abs=tolerance_for(tiny, torch.tensor(corrupted_run))
    )


def _bias_only_logits(tiny, tokens, keep_input: bool) -> torch.Tensor:
    """Logits of the Hugging Face model whose residual stream holds only the constant terms that
    belong to no sender (GPT-2's attention output biases; nothing in Llama), plus the token and
    position embeddings if ``keep_input``: computed from the weights, without TransformerLens."""
    gpt2 = tiny.shape.n_kv_groups == tiny.shape.n_heads
    hf = tiny_hf_model("gpt2" if gpt2 else "llama")
    b, p = tokens.shape
    with torch.no_grad():
        if gpt2:
            body = hf.transformer
            x = sum(block.attn.c_proj.bias for block in body.h).expand(b, p, -1)
            if keep_input:
                x = x + body.wte(tokens) + body.wpe(torch.arange(p))
            return hf.lm_head(body.ln_f(x))
        x = hf.model.embed_tokens(tokens) if keep_input else torch.zeros(b, p, tiny.shape.d_model, dtype=torch.float64)
        return hf.lm_head(hf.model.norm(x))


@pytest.mark.parametrize("keep_input", [False, True])
def test_zero_ablation_of_every_edge_leaves_the_residual_only_its_biases(tiny, keep_input):
    """Every edge zero-ablated (or all but input → logits): the logits read only the biases outside
    any sender (and the embedding)."""
    skip_post_norm(tiny)
    graph, batch, ablated = _one_batch(tiny, tiny_task(), "zero")
    removed = torch.ones(graph.n_senders, graph.n_receivers)
    if keep_input:
        removed[graph.edge_index("input->logits")] = 0
    patched = patched_logits(tiny, graph, batch.clean, ablated, removed)
    reference = _bias_only_logits(tiny, batch.clean, keep_input)
    gpt2 = tiny.shape.n_kv_groups == tiny.shape.n_heads
    assert reference.abs().max() > 0.1 or not gpt2  # the biases matter, so the test can fail
    assert torch.allclose(patched, reference, atol=tolerance_for(tiny, reference) if gpt2 else 1e-5, rtol=0)


def test_mean_ablation_is_the_per_position_mean_over_the_prompts_that_reach_it(tiny):
    """Brute force: each discovery prompt run alone, unpadded; positions beyond every discovery
    prompt (reached by a longer held-out prompt) take the mean over all real positions."""
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, VOCAB, (4, 6), generator=g)
    task = Task(
        name="lengths",
        clean=clean,
        corrupted=clean.flip(0),
        lengths=torch.tensor([4, 5, 3, 6]),
        answer=torch.tensor([1, 2, 3, 4]),
        wrong=torch.tensor([5, 6, 7, 8]),
        split=("discovery", "discovery", "discovery", "heldout"),
    )
    graph = EdgeGraph(tiny.shape)
    means = sender_means(tiny, graph, task, batch_size=2)  # two batches, padded to their longest prompt
    alone = [run_recording_senders(tiny, graph, clean[i : i + 1, :n])[0][:, 0] for i, n in enumerate([4, 5, 3])]
    for p in range(5):
        reaching = [a[:, p] for a in alone if a.shape[1] > p]
        assert_exact(tiny, means[:, p], sum(reaching) / len(reaching))
    pooled = torch.cat(alone, dim=1).mean(1)  # [s, d] over the 12 real positions
    assert_exact(tiny, means[:, 5], pooled)
    # a batch reads the means of its own positions, the same for every prompt
    batch = next(task.batches("heldout"))
    assert torch.equal(make_ablation("mean", tiny, graph, task, batch_size=2).senders(batch)[:, 0], means[:, :6])


@pytest.mark.parametrize("kind", ["mean", "zero"])
@pytest.mark.parametrize("edge", ["input->m0", "a0.h2->a2.h3<q>", "a0.h0->a1.g1<k>", "m0->m2", "a2.h1->logits"])
def test_eap_under_mean_and_zero_ablation_is_the_derivative_of_exact_patching(tiny, kind, edge):
    """d/dα m(edge patched from the ablation with weight α) at α = 0 equals the EAP score."""
    task = tiny_task()
    graph, batch, ablated = _one_batch(tiny, task, kind)
    scores = eap(tiny, graph, task, batch_size=3, ablation=kind)
    s, r = graph.edge_index(edge)
    eps = 1e-2  # see test_attribution: the Llama forward has float32 parts
    removed = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    removed[s, r] = eps
    up = ablated_metric(tiny, graph, batch, ablated, removed)
    removed[s, r] = -eps
    derivative = (up - ablated_metric(tiny, graph, batch, ablated, removed)) / (2 * eps)
    assert abs(derivative) > 1e-4
    assert scores[s, r].item() == pytest.approx(derivative, rel=1e-2, abs=1e-6)


def test_eap_scores_differ_between_ablations(tiny):
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    scores = [eap(tiny, graph, task, ablation=k) for k in KINDS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (scores[i] - scores[j]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_under_mean_and_zero_ablation_only_dead_ends_are_pruned(tiny, kind):
    """Dropping edges with no kept path to the logits is exact under every ablation; dropping the
    outputs of nodes that read only ablated values is exact when the ablation is a real run, and
    not under mean ablation, nor under zero ablation when the model has biases (GPT-2). A model
    without biases (Llama) maps all-zero inputs to zero outputs, so there it is exact for zero."""
    skip_post_norm(tiny)
    graph = EdgeGraph(tiny.shape)
    evaluator = CircuitEvaluator(tiny, graph, tiny_task(), split="discovery", batch_size=4, ablation=kind)
    mask = graph.allowed & (torch.rand(graph.allowed.shape, generator=torch.Generator().manual_seed(7)) < 0.2)
    pruned = evaluator.prune(mask)
    assert not torch.equal(pruned, mask)
    assert evaluator.metric(pruned) == pytest.approx(evaluator.metric(mask), abs=1e-9)
    counterfactual_rule = prune(graph, mask)
    assert not torch.equal(counterfactual_rule, pruned)
    change = abs(evaluator.metric(counterfactual_rule) - evaluator.metric(mask))
    has_biases = tiny.shape.n_kv_groups == tiny.shape.n_heads  # the GPT-2 fixture
    if kind == "mean" or has_biases:
        assert change > 1e-3
    else:
        assert change < 1e-9
