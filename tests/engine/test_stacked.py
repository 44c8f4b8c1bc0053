"""Stacked circuits sharing their common prefix equal the same circuits run one copy per circuit."""

import pytest
import torch
from tiny_models import assert_exact, random_pair, tiny  # noqa: F401 (fixture)

from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import patched_logits, run_recording_senders, stacked_patched_logits


def _circuits(graph: EdgeGraph, k: int, first_layer: int | None, seed: int) -> torch.Tensor:
    """k random removal masks equal on every receiver before ``first_layer`` (None: all equal)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(graph.allowed.shape, generator=g) < 0.5).double()
    masks = base.repeat(k, 1, 1)
    if first_layer is not None:
        later = [p for p in graph.receiver_points if p.layer >= first_layer]
        for j in range(1, k):
            p = later[torch.randint(len(later), (1,), generator=g).item()]
            cols = slice(p.start, p.stop)
            masks[j, :, cols] = (torch.rand(masks[j, :, cols].shape, generator=g) < 0.5).double()
    return masks


@pytest.mark.parametrize("first_layer", [None, 0, 1, 2, 3])  # tiny models have 3 layers; 3 = the logits
@pytest.mark.parametrize("positions", [False, True])
def test_stacked_equals_one_copy_per_circuit(tiny, first_layer, positions):
    graph = EdgeGraph(tiny.shape)
    clean, corrupted = random_pair(batch=3, pos=6)
    corr, _ = run_recording_senders(tiny, graph, corrupted)
    k = 4
    masks = _circuits(graph, k, first_layer, seed=first_layer or 7)
    where = torch.tensor([5, 3, 4]) if positions else None
    stacked = stacked_patched_logits(tiny, graph, clean, corr, masks, where)
    copies = patched_logits(
        tiny, graph, clean.repeat(k, 1), corr.repeat(1, k, 1, 1), masks, None if where is None else where.repeat(k)
    )
    assert stacked.shape == copies.shape
    assert_exact(tiny, stacked, copies)
    # the circuits give different logits, so the comparison can fail
    if first_layer is not None:
        per_circuit = stacked.view(k, -1)
        assert (per_circuit[1:] - per_circuit[0]).abs().max() > 1e-3


def test_stacked_full_and_empty_circuits(tiny):
    graph = EdgeGraph(tiny.shape)
    clean, corrupted = random_pair(batch=2, pos=5, seed=3)
    corr, corr_logits = run_recording_senders(tiny, graph, corrupted)
    _, clean_logits = run_recording_senders(tiny, graph, clean)
    masks = torch.stack([torch.zeros(graph.allowed.shape), torch.ones(graph.allowed.shape)]).double()
    out = stacked_patched_logits(tiny, graph, clean, corr, masks)
    assert_exact(tiny, out[:2], clean_logits)
    assert_exact(tiny, out[2:], corr_logits)
