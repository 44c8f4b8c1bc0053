"""The one circuit evaluator: exact metric, faithfulness and distance from the clean run, by patching.

The faithfulness of a circuit C is (m(C) − m(∅)) / (m(full) − m(∅)), where m is the task metric
averaged over the prompts, m(C) is measured with every edge outside C ablated (patched from the
chosen ablation's sender values, :mod:`circuitfinder.engine.ablation`), m(full) is the clean run and m(∅) the
run with every edge ablated: under the default counterfactual ablation that is exactly the
corrupted run. The empty circuit scores exactly 0 and the full circuit exactly 1. This is the
normalised faithfulness of Hanna et al. 2024 and of the MIB circuit track (Mueller et al. 2025).

Searches (ACDC, minimisation) ask the same evaluator thousands of times how far a circuit is
from the clean run, on their prompts (``limit``): ``distance`` is ``task``, |m̄(C) − m̄(clean)|,
or ``kl``, KL(clean ‖ C) of the next-token distribution at the read position (ACDC's default,
Conmy et al. 2023).

:class:`CircuitEvaluator` builds the ablated sender values of each batch once, and then costs
one forward pass per batch for each circuit evaluated. Several circuits share a pass
(``stacked_patched_logits``): the layers before the first receiver where they differ run once,
and the batch is repeated per circuit from there on. One memory rule decides how many: at most
``max_rows`` sequences per pass, and the circuits' own copies of the sender buffer (from the
layer where they part) within ``memory_budget``. A circuit's numbers depend only on the circuits
that share its pass, so a caller that evaluates the same stacks gets bit-identical numbers
wherever it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from circuitfinder.engine.ablation import Ablation, make_ablation
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import Mask, prune, top_edges
from circuitfinder.engine.patching import PassRecord, patched_logits, stack_split, stacked_patched_logits
from circuitfinder.errors import UserError
from circuitfinder.tasks.base import Task, TaskBatch


class MetricError(UserError, ValueError):
    """A metric that makes faithfulness meaningless (NaN, or clean equal to corrupted)."""


@dataclass(frozen=True)
class Baseline:
    """Mean metric of the clean run and of the fully ablated run (m(∅)) on a split, and clean accuracy.

    ``corrupted`` is m(∅): the corrupted run under counterfactual ablation, otherwise the clean
    prompts with every edge mean- or zero-ablated.
    """

    clean: float
    corrupted: float
    accuracy: float | None  # fraction of prompts whose answer outscores the wrong answer (clean run); None
    # for a task whose answers are not outputs to choose between (Task.ranks_answers)
    n_prompts: int

    def faithfulness(self, metric: float) -> float:
        """(m(C) − m(∅)) / (m(full) − m(∅)) for a circuit's mean metric m(C)."""
        return (metric - self.corrupted) / (self.clean - self.corrupted)

    def __str__(self) -> str:
        accuracy = "" if self.accuracy is None else f", clean accuracy {self.accuracy:.0%}"
        return f"clean {self.clean:.3f}, corrupted {self.corrupted:.3f}{accuracy}"


DISTANCES = ("kl", "task", "prompt")


@dataclass(frozen=True)
class Scores:
    """Per circuit of a stack: the mean task metric and the distance from the clean run."""

    metric: torch.Tensor  # [k]
    distance: torch.Tensor  # [k]


class CircuitEvaluator:
    """Exact metric, faithfulness and distance of circuits on one split of a task, under one ablation.

    Args:
        split: ``"discovery"`` or ``"heldout"`` prompts.
        ablation: ``"counterfactual"``, ``"mean"`` or ``"zero"`` (or a built :class:`Ablation`).
        memory_budget: bytes the circuits' own copies of the sender buffer may take in one pass.
        limit: use only the split's first ``limit`` prompts (a search's prompts).
        distance: what :meth:`evaluate` reports as the distance from the clean run: ``"task"``,
            ``|mean metric − clean mean|``; ``"prompt"``, the mean over prompts of
            ``|metric_i − clean_i|`` (changes on different prompts cannot cancel); ``"kl"``, the
            mean KL(clean ‖ circuit) of the next-token distributions.
        max_rows: sequences per forward pass once the batch is repeated per circuit.
        reuse: how many recent passes per batch to keep (:class:`~circuitfinder.engine.patching.PassRecord`,
            within ``memory_budget``): a circuit evaluated alone then runs only the blocks from the
            first receiver where it differs from the closest of them. The numbers are the same, bit
            for bit; an iterative search, whose trials differ from the current circuit in a few
            late receivers, skips most of each pass.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        graph: EdgeGraph,
        task: Task,
        split: str = "heldout",
        batch_size: int = 16,
        ablation: str | Ablation = "counterfactual",
        memory_budget: int = 1 << 30,
        limit: int | None = None,
        distance: str = "task",
        max_rows: int = 256,
        reuse: int = 0,
        shard: tuple[int, int] | None = None,
    ):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}: use one of {', '.join(DISTANCES)}")
        self.adapter, self.graph, self.task = adapter, graph, task
        self.memory_budget, self.distance, self.max_rows = memory_budget, distance, max_rows
        batches = list(task.batches(split, batch_size, limit=limit))
        if shard is not None:  # (k, n): batches k, k + n, … (a Ray worker's share)
            batches = batches[shard[0] :: shard[1]]
        self.batches = [b.to(adapter.device) for b in batches]
        if not self.batches:
            raise MetricError(f"task {task.name!r} has no {split} prompts")
        self.n = sum(b.size for b in self.batches)
        self.ablation = make_ablation(ablation, adapter, graph, task, batch_size)
        self._ablated, self._clean_logprobs, self._clean_metrics = [], [], []
        clean_sum = correct = 0.0
        with torch.no_grad():
            for batch in self.batches:
                self._ablated.append(self.ablation.senders(batch))
                clean_logits = adapter.logits(batch.clean, batch.last)
                clean_values = task.metric(clean_logits, batch).double().cpu()
                self._clean_metrics.append(clean_values)
                clean_sum += float(clean_values.sum())
                rows = torch.arange(batch.size, device=clean_logits.device)
                correct += float((clean_logits[rows, batch.answer] > clean_logits[rows, batch.wrong]).sum())
                if distance == "kl":
                    self._clean_logprobs.append(F.log_softmax(clean_logits.double(), -1))
        self.forward_passes = len(self.batches) * (1 + self.ablation.is_run)
        record_bytes = sum(a.numel() * a.element_size() for a in self._ablated)
        self.reuse = min(reuse, self.memory_budget // max(record_bytes, 1))
        self._records: list[list[PassRecord]] = [[] for _ in self.batches]  # most recently used last
        self.blocks_run = 0  # blocks computed by passes of one circuit (the rest were reused)
        self.clean_metric = clean_sum / self.n
        if not math.isfinite(self.clean_metric):
            raise MetricError(
                f"the clean metric is {self.clean_metric} on the {split} prompts; check the task's answers"
            )
        empty = float(self.evaluate(torch.zeros_like(graph.allowed)[None]).metric[0])  # raises when not finite
        self.baseline = Baseline(self.clean_metric, empty, correct / self.n if task.ranks_answers else None, self.n)
        if abs(self.baseline.clean - self.baseline.corrupted) < 1e-6:
            raise MetricError(
                f"the clean metric equals the metric with every edge ablated ({self.ablation.kind}; "
                f"{self.baseline.clean:.4g}) on the {split} prompts: the ablation does not change the "
                "behaviour, so faithfulness is undefined"
            )

    def ablated_batches(self) -> Iterator[tuple[TaskBatch, torch.Tensor]]:
        """Each batch of prompts with its ablated senders' buffer ``[senders, batch, pos, d]``."""
        return zip(self.batches, self._ablated)

    def prune(self, mask: Mask) -> Mask:
        """:func:`circuitfinder.engine.masks.prune` with the rule this evaluator's ablation allows."""
        return prune(self.graph, mask, ablation_is_run=self.ablation.is_run)

    def circuits_per_pass(self, removed: torch.Tensor, senders: torch.Tensor, batch_size: int) -> int:
        """How many of the stacked circuits ``removed`` share one forward pass.

        One on a CPU when earlier passes are kept (``reuse``): each circuit then runs only the
        blocks after the first receiver where it differs from the closest kept pass, while a
        stack runs every block after the first receiver where *any two* differ, once per
        circuit; on a CPU a pass costs its arithmetic, so fewer blocks win (measured on SmolLM2:
        0.27 s per single-edge necessity test alone against 0.67 s stacked by 32). Otherwise at
        most ``max_rows // batch_size`` (at least one), and no more than fit their own copies of
        the sender buffer, from the first layer where they differ, in ``memory_budget``."""
        if self.reuse and self.adapter.device.type == "cpu":
            return 1
        take = max(1, min(removed.shape[0], self.max_rows // batch_size))
        split = stack_split(self.graph, removed[:take])
        if split is None:
            return take
        per_circuit = (self.graph.n_senders - split[1]) * senders[0].numel() * senders.element_size()
        return max(1, min(take, self.memory_budget // max(per_circuit, 1)))

    @torch.no_grad()
    def evaluate(self, circuits: torch.Tensor) -> Scores:
        """Mean metric and distance of each circuit (bool ``[k, senders, receivers]``, True = kept),
        every one patched (the full and the empty circuit too)."""
        k = circuits.shape[0]
        metric_sum = torch.zeros(k, dtype=torch.float64, device="cpu")
        distance_sum = torch.zeros(
            k, dtype=torch.float64, device="cpu"
        )  # Σ KL, or for "prompt" Σ |m_i(C) − m_i(clean)|
        removed = (~circuits.bool()).to(self.adapter.dtype)  # [k, s, r]
        for index, (batch, senders) in enumerate(zip(self.batches, self._ablated)):
            start = 0
            while start < k:
                g = self.circuits_per_pass(removed[start:], senders, batch.size)
                if g == 1:
                    logits = self._alone(index, removed[start])
                else:
                    logits = stacked_patched_logits(
                        self.adapter, self.graph, batch.clean, senders, removed[start : start + g], batch.last
                    )
                logits = logits.double()  # the metric and the sums in float64
                self.forward_passes += g  # one per circuit and batch, as if each had its own pass
                values = self.task.metric(logits, batch.repeat(g)).view(g, batch.size).cpu()
                metric_sum[start : start + g] += values.sum(1)
                if self.distance == "prompt":
                    distance_sum[start : start + g] += (values - self._clean_metrics[index]).abs().sum(1)
                if self.distance == "kl":
                    clean_lp = self._clean_logprobs[index].repeat(g, 1)
                    kl = (clean_lp.exp() * (clean_lp - F.log_softmax(logits, -1))).sum(-1)
                    distance_sum[start : start + g] += kl.view(g, batch.size).sum(1).cpu()
                start += g
        metric = metric_sum / self.n
        bad = [v for v in metric.tolist() if not math.isfinite(v)]
        if bad:
            raise MetricError(
                f"a circuit's metric is {bad[0]} on these prompts (NaN or infinite logits); check the task's answers"
            )
        distance = (metric - self.clean_metric).abs() if self.distance == "task" else distance_sum / self.n
        return Scores(metric, distance)

    def _alone(self, index: int, removed: torch.Tensor) -> torch.Tensor:
        """Logits of one circuit on batch ``index``, from the closest kept pass when ``reuse``."""
        batch, senders = self.batches[index], self._ablated[index]
        if not self.reuse:
            self.blocks_run += self.graph.shape.n_layers
            return patched_logits(self.adapter, self.graph, batch.clean, senders, removed, batch.last)
        removed = removed.to(self.adapter.device) * self.graph.allowed.to(self.adapter.device)
        records = self._records[index]
        shared, base = max(
            ((r.shared_layers(self.graph, removed), r) for r in records), key=lambda x: x[0], default=(0, None)
        )
        logits, record = patched_logits(
            self.adapter, self.graph, batch.clean, senders, removed, batch.last, resume=base, record=True
        )
        self.blocks_run += self.graph.shape.n_layers - shared
        if base is not None:
            records.remove(base)
            records.append(base)
        records.append(record)
        del records[: -self.reuse]
        return logits

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
        chunk = max(1, self.max_rows // max(b.size for b in self.batches))  # progress is reported per chunk
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            means = self.evaluate(torch.stack([circuits[i] & allowed for i in part])).metric
            for i, mean in zip(part, means.tolist()):
                values[i] = mean
            if progress:
                progress(len(part))
        return values

    def metric(self, circuit: Mask) -> float:
        """Mean metric with every edge outside ``circuit`` ablated."""
        return self.metrics([circuit])[0]

    def faithfulnesses(self, circuits: Sequence[Mask], progress: Callable[[int], None] | None = None) -> list[float]:
        """(m(C) − m(∅)) / (m(full) − m(∅)) for each circuit (evaluated several per pass)."""
        return [self.baseline.faithfulness(m) for m in self.metrics(circuits, progress)]

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


def faithfulness_curve(
    evaluator: CircuitEvaluator,
    scores: torch.Tensor,
    percents: tuple[float, ...] = MIB_PERCENTS,
    progress: Callable[[int], None] | None = None,
    metrics: Callable[[list[Mask]], list[float]] | None = None,
) -> Curve:
    """Faithfulness of the top-k % edges (pruned) for each k in ``percents``, exactly, by patching.

    The circuits are evaluated together, several per forward pass (:meth:`CircuitEvaluator.metrics`),
    or by ``metrics`` when given: the circuits' mean metrics on the evaluator's prompts computed
    elsewhere (``circuitfinder.methods.pool.ray_metrics``, split by prompt batches over Ray).
    """
    graph = evaluator.graph
    sizes = [max(1, round(graph.n_edges * percent / 100)) for percent in percents]
    circuits = [evaluator.prune(top_edges(graph, scores, n)) for n in sizes]
    if metrics is None:
        values = evaluator.faithfulnesses(circuits, progress)
    else:
        values = [evaluator.baseline.faithfulness(m) for m in metrics(circuits)]
        if progress:
            progress(len(circuits))
    points = [(p, n, int(c.sum()), f) for p, n, c, f in zip(percents, sizes, circuits, values)]
    xs = [0.0] + [p / 100 for p, *_ in points]
    fs = [0.0] + [f for *_, f in points]
    cpr = sum((xs[i + 1] - xs[i]) * (fs[i] + fs[i + 1]) / 2 for i in range(len(xs) - 1))
    cmd = sum((xs[i + 1] - xs[i]) * (abs(1 - fs[i]) + abs(1 - fs[i + 1])) / 2 for i in range(len(xs) - 1))
    return Curve(tuple(points), cpr, cmd)
