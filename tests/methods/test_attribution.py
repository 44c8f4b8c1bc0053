"""EAP scores against the first-order prediction computed another way: finite differences of exact patching."""

import pytest
import torch
from tiny_models import add_to_receiver_hook, mean_metric, patching_derivative, random_pair, tiny, tiny_task  # noqa: F401 (fixture)

from circuitfinder.engine.faithfulness import CircuitEvaluator
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import run_recording_senders
from circuitfinder.methods.attribution import eap
from circuitfinder.methods.registry import METHODS
from circuitfinder.tasks.base import logit_difference


@pytest.mark.parametrize(
    "edge",
    [
        "input->a0.h1<q>",
        "a0.h2->a2.h3<q>",
        "input->a1.g0<v>",
        "a0.h0->a1.g1<k>",
        "a1.h3->m1",
        "m0->m2",
        "a2.h1->logits",
        "input->logits",
    ],
)
def test_eap_score_is_the_derivative_of_exact_patching(tiny, edge):
    """d/dα m(edge patched with weight α) at α = 0 equals the EAP score: same sign, same units."""
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    scores = eap(tiny, graph, task, batch_size=3)  # two batches of unequal length: averaging is tested too
    s, r = graph.edge_index(edge)
    # Hugging Face's Llama takes RMSNorm and softmax in float32 even in a float64 model, so a
    # small step drowns in rounding; at 1e-2 the central difference's own error is ~1e-3.
    derivative = patching_derivative(tiny, graph, task, s, r, eps=1e-2)
    assert abs(derivative) > 1e-4  # the edge matters, so the test can fail
    assert scores[s, r].item() == pytest.approx(derivative, rel=1e-2, abs=1e-6)


def test_eap_scores_only_edges_and_ranks_by_magnitude(tiny):
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    scores = METHODS["eap"].score(tiny, graph, task)
    assert scores.shape == (graph.n_senders, graph.n_receivers)
    assert torch.all(scores[~graph.allowed] == 0)
    assert torch.count_nonzero(scores[graph.allowed]) > graph.n_edges // 2
    assert tiny.hook_count() == 0


def test_eap_first_order_sum_tracks_small_corruptions(tiny):
    """With a corruption that barely moves the input, Σ scores ≈ m(∅) − m(full) (exactly linear limit)."""
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    scores = eap(tiny, graph, task)
    # patch every edge by a small weight ±α: (m(α) − m(−α)) / 2α ≈ Σ scores. A central difference:
    # Gemma-3's curvature makes a one-sided one off by 2e-3 already at α = 1e-4, where the
    # float32 norms' rounding starts to show.
    alpha = 1e-3
    removed = graph.allowed.double() * alpha
    change = mean_metric(tiny, graph, task, removed) - mean_metric(tiny, graph, task, -removed)
    assert change / (2 * alpha) == pytest.approx(float(scores.sum()), rel=1e-3)


def _nudged_metric(adapter, graph, task, alpha, receiver, nudge):
    """Mean metric with the embedding at ``corrupted + α (clean − corrupted)`` and ``nudge`` added to one receiver."""
    from circuitfinder.methods.attribution import input_hook

    (batch,) = task.batches("discovery", batch_size=len(task))
    corrupted, _ = run_recording_senders(adapter, graph, batch.corrupted)
    clean, _ = run_recording_senders(adapter, graph, batch.clean)
    hooks = [
        input_hook(adapter, corrupted[0] + alpha * (clean[0] - corrupted[0])),
        add_to_receiver_hook(adapter, graph, receiver, nudge),
    ]
    with torch.no_grad(), adapter.hooks(hooks):
        logits = adapter.logits(batch.clean)
    rows = torch.arange(batch.size)
    return float(logit_difference(logits[rows, batch.last], batch).mean())


@pytest.mark.parametrize("edge", ["input->a0.h1<q>", "a0.h2->a2.h3<q>", "a0.h0->a1.g1<k>", "m0->m2", "a2.h1->logits"])
def test_eap_ig_is_the_mean_gradient_along_the_input_path(tiny, edge):
    """Each EAP-IG score equals Δsender · ∂m/∂receiver averaged over the interpolated embeddings,
    the derivatives taken here by central differences of nudged forward passes."""
    from circuitfinder.methods.attribution import eap_ig, ig_alphas

    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    steps = 3
    scores = eap_ig(tiny, graph, task, batch_size=4, steps=steps)
    s, r = graph.edge_index(edge)
    (batch,) = task.batches("discovery", batch_size=len(task))
    corrupted, _ = run_recording_senders(tiny, graph, batch.corrupted)
    clean, _ = run_recording_senders(tiny, graph, batch.clean)
    delta = corrupted[s] - clean[s]

    def central(alpha, eps):
        up = _nudged_metric(tiny, graph, task, alpha, r, eps * delta)
        return (up - _nudged_metric(tiny, graph, task, alpha, r, -eps * delta)) / (2 * eps)

    # Richardson extrapolation cancels the central difference's ε² error (float32 parts of the
    # Llama forward rule out a much smaller ε). Gemma's q/k norms curve the metric more along
    # input edges (ε⁴ error 2e-3 at these steps), so it takes half the steps.
    eps = 2.5e-3 if tiny.name == "tiny-gemma3" else 5e-3
    derivatives = [(4 * central(a, eps) - central(a, 2 * eps)) / 3 for a in ig_alphas(steps)]
    reference = sum(derivatives) / steps
    assert abs(reference) > 1e-4
    assert scores[s, r].item() == pytest.approx(reference, rel=2e-3, abs=1e-6)
    assert not torch.allclose(scores, eap(tiny, graph, task))  # the path matters: IG is not EAP here


def test_eap_ig_memory_does_not_grow_with_steps(tiny):
    """Gradients are accumulated step by step: no hook or tensor is kept per step."""
    from circuitfinder.methods.attribution import eap_ig

    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    few, many = eap_ig(tiny, graph, task, steps=2), eap_ig(tiny, graph, task, steps=8)
    assert few.shape == many.shape and tiny.hook_count() == 0
    # more steps converge: the 8-step scores are closer to a 16-step estimate than the 2-step ones
    finer = eap_ig(tiny, graph, task, steps=16)
    assert (many - finer).abs().sum() < (few - finer).abs().sum()


def test_exact_edge_effects_match_one_edge_patched_by_the_engine(tiny):
    """Edges evaluated several per pass give exactly what the patching engine gives one at a time."""
    from circuitfinder.methods.validation import exact_edge_effects

    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    names = ["input->a0.h1<q>", "a0.h2->a2.h3<q>", "a0.h0->a1.g1<k>", "m0->m2", "a2.h1->logits"]
    edges = [graph.edge_index(e) for e in names]
    effects = exact_edge_effects(tiny, graph, task, edges, batch_size=3, edges_per_pass=2)
    base = mean_metric(tiny, graph, task, torch.zeros(graph.allowed.shape))
    for (s, r), effect in zip(edges, effects):
        removed = torch.zeros(graph.allowed.shape)
        removed[s, r] = 1
        assert effect.item() == pytest.approx(mean_metric(tiny, graph, task, removed) - base, abs=1e-9)
    assert effects.abs().min() > 1e-4


def test_correlations_are_pearson_and_rank_pearson():
    from circuitfinder.methods.validation import correlations

    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert correlations(x, x**3)["spearman"] == pytest.approx(1.0)
    assert correlations(x, x**3)["pearson"] < 0.99
    assert correlations(x, -x)["pearson"] == pytest.approx(-1.0)


def _derivative_at(adapter, graph, task, base: torch.Tensor, s: int, r: int, eps: float) -> float:
    """d/dα of the exactly patched mean metric with edge (s, r)'s weight moved by α from ``base``."""
    up, down = base.clone(), base.clone()
    up[s, r] += eps
    down[s, r] -= eps
    return (mean_metric(adapter, graph, task, up) - mean_metric(adapter, graph, task, down)) / (2 * eps)


@pytest.mark.parametrize(
    "edge",
    [
        "input->a0.h1<q>",
        "a0.h2->a2.h3<q>",
        "input->a1.g0<v>",
        "a0.h0->a1.g1<k>",
        "a1.h3->m1",
        "m0->m2",
        "a2.h1->logits",
        "input->logits",
        "a0.h3->logits",
    ],
)
def test_attribution_at_a_circuit_is_the_derivative_of_exact_patching(tiny, edge):
    """At a circuit with most edges removed, the score of a kept or a removed edge equals the
    derivative of exact patching in that edge's weight; the circuit's metric is exact patching's."""
    from circuitfinder.methods.attribution import attribute_circuit

    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    removed = (torch.rand(graph.allowed.shape, generator=torch.Generator().manual_seed(3)) < 0.3).double()
    removed = removed * graph.allowed
    s, r = graph.edge_index(edge)
    for weight in (0.0, 1.0):  # the edge kept, then removed, in the same circuit
        removed[s, r] = weight
        scores, metric = attribute_circuit(CircuitEvaluator(tiny, graph, task, "discovery", 3), removed)
        assert metric == pytest.approx(mean_metric(tiny, graph, task, removed), rel=1e-9, abs=1e-9)
        derivative = _derivative_at(tiny, graph, task, removed, s, r, eps=1e-2)
        assert abs(derivative) > 1e-4  # the edge matters here, so the test can fail
        assert scores[s, r].item() == pytest.approx(derivative, rel=1e-2, abs=1e-6)


def test_attribution_at_the_full_circuit_is_eap(tiny):
    from circuitfinder.methods.attribution import attribute_circuit

    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    at_full, _ = attribute_circuit(
        CircuitEvaluator(tiny, graph, task, "discovery", 3), torch.zeros(graph.allowed.shape)
    )
    torch.testing.assert_close(at_full, eap(tiny, graph, task, batch_size=3), rtol=1e-9, atol=1e-12)
