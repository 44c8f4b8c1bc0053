"""Slow tests on the bundled Gemma-3-270M: loading, exact patching through the post-norm head shares, IOI baseline."""

import pytest
import torch

from circuitfinder.engine.adapter import ModelShape, load_unchecked
from circuitfinder.engine.faithfulness import CircuitEvaluator
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.tasks import build_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    return load_unchecked("gemma3-270m")


@pytest.fixture(scope="module")
def ioi(gemma3):
    return build_task("ioi", gemma3.tokenizer, n_pairs=32, seed=0)


def test_gemma3_loads_with_its_published_shape(gemma3):
    assert gemma3.shape == ModelShape(n_layers=18, n_heads=4, n_kv_groups=1, d_model=640, post_norm=True)
    assert EdgeGraph(gemma3.shape).n_edges == 5_644
    ids = gemma3.tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]
    last = torch.tensor([len(ids) - 1])
    assert gemma3.tokenizer.decode(gemma3.logits(torch.tensor([ids]), last)[0].argmax()) == " Mary"


def test_full_and_empty_circuits_reproduce_clean_and_corrupted_runs(gemma3, ioi):
    graph = EdgeGraph(gemma3.shape)
    batch = next(ioi.batches("heldout", 8))
    corrupted_senders, corrupted_logits = run_recording_senders(gemma3, graph, batch.corrupted, batch.last)
    with torch.no_grad():
        clean_logits = gemma3.logits(batch.clean, batch.last)
    full = patched_logits(gemma3, graph, batch.clean, corrupted_senders, torch.zeros(graph.allowed.shape), batch.last)
    empty = patched_logits(gemma3, graph, batch.clean, corrupted_senders, torch.ones(graph.allowed.shape), batch.last)
    assert (clean_logits - corrupted_logits).abs().max() > 1.0
    assert torch.allclose(full, clean_logits, atol=1e-3, rtol=0)
    assert torch.allclose(empty, corrupted_logits, atol=1e-3, rtol=0)


def test_ioi_shows_a_clear_gap_between_clean_and_corrupted(gemma3, ioi):
    baseline = CircuitEvaluator(gemma3, EdgeGraph(gemma3.shape), ioi, "heldout").baseline
    assert baseline.clean > 2.0 and abs(baseline.corrupted) < 1.0 and baseline.accuracy > 0.8


def test_gemma3_passes_the_check_at_load(gemma3):
    from circuitfinder.engine.checks import check_model

    assert gemma3.working_dtype == torch.float32
    assert check_model(gemma3) < 0.1  # every exactness comparison well inside the float32 tolerance
