"""Many circuits scored on one fixed set of prompts, several circuits per forward pass.

Iterative searches (ACDC, greedy pruning) ask the same question thousands of times: how far is
the model with *this* circuit from the clean model, on these prompts? :class:`CircuitScorer`
runs the corrupted prompts once (their sender outputs) and the clean prompts once (their logits
and metric), and then answers for a stack of circuits in one pass per ``max_rows // prompts``
circuits (``stacked_patched_logits``): the layers before the first receiver where the stacked
circuits differ run once, and the batch is repeated per circuit from there on. The circuits of
an ACDC chain differ in the edges into one receiver, so most of the model runs once per stack.

Distances from the clean run, averaged over the prompts:

* ``kl``: KL(clean ‖ circuit) of the next-token distribution at the read position (ACDC's default,
  Conmy et al. 2023);
* ``task``: |m̄(circuit) − m̄(clean)| for the task's metric m.

The computation for a circuit depends only on the circuits that share its forward pass, so a
caller that always evaluates the same stacks gets bit-identical numbers wherever they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import run_recording_senders, stack_split, stacked_patched_logits
from circuitfinder.tasks.base import Metric, TaskBatch

DISTANCES = ("kl", "task")


@dataclass(frozen=True)
class Scores:
    """Per circuit: the mean task metric and the distance from the clean run."""

    metric: torch.Tensor  # [k]
    distance: torch.Tensor  # [k]


class CircuitScorer:
    """Mean metric and distance from the clean run of stacks of circuits, on fixed prompts.

    Args:
        batches: the prompts (each a :class:`TaskBatch`).
        metric: the task's per-prompt metric.
        distance: ``"kl"`` or ``"task"``.
        max_rows: sequences per forward pass after the batch is repeated; circuits are packed
            ``max_rows // batch size`` at a time (at least one).
        memory_budget: bytes allowed for the circuits' own copies of the sender buffer in one
            pass (fewer circuits go together when they part early in the model).
    """

    def __init__(self, adapter: ModelAdapter, graph: EdgeGraph, batches: list[TaskBatch], metric: Metric,
                 distance: str = "kl", max_rows: int = 32, memory_budget: int = 2**30):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}: use one of {', '.join(DISTANCES)}")
        self.adapter, self.graph, self.metric_fn, self.distance = adapter, graph, metric, distance
        self.batches = [b.to(adapter.device) for b in batches]
        self.n = sum(b.size for b in self.batches)
        self.max_rows, self.memory_budget = max_rows, memory_budget
        self.forward_passes = 0
        self._corrupted, self._clean_logprobs = [], []
        clean_sum = 0.0
        with torch.no_grad():
            for batch in self.batches:
                senders, _ = run_recording_senders(adapter, graph, batch.corrupted, batch.last)
                self._corrupted.append(senders)
                clean = adapter.logits(batch.clean, batch.last).double()
                self._clean_logprobs.append(F.log_softmax(clean, -1))
                clean_sum += float(metric(clean, batch).sum())
        self.clean_metric = clean_sum / self.n
        self.forward_passes += 2 * len(self.batches)

    def _group(self, removed: torch.Tensor, senders: torch.Tensor) -> int:
        """How many of the stacked circuits ``removed`` to take into one pass: all, unless their
        per-circuit sender entries (``stacked_patched_logits``) exceed the memory budget."""
        split = stack_split(self.graph, removed)
        if split is None:
            return removed.shape[0]
        per_circuit = (self.graph.n_senders - split[1]) * senders[0].numel() * senders.element_size()
        return max(1, min(removed.shape[0], self.memory_budget // max(per_circuit, 1)))

    @torch.no_grad()
    def score(self, circuits: torch.Tensor) -> Scores:
        """Scores of ``circuits`` (bool ``[k, senders, receivers]``, True = kept edge)."""
        k = circuits.shape[0]
        metric_sum = torch.zeros(k, dtype=torch.float64)
        kl_sum = torch.zeros(k, dtype=torch.float64)
        removed = (~circuits.bool()).to(self.adapter.dtype)
        for batch, senders, clean_lp in zip(self.batches, self._corrupted, self._clean_logprobs):
            per_pass = max(1, self.max_rows // batch.size)
            start = 0
            while start < k:
                g = self._group(removed[start : start + per_pass], senders)
                rows = batch.repeat(g)
                logits = stacked_patched_logits(
                    self.adapter, self.graph, batch.clean, senders, removed[start : start + g], batch.last
                ).double()
                self.forward_passes += 1
                metric_sum[start : start + g] += self.metric_fn(logits, rows).view(g, batch.size).sum(1).cpu()
                if self.distance == "kl":
                    lp = F.log_softmax(logits, -1)
                    kl = (clean_lp.exp().repeat(g, 1) * (clean_lp.repeat(g, 1) - lp)).sum(-1)
                    kl_sum[start : start + g] += kl.view(g, batch.size).sum(1).cpu()
                start += g
        metric = metric_sum / self.n
        distance = kl_sum / self.n if self.distance == "kl" else (metric - self.clean_metric).abs()
        if not all(math.isfinite(v) for v in distance.tolist()):
            raise ValueError("a circuit's metric is not finite (NaN or infinite logits)")
        return Scores(metric, distance)
