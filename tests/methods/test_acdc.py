"""ACDC and greedy minimisation on tiny models, against a plain one-edge-at-a-time reference."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny, tiny_task  # noqa: F401 (fixture)

from circuitfinder.engine.faithfulness import CircuitEvaluator
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import prune, top_edges
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.methods.acdc import SearchState, acdc, candidate_order, minimize, removal_order
from circuitfinder.methods.attribution import eap
from circuitfinder.methods.pool import InProcessPool, _pack, _unpack
from circuitfinder.tasks.base import logit_difference


def setup(adapter, distance="kl"):
    task = tiny_task()
    graph = EdgeGraph(adapter.shape)
    scorer = CircuitEvaluator(adapter, graph, task, "discovery", 4, distance=distance, max_rows=8)
    scores = eap(adapter, graph, task, batch_size=4)
    return task, graph, scorer, scores


def start_circuit(graph, scores):
    """The 60 strongest edges (of 190): a seeded start, and a test that runs in seconds."""
    return top_edges(graph, scores, 60)


_RUNS = {}


def reference_distance(adapter, graph, task, circuit) -> float:
    """KL(clean ‖ circuit), by one plain patched pass over all prompts (no stacking)."""
    (batch,) = task.batches("discovery", batch_size=len(task))
    if adapter.name not in _RUNS:
        rows = torch.arange(batch.size)
        _RUNS[adapter.name] = (
            run_recording_senders(adapter, graph, batch.corrupted)[0],
            F.log_softmax(adapter.logits(batch.clean)[rows, batch.last].double(), -1),
        )
    corrupted, clean = _RUNS[adapter.name]
    rows = torch.arange(batch.size)
    patched = F.log_softmax(
        patched_logits(adapter, graph, batch.clean, corrupted, (~circuit).double())[rows, batch.last].double(), -1
    )
    return float((clean.exp() * (clean - patched)).sum(-1).mean())


@functools.lru_cache(maxsize=None)
def reference_acdc(adapter, tau_fraction: float) -> torch.Tensor:
    """Textbook ACDC from the full graph, one candidate and one pass at a time."""
    task, graph, scorer, scores = setup(adapter)
    start = start_circuit(graph, scores)
    tau = tau_fraction * reference_distance(adapter, graph, task, graph.allowed & False)
    circuit = prune(graph, start)
    return one_at_a_time(
        graph,
        circuit,
        candidate_order(graph, circuit, scores),
        lambda c: reference_distance(adapter, graph, task, c),
        lambda new, cur: new - cur < tau,
    )


def one_at_a_time(graph, circuit, edges, measure, keeps_removal) -> torch.Tensor:
    """Decide ``edges`` in order, one pass each: a receiver feeding no kept node loses the edge
    unmeasured; otherwise the removal stands when ``keeps_removal(measure(trial), current)``."""
    current = measure(circuit)
    for s, r in edges:
        fed = graph.receiver_feeds[r]
        if fed and not circuit[list(fed)].any():
            circuit[s, r] = False
            continue
        trial = circuit.clone()
        trial[s, r] = False
        value = measure(trial)
        if keeps_removal(value, current):
            circuit, current = trial, value
    return prune(graph, circuit)


def test_scorer_matches_plain_patching(tiny):
    task, graph, scorer, scores = setup(tiny)
    g = torch.Generator().manual_seed(1)
    circuits = (torch.rand((5, graph.n_senders, graph.n_receivers), generator=g) < 0.7) & graph.allowed
    got = scorer.evaluate(circuits).distance
    want = [reference_distance(tiny, graph, task, c) for c in circuits]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-10)
    full = scorer.evaluate(graph.allowed.unsqueeze(0))
    assert abs(float(full.distance[0])) < 1e-10 and abs(float(full.metric[0]) - scorer.clean_metric) < 1e-10


@pytest.mark.parametrize("chain", [5])
def test_speculative_acdc_equals_one_at_a_time(tiny, chain):
    """Whatever the chain length (how many guesses share a pass), the circuit is textbook ACDC's."""
    task, graph, scorer, scores = setup(tiny)
    empty = float(scorer.evaluate((graph.allowed & False).unsqueeze(0)).distance[0])
    want = reference_acdc(tiny, 0.01)
    result = acdc(
        graph, InProcessPool(scorer, chunk=4), scores, start_circuit(graph, scores), 0.01 * empty, chain=chain
    )
    assert torch.equal(result.circuit, want)
    assert (
        0 < int(want.sum()) < int(prune(graph, start_circuit(graph, scores)).sum())
    )  # the test means something: some edges go, some stay
    assert result.state.rows <= result.evaluated + 1 + result.state.wasted_rows


def test_tau_zero_keeps_the_behaviour_and_huge_tau_removes_everything(tiny):
    task, graph, scorer, scores = setup(tiny)
    pool = InProcessPool(scorer, chunk=4)
    start = prune(graph, start_circuit(graph, scores))
    kept = acdc(graph, pool, scores, start, tau=0.0, chain=8)
    before = reference_distance(tiny, graph, task, start)
    assert reference_distance(tiny, graph, task, kept.circuit) <= before + 1e-12
    assert int(kept.circuit.sum()) > 0  # only removals that did not move the circuit away from clean
    gone = acdc(graph, pool, scores, start, tau=1e9, chain=8)
    assert int(gone.circuit.sum()) == 0


def test_interrupted_search_resumes_to_the_same_circuit(tiny):
    task, graph, scorer, scores = setup(tiny)
    pool = InProcessPool(scorer, chunk=4)
    empty = float(scorer.evaluate((graph.allowed & False).unsqueeze(0)).distance[0])
    tau = 0.01 * empty
    whole = acdc(graph, pool, scores, start_circuit(graph, scores), tau, chain=4)
    saved = {}

    class Stop(Exception):
        pass

    def interrupt(state):
        saved["json"] = json.dumps(state.to_json())
        if state.chains == 3:
            raise Stop

    with pytest.raises(Stop):
        acdc(graph, pool, scores, start_circuit(graph, scores), tau, chain=4, on_chain=interrupt)
    start = prune(graph, start_circuit(graph, scores))
    state = SearchState.from_json(json.loads(saved["json"]), start, candidate_order(graph, start, scores))
    assert 0 < state.position < whole.candidates
    resumed = acdc(graph, pool, scores, start_circuit(graph, scores), tau, chain=4, state=state)
    assert torch.equal(resumed.circuit, whole.circuit)


def reference_metric(adapter, graph, task, circuit) -> float:
    (batch,) = task.batches("discovery", batch_size=len(task))
    reference_distance(adapter, graph, task, circuit)  # fills the cached corrupted run
    corrupted, _ = _RUNS[adapter.name]
    rows = torch.arange(batch.size)
    logits = patched_logits(adapter, graph, batch.clean, corrupted, (~circuit).double())[rows, batch.last]
    return float(logit_difference(logits, batch).mean())


def oriented_setup(adapter):
    """``setup`` with the task distance, the task oriented so that the clean run scores above the
    corrupted one (a random model may prefer either answer); also the empty circuit's metric."""
    task, graph, scorer, scores = setup(adapter, distance="task")
    empty = float(scorer.evaluate((graph.allowed & False).unsqueeze(0)).metric[0])
    if scorer.clean_metric < empty:
        task = dataclasses.replace(task, answer=task.wrong, wrong=task.answer)
        scorer = CircuitEvaluator(adapter, graph, task, "discovery", 4, distance="task", max_rows=8)
        empty = -empty
    return task, graph, scorer, scores, empty


def test_minimize_is_greedy_removal_above_the_floor(tiny):
    task, graph, scorer, scores, empty = oriented_setup(tiny)
    started = float(scorer.evaluate(prune(graph, start_circuit(graph, scores)).unsqueeze(0)).metric[0])
    floor = empty + 0.5 * (started - empty)  # half of what the start circuit recovers
    result = minimize(graph, InProcessPool(scorer, chunk=4), scores, start_circuit(graph, scores), floor, chain=8)
    # reference: weakest |score| first, one pass per candidate, keep a removal while metric ≥ floor
    circuit = prune(graph, start_circuit(graph, scores))
    edges = torch.nonzero(circuit)
    order = torch.sort(scores[edges[:, 0], edges[:, 1]].abs().double(), stable=True).indices
    want = one_at_a_time(
        graph,
        circuit,
        edges[order].tolist(),
        lambda c: reference_metric(tiny, graph, task, c),
        lambda new, _cur: new >= floor,
    )
    assert torch.equal(result.circuit, want)
    assert 0 < int(result.circuit.sum()) < int(prune(graph, start_circuit(graph, scores)).sum())
    assert reference_metric(tiny, graph, task, result.circuit) >= floor


def test_pack_round_trips():
    x = torch.rand(3, 7, 5) < 0.5
    assert torch.equal(_unpack(_pack(x), tuple(x.shape)), x)


def test_task_distance_is_the_metric_gap(tiny):
    task, graph, scorer, _ = setup(tiny, distance="task")
    empty = scorer.evaluate((graph.allowed & False).unsqueeze(0))
    (batch,) = task.batches("discovery", batch_size=len(task))
    corrupted, logits = run_recording_senders(tiny, graph, batch.corrupted, batch.last)
    m_corrupted = float(logit_difference(logits, batch).mean())
    assert float(empty.metric[0]) == pytest.approx(m_corrupted, abs=1e-10)
    assert float(empty.distance[0]) == pytest.approx(abs(m_corrupted - scorer.clean_metric), abs=1e-10)


def test_chain_length_grows_with_right_guesses_and_with_the_shared_layers():
    from circuitfinder.methods.acdc import chain_length

    def state(right: int, wrong: int) -> SearchState:
        return SearchState(torch.zeros(1, 1, dtype=torch.bool), (0.0, 0.0), guessed=[1] * right + [0] * wrong + [2] * 5)

    always, never, half = state(64, 0), state(0, 64), state(16, 16)
    assert chain_length(always, 29, 30, 16) == 16  # right guesses (q capped at 0.995): the longest chain
    assert chain_length(never, 0, 30, 16) == 1  # every guess wrong: one candidate a pass
    assert chain_length(half, 28, 30, 16) > 1 == chain_length(half, 2, 30, 16)  # late receivers share more
    assert [chain_length(state(n, 32 - n), 10, 30, 64) for n in (8, 16, 24, 32)] == sorted(
        chain_length(state(n, 32 - n), 10, 30, 64) for n in (8, 16, 24, 32)
    )
    assert (
        chain_length(SearchState(torch.zeros(1, 1, dtype=torch.bool), (0.0, 0.0)), 10, 30, 16) > 1
    )  # prior: 3 in 4 right


def reference_groups(graph, circuit, edges, measure, keeps_removal) -> tuple[torch.Tensor, int]:
    """Group-wise ACDC written plainly: groups of the next ``size`` edges in order (the largest power
    of two up to ln 2 / p, p the share kept among the last decided with a prior), each removal
    standing when ``keeps_removal(measure(trial), current)``, a group that fails split in halves down to
    single edges; a receiver feeding no kept node loses its edges unmeasured. Returns the pruned
    circuit and the number of passes."""
    import math

    from circuitfinder.methods.acdc import GROUP_MAX, GROUP_PRIOR, GROUP_WINDOW

    current, passes, decided, position = measure(circuit), 1, [], 0

    def dead(r):
        fed = graph.receiver_feeds[r]
        return fed and not circuit[list(fed)].any()

    seen = {}

    def test(group, verdicts):
        nonlocal circuit, current, passes
        live = []
        for i in group:
            s, r = edges[i]
            if dead(r):
                circuit[s, r] = False
                verdicts[i] = 2
            else:
                live.append(i)
        if not live:
            return
        trial = circuit.clone()
        for i in live:
            trial[edges[i][0], edges[i][1]] = False
        key = trial.numpy().tobytes()
        if key not in seen:  # the same circuit measured before in this group: no pass
            seen[key] = measure(trial)
            passes += 1
        value = seen[key]
        if keeps_removal(value, current):
            circuit, current = trial, value
            verdicts.update({i: 1 for i in live})
        elif len(live) == 1:
            verdicts[live[0]] = 0
        else:
            test(live[: len(live) // 2], verdicts)
            test(live[len(live) // 2 :], verdicts)

    while position < len(edges):
        recent = [d for d in decided[-4 * GROUP_WINDOW :] if d != 2][-GROUP_WINDOW:]
        p = (recent.count(0) + 1) / (len(recent) + GROUP_PRIOR)
        size = 1
        while size * 2 <= min(GROUP_MAX, math.log(2) / p):
            size *= 2
        group, verdicts, seen = list(range(position, min(len(edges), position + size))), {}, {}
        test(group, verdicts)
        decided += [verdicts[i] for i in group]
        position += len(group)
    return prune(graph, circuit), passes


@pytest.mark.parametrize("tau_fraction", [0.003, 0.03])
def test_group_acdc_equals_a_plain_reference(tiny, tau_fraction):
    """Group-wise ACDC (through the pool, stacked evaluator) decides exactly as the plain recursion
    with one unstacked pass per test; it removes groups, keeps some edges, and costs fewer passes
    than candidates."""
    from circuitfinder.methods.acdc import acdc_groups

    task, graph, scorer, scores = setup(tiny)
    tau = tau_fraction * reference_distance(tiny, graph, task, graph.allowed & False)
    result = acdc_groups(graph, InProcessPool(scorer, chunk=4), scores, start_circuit(graph, scores), tau)
    circuit = prune(graph, start_circuit(graph, scores))
    want, passes = reference_groups(
        graph,
        circuit.clone(),
        removal_order(graph, circuit, scores),
        lambda c: reference_distance(tiny, graph, task, c),
        lambda new, cur: new - cur < tau,
    )
    assert torch.equal(result.circuit, want)
    assert result.state.rows == passes
    assert 0 < int(want.sum()) < int(circuit.sum())  # some edges go, some stay
    assert (
        reference_distance(tiny, graph, task, want) - reference_distance(tiny, graph, task, circuit)
        < tau * result.state.rows
    )


@pytest.mark.parametrize("tau_fraction", [None, 0.03])
def test_a_floor_stops_the_removals_adding_up_and_equals_a_plain_reference(tiny, tau_fraction):
    """With a floor, a group removal stands only if the distance grows by less than τ and the
    metric stays ≥ the floor: the search equals the plain recursion under that rule and ends at or
    above the floor. With no bound on τ, the same search without the floor ends below it (so the
    floor is what holds it); with a small τ both rules are in play."""
    from circuitfinder.methods.acdc import acdc_groups

    task, graph, scorer, scores, empty = oriented_setup(tiny)
    start = prune(graph, start_circuit(graph, scores))
    started = reference_metric(tiny, graph, task, start)
    floor = empty + 0.8 * (started - empty)
    tau = math.inf if tau_fraction is None else tau_fraction * (scorer.clean_metric - empty)
    pool = InProcessPool(scorer, chunk=4)
    if tau_fraction is None:
        assert reference_metric(tiny, graph, task, acdc_groups(graph, pool, scores, start, tau).circuit) < floor
    result = acdc_groups(graph, pool, scores, start, tau, floor=floor)

    def measure(c):
        m = reference_metric(tiny, graph, task, c)
        return m, abs(m - scorer.clean_metric)

    want, passes = reference_groups(
        graph,
        start.clone(),
        removal_order(graph, start, scores),
        measure,
        lambda new, cur: new[1] - cur[1] < tau and new[0] >= floor,
    )
    assert torch.equal(result.circuit, want) and result.state.rows == passes
    assert reference_metric(tiny, graph, task, result.circuit) >= floor
    assert int(result.circuit.sum()) < int(start.sum())  # the floor still lets edges go


def test_interrupted_group_acdc_resumes_to_the_same_circuit(tiny):
    from circuitfinder.methods.acdc import acdc_groups

    task, graph, scorer, scores = setup(tiny)
    pool = InProcessPool(scorer, chunk=4)
    tau = 0.01 * float(scorer.evaluate((graph.allowed & False).unsqueeze(0)).distance[0])
    whole = acdc_groups(graph, pool, scores, start_circuit(graph, scores), tau)
    saved = {}

    class Stop(Exception):
        pass

    def interrupt(state):
        saved["json"] = json.dumps(state.to_json())
        if state.chains == 2:  # the start's pass, then one group
            raise Stop

    with pytest.raises(Stop):
        acdc_groups(graph, pool, scores, start_circuit(graph, scores), tau, on_chain=interrupt)
    start = prune(graph, start_circuit(graph, scores))
    state = SearchState.from_json(json.loads(saved["json"]), start, removal_order(graph, start, scores))
    assert 0 < state.position < whole.candidates
    resumed = acdc_groups(graph, pool, scores, start_circuit(graph, scores), tau, state=state)
    assert torch.equal(resumed.circuit, whole.circuit) and resumed.state.decided == whole.state.decided


def test_reusing_earlier_passes_changes_no_number_and_skips_blocks(tiny):
    """An evaluator that keeps recent passes (``reuse``) gives a group search the same numbers, bit
    for bit, as one that runs every block of every pass, and runs fewer blocks."""
    from circuitfinder.methods.acdc import acdc_groups

    task, graph, scorer, scores = setup(tiny)
    reusing = CircuitEvaluator(tiny, graph, task, "discovery", 4, distance="kl", max_rows=8, reuse=2)
    tau = 0.01 * float(scorer.evaluate((graph.allowed & False).unsqueeze(0)).distance[0])
    plain = acdc_groups(graph, InProcessPool(scorer, chunk=4), scores, start_circuit(graph, scores), tau)
    fast = acdc_groups(graph, InProcessPool(reusing, chunk=4), scores, start_circuit(graph, scores), tau)
    assert fast.state.trials == plain.state.trials and torch.equal(fast.circuit, plain.circuit)
    assert reusing.reuse == 2 and 0 < reusing.blocks_run < scorer.blocks_run


def test_prompt_distance_is_the_mean_per_prompt_change(tiny):
    """distance="prompt": mean over prompts of |m_i(circuit) − m_i(clean)|, by plain patching;
    never below the task distance |mean change| (changes cannot cancel)."""
    task, graph, _, _ = setup(tiny)
    evaluator = CircuitEvaluator(tiny, graph, task, "discovery", 4, distance="prompt", max_rows=8)
    circuits = (
        torch.rand((3, graph.n_senders, graph.n_receivers), generator=torch.Generator().manual_seed(2)) < 0.6
    ) & graph.allowed
    got = evaluator.evaluate(circuits)
    (batch,) = task.batches("discovery", batch_size=len(task))
    reference_distance(tiny, graph, task, circuits[0])  # fills the cached corrupted run
    corrupted, _ = _RUNS[tiny.name]
    rows = torch.arange(batch.size)
    clean = logit_difference(tiny.logits(batch.clean)[rows, batch.last].double(), batch)
    for j, circuit in enumerate(circuits):
        patched = logit_difference(
            patched_logits(tiny, graph, batch.clean, corrupted, (~circuit).double())[rows, batch.last].double(), batch
        )
        assert float(got.distance[j]) == pytest.approx(float((patched - clean).abs().mean()), rel=1e-9)
        assert float(got.distance[j]) >= abs(float(got.metric[j]) - evaluator.clean_metric) - 1e-12
    assert float(got.distance.min()) > 0  # the circuits change the metric, so the test can fail
