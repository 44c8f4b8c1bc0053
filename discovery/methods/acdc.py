"""ACDC: a circuit found by removing edges one at a time and checking each removal by patching.

ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic
Interpretability", arXiv 2304.14997) visits receivers in reverse topological order, from the
logits back to the first layer. For each receiver it tries every incoming edge still in the
circuit: the edge is removed (patched from the corrupted run, with every removal so far kept),
and the removal stands when the distance from the clean run (KL divergence by default) grows by
less than τ; otherwise the edge is put back.

Seeding (as in Syed et al. 2023 and Hanna et al. 2024's use of attribution to bound patching):
only the edges of a start circuit are candidates, typically the top-N by attribution score with
everything else removed up front (checked in one pass), and each receiver's edges are tried
weakest first.

Speculative batching. The decisions are sequential, but attribution lets most of them be guessed.
A *chain* evaluates several candidates in one stacked pass: its row j is the circuit after the
guessed decisions on the chain's earlier candidates, minus candidate j. Walking the chain, row
j's verdict is exact as long as every earlier guess was right; at the first wrong guess the rest
of the chain is dropped and the next chain starts after it. The circuit found is exactly that of
one-at-a-time ACDC in the same order; good guesses only save passes (reported as
``rows``/``wasted_rows``). Guesses come from the decisions so far: candidates are binned by
their attribution rank, and a bin guesses "remove" while most of its decided candidates were
removed (the weaker 80 % of bins start guessing "remove").

Chain length adapts. A chain of c rows whose earliest receiver is in layer l costs about
``OVERHEAD + l + c · (L − l + 1)`` layer-passes (the layers before l run once; the rest, and the
unembedding, once per row) and decides ``(1 − q^c) / (1 − q)`` candidates on average when each
guess is right with probability q. Each chain takes the length, up to ``chain``, with the least
cost per decision, q being the share of right guesses among the last ``GUESS_WINDOW`` (with a
prior of 3 right in 4). Where few removals stand (seeded ACDC at a small τ) chains are short;
where nearly all do (unseeded ACDC) they are long. The length only changes the cost, never the
circuit; it depends only on the saved decisions, so a resumed search takes the same chains.

Dead receivers: a receiver whose nodes have no kept outgoing edge cannot affect the logits (the
argument of :func:`circuitfinder.engine.masks.prune`; under Gemma's shared post-norm the nodes are the
whole layer's heads, ``EdgeGraph.receiver_feeds``), so its incoming edges go without a pass.

The same engine, with another acceptance rule, prunes a circuit down to a target faithfulness
(:func:`minimize`).

Group tests (:func:`acdc_groups`). Most of a seed's weak edges can go, so testing them one at a
time spends a pass per edge to learn little. ACDC's rule applied to a group of edges — the
group's removal stands when the distance grows by less than τ — removes a whole run of weak
edges in one pass; a group whose removal does not stand is split in halves, tried in turn, down
to single edges, which are kept (binary splitting, as in adaptive group testing: Hwang 1972,
"A method for detecting all defective members in a population by group testing"). Candidates
are taken weakest |score| first over the whole seed. (ACDC's own order, receiver by receiver,
mixes strong and weak edges in every group: on SmolLM2 IOI it tried more circuits and kept more
edges, at lower held-out faithfulness; runs of weak edges sorted by layer, so that trials reuse
more of the current circuit's pass, also tried more circuits.) The group size follows the share p of
edges kept among the last ``GROUP_WINDOW`` decided, the largest power of two up to ``ln 2 / p``
(Hwang's rule), so groups are long among the weak edges and single near the strong ones. Every
accepted removal, single or grouped, grows the distance by less than τ, as in ACDC; grouping
makes the rule stricter (a group's edges share one τ), never looser.

A float32 referee (:class:`Referee`). A pass in bfloat16 takes 0.55–0.7 of float32's time on
hardware that computes it, but its metric and distance carry rounding noise, and a search is a
long chain of threshold decisions: one removal decided the other way changes every later trial,
and the circuit found. With a referee, the passes run in half precision and every decision whose
margin (from τ, or from the floor) lies within :data:`REFEREE_MARGIN` times the half-precision
error measured at the start is decided again from the same two circuits in float32, with
float32's own τ and floor. Every other decision is one float32 would make too, so the search
finds float32's circuit; the trials decided in float32 are kept in the state (and the run's
``decisions.csv``). Where that many errors reach τ itself (:meth:`AcdcRule.resolves`; on SmolLM2
IOI a removal's change of distance is off by up to 0.027 in bfloat16, τ is 0.047) nearly every
decision would go to float32, and the caller runs the passes in float32 instead
(``circuitfinder.methods.search``); likewise where half precision's passes are not
:data:`REFEREE_SPEEDUP` times as fast as float32's (:meth:`Referee.unprofitable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from circuitfinder.engine.faithfulness import Scores
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import Mask, prune

Evaluate = Callable[[torch.Tensor], Scores]  # circuits [k, S, R] -> their scores
GUESS_BINS = 10
GUESS_WINDOW = 32
OVERHEAD = 1.0  # a pass's fixed cost, in layer-passes
GROUP_WINDOW = 128  # decided candidates whose share kept sets the next group's size
GROUP_PRIOR = 64  # the share kept starts at 1 in this many
GROUP_MAX = 64
REFEREE_MARGIN = 4  # a decision is re-decided in float32 when its margin is under this many half-precision errors
REFEREE_SPEEDUP = 2.0  # half-precision passes pay off under a referee only this many times faster than float32's:
# about half the decisions went to float32 even at τ = 0.2 on SmolLM2 IOI (1,287 of 2,378: 1.43× float32's search
# time, with bfloat16 passes 1.5–1.8× as fast on a CPU with AVX-512 BF16)


def candidate_order(graph: EdgeGraph, start: Mask, scores: torch.Tensor) -> list[tuple[int, int]]:
    """The start circuit's edges in ACDC order: receivers from the logits backwards, and within a
    receiver by increasing |score| (ties by sender index)."""
    order = []
    for r in reversed(range(graph.n_receivers)):
        senders = torch.nonzero(start[:, r]).flatten()
        if len(senders):
            key = scores[senders, r].abs().double()
            ranked = senders[torch.sort(key, stable=True).indices]
            order += [(int(s), r) for s in ranked]
    return order


@dataclass
class SearchState:
    """Progress of an iterative removal: enough to resume it exactly."""

    circuit: Mask
    current: tuple[float, float]  # (metric, distance) of ``circuit``
    decided: list[int] = field(default_factory=list)  # per candidate decided: 0 kept, 1 removed, 2 removed unevaluated
    guessed: list[int] = field(default_factory=list)  # per candidate decided: 1 guess right, 0 wrong, 2 no guess
    trials: list = field(default_factory=list)  # per candidate decided: [metric, distance] with it removed, before
    # the decision's [metric, distance], and the same four in float32 when a referee decided it; None for a
    # dead receiver's edge (or a checkpoint that predates them)
    rows: int = 0  # circuits evaluated
    wasted_rows: int = 0  # rows dropped after a wrong guess
    chains: int = 0  # stacked evaluations

    @property
    def position(self) -> int:
        return len(self.decided)

    def to_json(self) -> dict:
        return {
            "current": list(self.current),
            "decided": "".join(map(str, self.decided)),
            "rows": self.rows,
            "wasted_rows": self.wasted_rows,
            "chains": self.chains,
            "trials": self.trials,
            "guessed": "".join(map(str, self.guessed)),
        }

    @classmethod
    def from_json(cls, data: dict, start: Mask, candidates: list[tuple[int, int]]) -> "SearchState":
        decided = [int(c) for c in data["decided"]]
        if len(decided) > len(candidates) or any(d not in (0, 1, 2) for d in decided):
            raise ValueError("checkpoint does not fit this search")
        circuit = start.clone()
        for (s, r), d in zip(candidates, decided):
            if d:
                circuit[s, r] = False
        trials = data.get("trials") or [None] * len(decided)
        guessed = [int(c) for c in data.get("guessed", "2" * len(decided))]
        if len(trials) != len(decided) or len(guessed) != len(decided):
            raise ValueError("checkpoint does not fit this search")
        return cls(
            circuit, tuple(data["current"]), decided, guessed, trials, data["rows"], data["wasted_rows"], data["chains"]
        )


def _guesser(candidates: list[tuple[int, int]], scores: torch.Tensor, state: SearchState) -> Callable[[int], bool]:
    """``guess(i)`` → True when candidate i is guessed to be removed (see the module docstring)."""
    n = len(candidates)
    s = torch.tensor([c[0] for c in candidates], dtype=torch.long, device="cpu")
    r = torch.tensor([c[1] for c in candidates], dtype=torch.long, device="cpu")
    rank = torch.empty(n, dtype=torch.long, device="cpu")
    rank[torch.sort(scores[s, r].abs().double(), descending=True, stable=True).indices] = torch.arange(n, device="cpu")
    bins = (rank * GUESS_BINS // max(n, 1)).tolist()
    removed = [0] * GUESS_BINS
    seen = [0] * GUESS_BINS
    counted = [0]

    def guess(i: int) -> bool:
        while counted[0] < state.position:  # fold in decisions made since the last call
            j = counted[0]
            if state.decided[j] != 2:
                seen[bins[j]] += 1
                removed[bins[j]] += state.decided[j]
            counted[0] += 1
        b = bins[i]
        if seen[b] == 0:
            return b >= GUESS_BINS // 5
        return 2 * removed[b] >= seen[b]

    return guess


def chain_length(state: SearchState, layer: int, n_layers: int, longest: int) -> int:
    """The chain length, up to ``longest``, with the least expected cost per decision when the
    chain's first receiver is in ``layer`` (see the module docstring)."""
    recent = [g for g in state.guessed[-4 * GUESS_WINDOW :] if g != 2][-GUESS_WINDOW:]
    q = min((sum(recent) + 3) / (len(recent) + 4), 0.995)
    per_row, shared = n_layers - layer + 1, OVERHEAD + layer
    return min(range(1, longest + 1), key=lambda c: (shared + c * per_row) * (1 - q) / (1 - q**c))


def _dead(graph: EdgeGraph, circuit: Mask, receiver: int) -> bool:
    fed = graph.receiver_feeds[receiver]
    return bool(fed) and not bool(circuit[list(fed)].any())


@dataclass(frozen=True)
class AcdcRule:
    """ACDC's acceptance: a removal stands when the distance grows by less than ``tau`` and, with
    a ``floor``, the metric stays at or above it (each removal's growth is under τ, but their sum
    is not bounded; the floor bounds it). ``tau=None`` is minimisation's rule: the floor alone."""

    tau: float | None
    floor: float | None = None

    def __call__(self, new: tuple[float, float], current: tuple[float, float]) -> bool:
        return (self.tau is None or new[1] - current[1] < self.tau) and (self.floor is None or new[0] >= self.floor)

    def margin(self, new: tuple[float, float], current: tuple[float, float], error: tuple[float, float]) -> float:
        """How far this decision is from going the other way, in units of the evaluations' ``error``:
        the metric's (against the floor) and a change in distance's (against τ)."""
        margins = []
        if self.tau is not None:
            margins.append(abs(self.tau - (new[1] - current[1])) / max(error[1], 1e-30))
        if self.floor is not None:
            margins.append(abs(new[0] - self.floor) / max(error[0], 1e-30))
        return min(margins, default=math.inf)

    def resolves(self, error: tuple[float, float], margin: float) -> bool:
        """Whether evaluations with this ``error`` can settle removals under τ: ``margin`` errors in a
        change of distance fall short of τ (else nearly every decision would need the referee)."""
        return self.tau is None or margin * error[1] < self.tau


@dataclass
class Referee:
    """Decides again, in float32, the removals a half-precision pass cannot settle (module docstring).

    ``evaluate`` scores circuits on a float32 copy of the model (the same prompts); ``rule`` holds
    float32's τ and floor; ``error`` is the largest difference between the half-precision and the
    float32 evaluation of the same circuits, in the metric and in a removal's change of distance,
    measured before the search.
    """

    evaluate: Evaluate
    rule: AcdcRule
    error: tuple[float, float]
    margin: float = REFEREE_MARGIN
    speedup: float = math.inf  # float32's time for a pass over half precision's, measured with the error
    _current: tuple[bytes, tuple[float, float]] | None = None  # float32's score of the current circuit

    def unprofitable(self, half: str = "half precision") -> str | None:
        """Why refereed passes in ``half`` would cost more than float32's alone, or None."""
        if not self.rule.resolves(self.error, self.margin):
            return (
                f"{half} cannot settle removals under τ = {self.rule.tau:.3g} "
                f"({self.margin:g} × {self.error[1]:.2g} ≥ τ)"
            )
        if self.speedup < REFEREE_SPEEDUP:
            return (
                f"{half} passes are {self.speedup:.2f}× as fast as float32's, under the {REFEREE_SPEEDUP:g}× "
                "a referee needs (about half the decisions go to float32)"
            )
        return None

    def near(self, new: tuple[float, float], current: tuple[float, float]) -> bool:
        return self.rule.margin(new, current, self.error) < self.margin

    def scores(self, trial: Mask, circuit: Mask) -> tuple[tuple[float, float], tuple[float, float]]:
        """Float32's (metric, distance) of ``trial`` and of the current ``circuit`` (kept until it
        changes; a trial whose removal stands is the next current circuit)."""
        key = circuit.numpy().tobytes()
        if self._current is None or self._current[0] != key:
            scored = self.evaluate(circuit.unsqueeze(0))
            self._current = (key, (float(scored.metric[0]), float(scored.distance[0])))
        current = self._current[1]
        scored = self.evaluate(trial.unsqueeze(0))
        new = (float(scored.metric[0]), float(scored.distance[0]))
        if self.rule(new, current):
            self._current = (trial.numpy().tobytes(), new)
        return new, current


def _decider(
    accept: Callable[[tuple[float, float], tuple[float, float]], bool], referee: Referee | None, state: SearchState
) -> Callable[[Mask, tuple[float, float]], tuple[bool, list]]:
    """``decide(trial, new)`` → (whether removing down to ``trial``, scored ``new``, stands; the
    trial's record): ``accept`` on the pass's scores, or the referee's float32 verdict when near."""

    def decide(trial: Mask, new: tuple[float, float]) -> tuple[bool, list]:
        record = [*new, *state.current]
        if referee is None or not referee.near(new, state.current):
            return accept(new, state.current), record
        new32, current32 = referee.scores(trial, state.circuit)
        return referee.rule(new32, current32), record + [*new32, *current32]

    return decide


def iterative_removal(
    graph: EdgeGraph,
    candidates: list[tuple[int, int]],
    state: SearchState,
    evaluate: Evaluate,
    accept: Callable[[tuple[float, float], tuple[float, float]], bool],
    guess: Callable[[int], bool],
    chain: int = 8,
    on_chain: Callable[[SearchState], None] | None = None,
    referee: Referee | None = None,
) -> SearchState:
    """Decide every candidate from ``state.position`` on, in order, by exact evaluation.

    ``accept(new, current)`` (each ``(metric, distance)``) says whether a removal stands.
    ``chain`` is the longest chain (:func:`chain_length` picks each one's length).
    ``on_chain`` is called after each chain (for checkpoints and progress).
    ``referee`` decides again in float32 the removals near the threshold (:class:`Referee`).
    """
    decide = _decider(accept, referee, state)
    while state.position < len(candidates):
        rows, spec, plan = [], state.circuit.clone(), []  # plan: (candidate, row or None if dead, guess)
        i = state.position
        length = chain_length(state, candidates[i][1] // graph.receivers_per_layer, graph.shape.n_layers, chain)
        while i < len(candidates) and len(rows) < length:
            s, r = candidates[i]
            if _dead(graph, spec, r):
                spec[s, r] = False
                plan.append((i, None, True))
            else:
                row = spec.clone()
                row[s, r] = False
                rows.append(row)
                guessed = guess(i)
                plan.append((i, len(rows) - 1, guessed))
                if guessed:
                    spec = row
            i += 1
        scored = evaluate(torch.stack(rows)) if rows else None
        used = 0
        for i, j, guessed in plan:
            s, r = candidates[i]
            if j is None:
                state.circuit[s, r] = False
                state.decided.append(2)
                state.guessed.append(2)
                state.trials.append(None)
                continue
            used = j + 1
            new = (float(scored.metric[j]), float(scored.distance[j]))
            removed, record = decide(rows[j], new)
            state.trials.append(record)
            if removed:
                state.circuit[s, r] = False
                state.current = new
            state.decided.append(int(removed))
            state.guessed.append(int(removed == guessed))
            if removed != guessed:
                break
        state.rows += len(rows)
        state.wasted_rows += len(rows) - used
        state.chains += 1 if rows else 0
        if on_chain:
            on_chain(state)
    return state


def group_size(state: SearchState, largest: int = GROUP_MAX) -> int:
    """The next group's size: the largest power of two up to ``ln 2 / p`` (at most ``largest``), p
    the share kept among the last ``GROUP_WINDOW`` candidates decided by a pass (with a prior)."""
    recent = [d for d in state.decided[-4 * GROUP_WINDOW :] if d != 2][-GROUP_WINDOW:]
    p = (recent.count(0) + 1) / (len(recent) + GROUP_PRIOR)
    return max(1, min(largest, 2 ** int(math.floor(math.log2(max(1.0, math.log(2) / p))))))


def group_removal(
    graph: EdgeGraph,
    candidates: list[tuple[int, int]],
    state: SearchState,
    evaluate: Evaluate,
    accept: Callable[[tuple[float, float], tuple[float, float]], bool],
    on_chain: Callable[[SearchState], None] | None = None,
    largest: int = GROUP_MAX,
    referee: Referee | None = None,
) -> SearchState:
    """Decide every candidate from ``state.position`` on by group tests (module docstring).

    Each group is recorded as one chain: its candidates' decisions in order, each with the trial
    that decided it (the group's, a half's, or its own). ``rows`` counts passes; ``wasted_rows``
    the tests of several edges whose removal did not stand (they only split the group). When a
    failed group's first half stands, the second half's trial is the whole group's circuit (up to
    edges of dead receivers, which change nothing): its verdict comes without a pass.
    ``referee`` decides again in float32 the removals near the threshold (:class:`Referee`).
    """
    decide = _decider(accept, referee, state)
    while state.position < len(candidates):
        block = range(state.position, min(len(candidates), state.position + group_size(state, largest)))
        decided: dict[int, tuple[int, list | None]] = {}
        known: dict[bytes, tuple[float, float]] = {}  # this group's trials: (metric, distance)

        def test(indices: list[int]) -> None:
            live = []
            for i in indices:
                s, r = candidates[i]
                if _dead(graph, state.circuit, r):
                    state.circuit[s, r] = False
                    decided[i] = (2, None)
                else:
                    live.append(i)
            if not live:
                return
            trial = state.circuit.clone()
            for i in live:
                trial[candidates[i]] = False
            key = trial.numpy().tobytes()
            if key not in known:  # after a failed group's first half stands, the second half's trial is the group's
                scored = evaluate(trial.unsqueeze(0))
                known[key] = (float(scored.metric[0]), float(scored.distance[0]))
                state.rows += 1
            removed, record = decide(trial, known[key])
            if removed:
                state.circuit, state.current = trial, known[key]
                decided.update((i, (1, record)) for i in live)
            elif len(live) == 1:
                decided[live[0]] = (0, record)
            else:
                state.wasted_rows += 1
                test(live[: len(live) // 2])
                test(live[len(live) // 2 :])

        test(list(block))
        for i in block:
            decision, record = decided[i]
            state.decided.append(decision)
            state.guessed.append(2)
            state.trials.append(record)
        state.chains += 1
        if on_chain:
            on_chain(state)
    return state


@dataclass(frozen=True)
class SearchResult:
    circuit: Mask  # pruned
    state: SearchState
    order: list[tuple[int, int]]  # the candidates (sender, receiver) in the order they were decided

    @property
    def candidates(self) -> int:
        return len(self.order)

    @property
    def evaluated(self) -> int:
        """Candidates decided by a pass (the others were dead receivers)."""
        return sum(d != 2 for d in self.state.decided)


def removal_order(graph: EdgeGraph, start: Mask, scores: torch.Tensor) -> list[tuple[int, int]]:
    """The start circuit's edges weakest |score| first, over the whole graph (the order of the group search and
    of minimisation)."""
    edges = torch.nonzero(start)
    key = scores[edges[:, 0], edges[:, 1]].abs().double()
    return [tuple(map(int, e)) for e in edges[torch.sort(key, stable=True).indices]]


def _search(
    graph: EdgeGraph,
    evaluate: Evaluate,
    scores: torch.Tensor,
    start: Mask,
    order,
    accept,
    chain: int,
    state: SearchState | None,
    on_chain,
    grouped: bool = False,
    referee: Referee | None = None,
) -> SearchResult:
    """Prune ``start``, order its edges, score it once (unless resuming) and decide every edge,
    one at a time in speculative chains or (``grouped``) by group tests."""
    start = prune(graph, start)
    candidates = order(graph, start, scores)
    if state is None:
        first = evaluate(start.unsqueeze(0))
        state = SearchState(start.clone(), (float(first.metric[0]), float(first.distance[0])), rows=1, chains=1)
    if grouped:
        state = group_removal(graph, candidates, state, evaluate, accept, on_chain, referee=referee)
    else:
        state = iterative_removal(
            graph, candidates, state, evaluate, accept, _guesser(candidates, scores, state), chain, on_chain, referee
        )
    return SearchResult(prune(graph, state.circuit), state, candidates)


def acdc(
    graph: EdgeGraph,
    evaluate: Evaluate,
    scores: torch.Tensor,
    start: Mask,
    tau: float,
    chain: int = 8,
    state: SearchState | None = None,
    on_chain: Callable[[SearchState], None] | None = None,
    floor: float | None = None,
    referee: Referee | None = None,
) -> SearchResult:
    """ACDC over the edges of ``start`` (see the module docstring).

    A removal stands when the distance from the clean run grows by less than ``tau`` (and the
    metric stays ≥ ``floor`` when one is given: :class:`AcdcRule`).
    ``state`` resumes an interrupted search (from :meth:`SearchState.from_json`).
    ``referee`` decides again in float32 the removals near the threshold (:class:`Referee`).
    """
    return _search(
        graph, evaluate, scores, start, candidate_order, AcdcRule(tau, floor), chain, state, on_chain, referee=referee
    )


def acdc_groups(
    graph: EdgeGraph,
    evaluate: Evaluate,
    scores: torch.Tensor,
    start: Mask,
    tau: float,
    state: SearchState | None = None,
    on_chain: Callable[[SearchState], None] | None = None,
    floor: float | None = None,
    referee: Referee | None = None,
) -> SearchResult:
    """ACDC's rule (:class:`AcdcRule`) on groups of edges, weakest |score| first over the whole
    seed, bisected when a group's removal does not stand (see the module docstring)."""
    return _search(
        graph,
        evaluate,
        scores,
        start,
        removal_order,
        AcdcRule(tau, floor),
        0,
        state,
        on_chain,
        grouped=True,
        referee=referee,
    )


def minimize(
    graph: EdgeGraph,
    evaluate: Evaluate,
    scores: torch.Tensor,
    start: Mask,
    floor: float,
    chain: int = 8,
    state: SearchState | None = None,
    on_chain: Callable[[SearchState], None] | None = None,
    referee: Referee | None = None,
) -> SearchResult:
    """Remove edges of ``start`` (weakest |score| first overall) while the metric stays ≥ ``floor``.

    With ``floor`` = m(∅) + target · (m(full) − m(∅)) this keeps faithfulness ≥ target on the
    evaluated prompts: the pruning step of a minimal faithful circuit.
    """
    return _search(
        graph, evaluate, scores, start, removal_order, AcdcRule(None, floor), chain, state, on_chain, referee=referee
    )
