"""The search on Ray actors: the same circuit with one or two workers, and after a worker dies."""

from __future__ import annotations

import os
import signal

import pytest
import tiny_models
import torch
from tiny_models import tiny_task

from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import top_edges
from circuitfinder.methods.acdc import acdc
from circuitfinder.methods.attribution import eap
from circuitfinder.methods.pool import EvaluatorSpec, InProcessPool, RayPool

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(tiny_models)  # workers build the tiny model from this module's code
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _search(pool, adapter, on_chain=None):
    task = tiny_task()
    graph = EdgeGraph(adapter.shape)
    scores = eap(adapter, graph, task, batch_size=4)
    empty = float(pool((graph.allowed & False).unsqueeze(0)).distance[0])
    return acdc(graph, pool, scores, top_edges(graph, scores, 60), 0.01 * empty, chain=8, on_chain=on_chain).circuit


def test_workers_find_the_same_circuit_as_one_process(local_ray):
    adapter = tiny_models.load_tiny_gpt2()
    task = tiny_task()
    spec = EvaluatorSpec(tiny_models.load_tiny_gpt2, task, 4, distance="kl", max_rows=8)
    want = _search(InProcessPool(spec.build(adapter), chunk=2), adapter)
    for workers in (1, 2):
        pool = RayPool(spec, workers, chunk=2)
        try:
            got = _search(pool, adapter)
        finally:
            for a in pool.actors:
                ray.kill(a)
        assert torch.equal(got, want), f"{workers} workers"
    assert 0 < int(want.sum()) < EdgeGraph(adapter.shape).n_edges


def test_a_worker_killed_mid_search_is_replaced_and_nothing_changes(local_ray):
    adapter = tiny_models.load_tiny_gpt2()
    task = tiny_task()
    spec = EvaluatorSpec(tiny_models.load_tiny_gpt2, task, 4, distance="kl", max_rows=8)
    want = _search(InProcessPool(spec.build(adapter), chunk=2), adapter)
    pool = RayPool(spec, 2, chunk=2)
    killed = []

    def kill_one(state):
        if state.chains == 2:
            os.kill(pool.pids[0], signal.SIGKILL)
            killed.append(pool.pids[0])

    try:
        got = _search(pool, adapter, on_chain=kill_one)
        alive = ray.get([a.pid.remote() for a in pool.actors])
    finally:
        for a in pool.actors:
            ray.kill(a)
    assert killed and killed[0] not in alive  # the actor really died and was restarted
    assert torch.equal(got, want)


# ---- attribution split by prompt batches ---------------------------------------------


@pytest.mark.parametrize("method", ["eap", "eap_ig"])
def test_attribution_on_one_or_two_workers_equals_one_process(local_ray, method):
    """Actor k sums batches k, k + n, …; the shares add up to the one-process scores."""
    from circuitfinder.methods import attribution
    from circuitfinder.methods.pool import ray_scores

    fn = getattr(attribution, method)
    adapter, task = tiny_models.load_tiny_gpt2(), tiny_task()
    want = fn(adapter, EdgeGraph(adapter.shape), task, batch_size=1, steps=3)
    halves = [fn(adapter, EdgeGraph(adapter.shape), task, batch_size=1, steps=3, shard=(k, 2)) for k in range(2)]
    assert not torch.equal(halves[0], want) and (halves[0] != 0).any() and (halves[1] != 0).any()  # each a real share
    for workers in (1, 2):
        got = ray_scores(tiny_models.load_tiny_gpt2, fn, task, 1, workers, steps=3)
        assert (got - want).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item()), f"{workers} workers"


def test_faithfulness_curve_on_one_or_two_workers_equals_one_process(local_ray):
    """The curve split by prompt batches: actor k evaluates every circuit on batches k, k + n, …;
    the shares' means, weighted by their prompts (3 and 1 here), give the one-process curve."""
    from functools import partial

    from circuitfinder.engine.faithfulness import CircuitEvaluator, faithfulness_curve
    from circuitfinder.methods.pool import ray_metrics

    adapter, task = tiny_models.load_tiny_gpt2(), tiny_task()
    graph = EdgeGraph(adapter.shape)
    scores = eap(adapter, graph, task, batch_size=1)
    evaluator = CircuitEvaluator(adapter, graph, task, "discovery", batch_size=3)
    percents = (5.0, 20.0, 50.0, 100.0)
    want = faithfulness_curve(evaluator, scores, percents)
    circuit = evaluator.prune(top_edges(graph, scores, 40))
    shares = [CircuitEvaluator(adapter, graph, task, "discovery", 3, shard=(k, 2)).metric(circuit) for k in range(2)]
    assert abs(shares[0] - shares[1]) > 1e-3  # unequal shares: an unweighted mean of them would be wrong
    for workers in (1, 2):
        metrics = partial(
            ray_metrics, tiny_models.load_tiny_gpt2, task, "discovery", 3, workers, None, "counterfactual"
        )
        got = faithfulness_curve(evaluator, scores, percents, metrics=metrics)
        assert [n for _, n, _, _ in got.points] == [n for _, n, _, _ in want.points]
        for (_, _, _, f), (_, _, _, g) in zip(want.points, got.points):
            assert abs(f - g) <= 1e-9, f"{workers} workers: {g} against {f}"
        assert abs(got.cpr - want.cpr) <= 1e-9
    assert any(0.0 < f < 1.0 for *_, f in want.points)  # a curve with real points


def test_a_run_with_two_workers_gives_the_one_process_scores_and_curve(local_ray, tiny_model_dir, monkeypatch):
    """``workers=2`` end to end: attribution and the curve on Ray actors, each loading the model
    folder itself, against the same run in this process."""
    from circuitfinder.config import DiscoverConfig
    from circuitfinder.methods import pool
    from circuitfinder.runs.run import run_config

    calls = []
    split_curve = pool.ray_metrics
    monkeypatch.setattr(
        pool, "ray_metrics", lambda *args, **kwargs: calls.append(args[4]) or split_curve(*args, **kwargs)
    )

    def run(workers):
        config = DiscoverConfig.from_options(
            task="ioi",
            model=str(tiny_model_dir),
            method="eap",
            n_pairs=8,
            batch_size=2,
            edges=20,
            curve=True,
            roles=False,
            force=True,
            dtype="float32",
            workers=workers,
        )
        return run_config(config)

    alone, split = run(0), run(2)
    assert calls == [2]  # the curve went to the 2 workers
    want, got = alone.circuit.scores, split.circuit.scores  # NaN where no edge can be
    assert torch.equal(want.isnan(), got.isnan())
    want, got = want.nan_to_num(), got.nan_to_num()
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()
    assert torch.equal(alone.circuit.mask, split.circuit.mask)
    assert [p[:3] for p in split.curve.points] == [p[:3] for p in alone.curve.points]
    assert max(abs(a[3] - b[3]) for a, b in zip(alone.curve.points, split.curve.points)) <= 1e-9
    assert any(0.0 < p[3] < 1.0 for p in alone.curve.points)
