"""Node scores: the sum of a sender's edge scores is its own attribution-patching score."""

import pytest
import torch
from tiny_models import skip_post_norm, tiny, tiny_task  # noqa: F401 (fixture)

from circuitfinder.engine.ablation import make_ablation
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.methods.attribution import eap, node_scores
from circuitfinder.tasks.base import logit_difference


def _sender_output_gradients(tiny, graph, batch) -> torch.Tensor:
    """∂(mean metric)/∂(every sender's output) at the clean run, ``[senders, b, p, d]``, by autograd
    on a zero added to each sender hook point's output (no receiver is involved)."""
    leaves = {}

    def make(point):
        def hook(x, hook=None):
            leaves[point] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[point]

        return hook

    hooks = [(tiny.sender_hook(p.kind, p.layer), make(p)) for p in graph.sender_points]
    with torch.enable_grad(), tiny.hooks(hooks):
        logit_difference(tiny.logits(batch.clean, batch.last), batch).mean().backward()
    grads = [leaves[p].grad for p in graph.sender_points]
    return torch.cat([g.permute(2, 0, 1, 3) if g.dim() == 4 else g.unsqueeze(0) for g in grads])


@pytest.mark.parametrize("kind", ["counterfactual", "mean"])
def test_node_scores_are_each_sender_s_delta_times_its_output_gradient(tiny, kind):
    skip_post_norm(tiny)
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    (batch,) = task.batches("discovery", batch_size=len(task))
    ablated = make_ablation(kind, tiny, graph, task).senders(batch)
    clean, _ = run_recording_senders(tiny, graph, batch.clean)
    direct = ((ablated - clean) * _sender_output_gradients(tiny, graph, batch)).sum((1, 2, 3))
    nodes = node_scores(graph, eap(tiny, graph, task, batch_size=len(task), ablation=kind))
    assert list(nodes.index) == list(graph.sender_names)
    assert direct.abs().max() > 0.1
    assert torch.allclose(torch.tensor(nodes.to_numpy()), direct, rtol=0, atol=1e-10)  # equal up to rounding
    assert tiny.hook_count() == 0


@pytest.mark.parametrize("node", ["input", "a0.h1", "a1.h2", "m1", "a2.h3"])
def test_a_node_score_is_the_derivative_of_patching_the_node(tiny, node):
    """d/dα m(all of the node's outgoing edges patched with weight α) at α = 0."""
    skip_post_norm(tiny)
    task = tiny_task()
    graph = EdgeGraph(tiny.shape)
    (batch,) = task.batches("discovery", batch_size=len(task))
    corrupted, _ = run_recording_senders(tiny, graph, batch.corrupted)
    s = graph.sender_names.index(node)

    def metric(weight):
        removed = torch.zeros(graph.allowed.shape, dtype=torch.float64)
        removed[s] = weight
        logits = patched_logits(tiny, graph, batch.clean, corrupted, removed, batch.last)
        return float(logit_difference(logits, batch).mean())

    eps = 1e-2
    derivative = (metric(eps) - metric(-eps)) / (2 * eps)
    assert abs(derivative) > 1e-4
    assert node_scores(graph, eap(tiny, graph, task))[node] == pytest.approx(derivative, rel=1e-2, abs=1e-6)
