"""EAP-IG on activations against references built from the patching engine alone.

Setting a sender hook point u's output to ``ablated + α (clean − ablated)`` is the same as
patching every edge out of u's senders with weight 1 − α (upstream of u nothing changes, so the
senders' own values are clean). Adding ε to one of those weights, on edge s → r, nudges r's input
by ε Δ_s. So the integrand of an edge's score is a derivative of exact patching in the edge
weights, taken here by central differences, with no hook of the method under test.
"""

import pytest
import torch
from tiny_models import skip_post_norm, tiny, tiny_task  # noqa: F401 (fixture)

from circuitfinder.engine.ablation import make_ablation
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import patched_logits
from circuitfinder.methods.attribution import eap_ig, eap_ig_activations, ig_alphas, node_scores
from circuitfinder.methods.registry import METHODS
from circuitfinder.tasks.base import logit_difference


def _setup(tiny, kind):
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    (batch,) = task.batches("discovery", batch_size=len(task))
    return task, graph, batch, make_ablation(kind, tiny, graph, task).senders(batch)


def _metric(tiny, graph, batch, ablated, removed) -> float:
    logits = patched_logits(tiny, graph, batch.clean, ablated, removed, batch.last)
    return float(logit_difference(logits, batch).mean())


def _point_of(graph, sender):
    return next(p for p in graph.sender_points if p.start <= sender < p.stop)


@pytest.mark.parametrize("kind", ["counterfactual", "mean"])
def test_eap_ig_activations_is_the_mean_gradient_along_each_sender_s_own_path(tiny, kind):
    skip_post_norm(tiny)
    task, graph, batch, ablated = _setup(tiny, kind)
    steps = 3
    scores = eap_ig_activations(tiny, graph, task, batch_size=3, steps=steps, ablation=kind)
    for edge in ["input->a0.h1<q>", "a0.h2->a2.h3<q>", "a0.h0->a1.g1<k>", "a1.h3->m1", "m0->m2", "a2.h1->logits"]:
        s, r = graph.edge_index(edge)
        point = _point_of(graph, s)

        def central(alpha, eps):
            removed = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
            removed[point.start : point.stop] = 1 - alpha
            removed[s, r] += eps
            up = _metric(tiny, graph, batch, ablated, removed)
            removed[s, r] -= 2 * eps
            return (up - _metric(tiny, graph, batch, ablated, removed)) / (2 * eps)

        # Richardson extrapolation cancels the central difference's ε² error (float32 parts of Llama)
        reference = sum((4 * central(a, 5e-3) - central(a, 1e-2)) / 3 for a in ig_alphas(steps)) / steps
        assert abs(reference) > 1e-4, edge
        assert scores[s, r].item() == pytest.approx(reference, rel=2e-3, abs=1e-6), edge
    assert tiny.hook_count() == 0


def test_input_edges_are_those_of_eap_ig_on_inputs(tiny):
    """Interpolating the input hook point is interpolating the embedding: the two methods agree on
    the input's edges, and differ elsewhere."""
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    on_inputs, on_activations = eap_ig(tiny, graph, task, steps=2), eap_ig_activations(tiny, graph, task, steps=2)
    assert torch.allclose(on_activations[0], on_inputs[0], rtol=1e-6, atol=1e-9)
    assert (on_activations[1:] - on_inputs[1:]).abs().max() > 1e-3


def test_a_layer_s_scores_add_up_to_ablating_it(tiny, kind="counterfactual"):
    """Completeness: summed over a hook point's outgoing edges, the scores are the integrated
    gradient of its output, which tends to m(point ablated) − m(clean) as the steps grow.

    Checked for the attention and MLP hook points; the input's path is EAP-IG on inputs (the test
    above), whose integrand is stiffer on these random models and needs more steps.
    """
    skip_post_norm(tiny)
    task, graph, batch, ablated = _setup(tiny, kind)
    nodes = torch.tensor(node_scores(graph, eap_ig_activations(tiny, graph, task, steps=16, ablation=kind)).to_numpy())
    clean = _metric(tiny, graph, batch, ablated, torch.zeros(graph.allowed.shape))
    worst = 0.0
    for point in graph.sender_points[1:]:
        removed = torch.zeros(graph.allowed.shape)
        removed[point.start : point.stop] = 1
        effect = _metric(tiny, graph, batch, ablated, removed) - clean
        total = float(nodes[point.start : point.stop].sum())
        assert total == pytest.approx(effect, rel=5e-2, abs=5e-3), (point, total, effect)
        worst = max(worst, abs(effect))
    assert worst > 0.1  # some hook point matters, so the test can fail


def test_eap_ig_activations_is_registered_with_its_cost(tiny):
    graph = EdgeGraph(tiny.shape)
    method = METHODS["eap-ig-activations"]
    assert method.score is eap_ig_activations
    assert method.forwards_per_batch(5, graph) == 2 + (1 + 2 * tiny.shape.n_layers) * 5
