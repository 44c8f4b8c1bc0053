"""Exact faithfulness of circuits, by patching, on one split of a task's prompts.

The faithfulness of a circuit C is (m(C) − m(∅)) / (m(full) − m(∅)), where m is the task metric
averaged over the prompts, m(C) is measured with every edge outside C patched from the corrupted
run, m(full) is the clean run and m(∅) the corrupted run (so the empty circuit scores exactly 0
and the full circuit exactly 1). This is the normalised faithfulness of Hanna et al. 2024 and of
the MIB circuit track (Mueller et al. 2025).

:class:`CircuitEvaluator` runs the corrupted and clean prompts once, keeps the corrupted sender
outputs, and then costs one forward pass per batch for each circuit evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from discovery.adapter import ModelAdapter
from discovery.circuit import Mask, prune, top_edges
from discovery.graph import EdgeGraph
from discovery.patching import patched_logits, run_recording_senders
from tasks.base import Task, TaskBatch


class MetricError(ValueError):
    """A metric that makes faithfulness meaningless (NaN, or clean equal to corrupted)."""


@dataclass(frozen=True)
class Baseline:
    """Mean metric of the clean and the corrupted run on a split, and clean accuracy."""

    clean: float
    corrupted: float
    accuracy: float  # fraction of prompts whose answer outscores the wrong answer (clean run)
    n_prompts: int


class CircuitEvaluator:
    """Exact metric and faithfulness of circuits on one split of a task."""

    def __init__(self, adapter: ModelAdapter, graph: EdgeGraph, task: Task, split: str = "heldout", batch_size: int = 16):
        self.adapter, self.graph, self.task = adapter, graph, task
        self.batches = [b.to(adapter.device) for b in task.batches(split, batch_size)]
        if not self.batches:
            raise MetricError(f"task {task.name!r} has no {split} prompts")
        self.n = sum(b.size for b in self.batches)
        self._corrupted = []
        clean_sum = corrupted_sum = correct = 0.0
        with torch.no_grad():
            for batch in self.batches:
                senders, corrupted_logits = run_recording_senders(adapter, graph, batch.corrupted, batch.last)
                self._corrupted.append(senders)
                clean_logits = adapter.logits(batch.clean, batch.last)
                clean_sum += float(task.metric(clean_logits, batch).sum())
                corrupted_sum += float(task.metric(corrupted_logits, batch).sum())
                rows = torch.arange(batch.size, device=clean_logits.device)
                correct += float((clean_logits[rows, batch.answer] > clean_logits[rows, batch.wrong]).sum())
        self.baseline = Baseline(clean_sum / self.n, corrupted_sum / self.n, correct / self.n, self.n)
        for label, value in (("clean", self.baseline.clean), ("corrupted", self.baseline.corrupted)):
            if not math.isfinite(value):
                raise MetricError(f"the {label} metric is {value} on the {split} prompts; check the task's answers")
        if abs(self.baseline.clean - self.baseline.corrupted) < 1e-6:
            raise MetricError(
                f"clean and corrupted metric are equal ({self.baseline.clean:.4g}) on the {split} prompts: "
                "the corruption does not change the behaviour, so faithfulness is undefined"
            )
        self.forward_passes = 2 * len(self.batches)

    @torch.no_grad()
    def metric(self, circuit: Mask) -> float:
        """Mean metric with every edge outside ``circuit`` patched."""
        removed = (~circuit).to(self.adapter.dtype)
        total = 0.0
        for batch, senders in zip(self.batches, self._corrupted):
            logits = patched_logits(self.adapter, self.graph, batch.clean, senders, removed, batch.last)
            total += float(self.task.metric(logits, batch).sum())
        self.forward_passes += len(self.batches)
        value = total / self.n
        if not math.isfinite(value):
            raise MetricError(f"the metric of a circuit is {value}")
        return value

    def faithfulness(self, circuit: Mask) -> float:
        """(m(C) − m(∅)) / (m(full) − m(∅)) for ``circuit``."""
        b = self.baseline
        return (self.metric(circuit) - b.corrupted) / (b.clean - b.corrupted)


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
            mask = prune(graph, top_edges(graph, scores, n))
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
    """Faithfulness of the top-k % edges (pruned) for each k in ``percents``, exactly, by patching."""
    graph = evaluator.graph
    points = []
    for percent in percents:
        n = max(1, round(graph.n_edges * percent / 100))
        circuit = prune(graph, top_edges(graph, scores, n))
        points.append((percent, n, int(circuit.sum()), evaluator.faithfulness(circuit)))
        if progress:
            progress(1)
    xs = [0.0] + [p / 100 for p, *_ in points]
    fs = [0.0] + [f for *_, f in points]
    cpr = sum((xs[i + 1] - xs[i]) * (fs[i] + fs[i + 1]) / 2 for i in range(len(xs) - 1))
    cmd = sum((xs[i + 1] - xs[i]) * (abs(1 - fs[i]) + abs(1 - fs[i + 1])) / 2 for i in range(len(xs) - 1))
    return Curve(tuple(points), cpr, cmd)
