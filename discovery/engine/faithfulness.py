"""Exact faithfulness of circuits, by patching, on one split of a task's prompts.

The faithfulness of a circuit C is (m(C) − m(∅)) / (m(full) − m(∅)), where m is the task metric
averaged over the prompts, m(C) is measured with every edge outside C ablated (patched from the
chosen ablation's sender values, :mod:`circuitfinder.engine.ablation`), m(full) is the clean run and m(∅) the
run with every edge ablated: under the default counterfactual ablation that is exactly the
corrupted run. The empty circuit scores exactly 0 and the full circuit exactly 1. This is the
normalised faithfulness of Hanna et al. 2024 and of the MIB circuit track (Mueller et al. 2025).

:class:`CircuitEvaluator` builds the ablated sender values of each batch once, and then costs
one forward pass per batch for each circuit evaluated. Several circuits share a pass: the batch
is repeated once per circuit and each copy is patched with its own circuit (``patched_logits``
with a mask per copy), as many copies per pass as a memory budget allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from circuitfinder.engine.ablation import Ablation, make_ablation
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.masks import Mask, prune, top_edges
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import patched_logits, stacked_patched_logits
from circuitfinder.tasks.base import Task


class MetricError(ValueError):
    """A metric that makes faithfulness meaningless (NaN, or clean equal to corrupted)."""


@dataclass(frozen=True)
class Baseline:
    """Mean metric of the clean run and of the fully ablated run (m(∅)) on a split, and clean accuracy.

    ``corrupted`` is m(∅): the corrupted run under counterfactual ablation, otherwise the clean
    prompts with every edge mean- or zero-ablated.
    """

    clean: float
    corrupted: float
    accuracy: float  # fraction of prompts whose answer outscores the wrong answer (clean run)
    n_prompts: int


class CircuitEvaluator:
    """Exact metric and faithfulness of circuits on one split of a task, under one ablation.

    Args:
        ablation: ``"counterfactual"``, ``"mean"`` or ``"zero"`` (or a built :class:`Ablation`).
        memory_budget: bytes that the patched copies of one batch may take in a forward pass
            evaluating several circuits (bounds how many circuits share a pass).
    """

    def __init__(self, adapter: ModelAdapter, graph: EdgeGraph, task: Task, split: str = "heldout", batch_size: int = 16,
                 ablation: str | Ablation = "counterfactual", memory_budget: int = 1 << 30):
        self.adapter, self.graph, self.task = adapter, graph, task
        self.memory_budget = memory_budget
        self.batches = [b.to(adapter.device) for b in task.batches(split, batch_size)]
        if not self.batches:
            raise MetricError(f"task {task.name!r} has no {split} prompts")
        self.n = sum(b.size for b in self.batches)
        self.ablation = make_ablation(ablation, adapter, graph, task, batch_size)
        self._ablated = []
        clean_sum = correct = 0.0
        with torch.no_grad():
            for batch in self.batches:
                self._ablated.append(self.ablation.senders(batch))
                clean_logits = adapter.logits(batch.clean, batch.last)
                clean_sum += float(task.metric(clean_logits, batch).sum())
                rows = torch.arange(batch.size, device=clean_logits.device)
                correct += float((clean_logits[rows, batch.answer] > clean_logits[rows, batch.wrong]).sum())
        self.forward_passes = len(self.batches) * (1 + self.ablation.is_run)
        empty = float(self._metric_sums([torch.zeros_like(graph.allowed)])[0]) / self.n
        self.baseline = Baseline(clean_sum / self.n, empty, correct / self.n, self.n)
        for label, value in (("clean", self.baseline.clean), ("ablated", self.baseline.corrupted)):
            if not math.isfinite(value):
                raise MetricError(f"the {label} metric is {value} on the {split} prompts; check the task's answers")
        if abs(self.baseline.clean - self.baseline.corrupted) < 1e-6:
            raise MetricError(
                f"the clean metric equals the metric with every edge ablated ({self.ablation.kind}; "
                f"{self.baseline.clean:.4g}) on the {split} prompts: the ablation does not change the "
                "behaviour, so faithfulness is undefined"
            )

    def prune(self, mask: Mask) -> Mask:
        """:func:`circuitfinder.engine.masks.prune` with the rule this evaluator's ablation allows."""
        return prune(self.graph, mask, ablation_is_run=self.ablation.is_run)

    def circuits_per_pass(self) -> int:
        """How many circuits one forward pass evaluates within the memory budget."""
        b, p = max(x.clean.shape[0] for x in self.batches), max(x.clean.shape[1] for x in self.batches)
        S, R, d = self.graph.n_senders, self.graph.n_receivers, self.graph.shape.d_model
        itemsize = torch.finfo(self.adapter.dtype).bits // 8
        per_circuit = itemsize * (b * S * p * d + S * R)  # its senders' diff and its mask
        return max(1, self.memory_budget // per_circuit)

    def _metric_sums(self, circuits: Sequence[Mask]) -> torch.Tensor:
        """Metric summed over the prompts for each circuit, all circuits in one pass per batch."""
        k = len(circuits)
        removed = torch.stack([~c for c in circuits]).to(self.adapter.dtype)  # [k, s, r]
        sums = torch.zeros(k, dtype=torch.float64)
        for batch, ablated in zip(self.batches, self._ablated):
            if k == 1:
                logits = patched_logits(self.adapter, self.graph, batch.clean, ablated, removed[0], batch.last)
                values = self.task.metric(logits, batch)[None]  # [1, b]
            else:
                copies = batch.repeat(k)  # copy j is rows j·b … (j+1)·b − 1
                logits = stacked_patched_logits(self.adapter, self.graph, batch.clean, ablated, removed, batch.last)
                values = self.task.metric(logits, copies).view(k, batch.size)
            sums += values.sum(1).double().cpu()
        self.forward_passes += k * len(self.batches)
        return sums

    @torch.no_grad()
    def metrics(self, circuits: Sequence[Mask], progress: Callable[[int], None] | None = None) -> list[float]:
        """Mean metric of each circuit with every edge outside it ablated, several circuits per pass.

        The full and the empty circuit are, by definition, the clean and the fully ablated run:
        they take the baseline's values (so their faithfulness is exactly 1 and 0).
        """
        allowed = self.graph.allowed
        values: list[float | None] = [None] * len(circuits)
        todo = []
        for i, c in enumerate(circuits):
            c = c & allowed
            if torch.equal(c, allowed):
                values[i] = self.baseline.clean
            elif not c.any():
                values[i] = self.baseline.corrupted
            else:
                todo.append(i)
        if progress and len(todo) < len(circuits):
            progress(len(circuits) - len(todo))
        per_pass = self.circuits_per_pass()
        for start in range(0, len(todo), per_pass):
            chunk = todo[start : start + per_pass]
            for i, total in zip(chunk, self._metric_sums([circuits[i] for i in chunk]).tolist()):
                values[i] = total / self.n
                if not math.isfinite(values[i]):
                    raise MetricError(f"the metric of a circuit is {values[i]}")
            if progress:
                progress(len(chunk))
        return values

    def metric(self, circuit: Mask) -> float:
        """Mean metric with every edge outside ``circuit`` ablated."""
        return self.metrics([circuit])[0]

    def faithfulnesses(self, circuits: Sequence[Mask], progress: Callable[[int], None] | None = None) -> list[float]:
        """(m(C) − m(∅)) / (m(full) − m(∅)) for each circuit (evaluated several per pass)."""
        b = self.baseline
        return [(m - b.corrupted) / (b.clean - b.corrupted) for m in self.metrics(circuits, progress)]

    def faithfulness(self, circuit: Mask) -> float:
        """(m(C) − m(∅)) / (m(full) − m(∅)) for ``circuit``."""
        return self.faithfulnesses([circuit])[0]


@dataclass(frozen=True)
class SizeSearch:
    """The smallest top-N circuit found to reach a target faithfulness, and the points tried."""

    n_edges: int  # N of the chosen top-N selection (before pruning)
    reached: bool
    points: tuple[tuple[int, int, float], ...]  # (N, edges after pruning, faithfulness), by N


def search_size(
    evaluator: CircuitEvaluator,
    scores: torch.Tensor,
    target: float,
    progress: Callable[[int, int, float], None] | None = None,
    refine_steps: int = 6,
) -> SizeSearch:
    """Find a small N whose pruned top-N circuit reaches ``target`` faithfulness.

    Tries N on a doubling grid from 8 up to every edge, then bisects between the last size below
    the target and the first at or above it. Faithfulness need not grow monotonically with N, so
    the result is the smallest N *found*, not a proven minimum.
    """
    graph = evaluator.graph
    tried: dict[int, tuple[int, float]] = {}

    def measure(n: int) -> float:
        if n not in tried:
            mask = evaluator.prune(top_edges(graph, scores, n))
            tried[n] = (int(mask.sum()), evaluator.faithfulness(mask))
            if progress:
                progress(n, tried[n][0], tried[n][1])
        return tried[n][1]

    grid, n = [], 8
    while n < graph.n_edges:
        grid.append(n)
        n *= 2
    grid.append(graph.n_edges)
    low, high = 0, None
    for n in grid:
        if measure(n) >= target:
            high = n
            break
        low = n
    if high is None:
        best = max(tried, key=lambda k: tried[k][1])
        return SizeSearch(best, False, tuple((k, *tried[k]) for k in sorted(tried)))
    for _ in range(refine_steps):
        if high - low <= max(1, high // 50):
            break
        mid = (low + high) // 2
        if measure(mid) >= target:
            high = mid
        else:
            low = mid
    return SizeSearch(high, True, tuple((k, *tried[k]) for k in sorted(tried)))


MIB_PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


@dataclass(frozen=True)
class Curve:
    """Exact faithfulness of top-k % circuits, and its areas (MIB circuit track, Mueller et al. 2025).

    ``cpr`` is the area under faithfulness against the fraction of edges kept (higher is better)
    and ``cmd`` the area under |1 − faithfulness| (lower is better), both by the trapezoid rule
    from the empty circuit (fraction 0, faithfulness exactly 0) through the points.
    """

    points: tuple[tuple[float, int, int, float], ...]  # (percent, top-N, edges after pruning, faithfulness)
    cpr: float
    cmd: float

    def rows(self) -> list[dict]:
        return [{"percent": p, "top_n": n, "edges_kept": k, "faithfulness": f} for p, n, k, f in self.points]


def faithfulness_curve(evaluator: CircuitEvaluator, scores: torch.Tensor, percents: tuple[float, ...] = MIB_PERCENTS,
                       progress: Callable[[int], None] | None = None) -> Curve:
    """Faithfulness of the top-k % edges (pruned) for each k in ``percents``, exactly, by patching.

    The circuits are evaluated together, several per forward pass (:meth:`CircuitEvaluator.metrics`).
    """
    graph = evaluator.graph
    sizes = [max(1, round(graph.n_edges * percent / 100)) for percent in percents]
    circuits = [evaluator.prune(top_edges(graph, scores, n)) for n in sizes]
    values = evaluator.faithfulnesses(circuits, progress)
    points = [(p, n, int(c.sum()), f) for p, n, c, f in zip(percents, sizes, circuits, values)]
    xs = [0.0] + [p / 100 for p, *_ in points]
    fs = [0.0] + [f for *_, f in points]
    cpr = sum((xs[i + 1] - xs[i]) * (fs[i] + fs[i + 1]) / 2 for i in range(len(xs) - 1))
    cmd = sum((xs[i + 1] - xs[i]) * (abs(1 - fs[i]) + abs(1 - fs[i + 1])) / 2 for i in range(len(xs) - 1))
    return Curve(tuple(points), cpr, cmd)
