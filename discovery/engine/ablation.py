"""Ablations: the value a removed edge carries instead of its sender's clean output.

Patching (:mod:`circuitfinder.engine.patching`) gives a removed edge s → r the value of sender s in an
*ablated* sender buffer ``[senders, batch, pos, d_model]``; attribution scores estimate the
effect of that same replacement. An ablation is a way to build the buffer for a batch:

* ``counterfactual`` (the default): each sender's output in the run on the batch's corrupted
  prompts, the interchange intervention of ACDC (Conmy et al. 2023) and EAP-IG (Hanna et al.
  2024).
* ``mean``: each sender's output averaged over the clean runs of the task's *discovery* prompts,
  position by position ("mean-positional" in the EAP-IG code and the MIB circuit track, Mueller
  et al. 2025; the per-position mean ablation of Wang et al. 2022's IOI study). At position p the
  mean is over the discovery prompts that have a real token at p, so right-padding never enters
  a mean; a position that no discovery prompt reaches (a longer held-out prompt) takes the mean
  over every real position of every discovery prompt.
* ``zero``: every sender's output is zero. Constant terms of the residual stream that belong to
  no sender stay, e.g. GPT-2's attention output bias (added after the heads' outputs are summed).
  Integrated gradients from a zero embedding converge slowly: near 0, a LayerNorm or RMSNorm
  input is scaled by about 1/√eps, so the integrand has a sharp peak at the ablated end of the
  path (on the tiny test models EAP-IG on inputs is far from complete even at 64 steps).

Only the counterfactual buffer is the record of a real run of the model: a node that reads
nothing but ablated values outputs its corrupted-run value exactly. Mean and zero values are
not what any node computes from ablated inputs, which matters for pruning
(:func:`circuitfinder.engine.masks.prune`'s ``ablation_is_run``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float

from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import run_recording_senders
from circuitfinder.tasks.base import Task, TaskBatch

Buffer = Float[torch.Tensor, "senders batch pos d_model"]


@dataclass(frozen=True)
class Ablation:
    """A named way to build the ablated sender buffer of a batch (on the model's device)."""

    kind: str
    senders: Callable[[TaskBatch], Buffer]

    @property
    def is_run(self) -> bool:
        """Whether the ablated values are one real run of the model (counterfactual only)."""
        return self.kind == "counterfactual"


def counterfactual(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16) -> Ablation:
    """Sender outputs of the run on the batch's corrupted prompts (one forward pass per batch)."""

    def senders(batch: TaskBatch) -> Buffer:
        return run_recording_senders(adapter, graph, batch.corrupted.to(adapter.device), batch.last.to(adapter.device))[
            0
        ]

    return Ablation("counterfactual", senders)


@torch.no_grad()
def sender_means(
    adapter: ModelAdapter, graph: EdgeGraph, task: Task, split: str = "discovery", batch_size: int = 16
) -> Float[torch.Tensor, "senders pos d_model"]:
    """Each sender's clean output averaged per position over the split's prompts that reach it.

    Positions no prompt of the split reaches take the mean over all real positions (see the
    module docstring). The result covers every position of the task's token tensor.
    """
    width = task.clean.shape[1]
    sums = torch.zeros(graph.n_senders, width, graph.shape.d_model, dtype=torch.float64, device=adapter.device)
    counts = torch.zeros(width, dtype=torch.float64, device=adapter.device)
    for batch in task.batches(split, batch_size):
        batch = batch.to(adapter.device)
        senders, _ = run_recording_senders(adapter, graph, batch.clean, batch.last)  # [s, b, p, d]
        p = batch.clean.shape[1]
        real = (torch.arange(p, device=adapter.device)[None, :] <= batch.last[:, None]).double()  # [b, p]
        sums[:, :p] += torch.einsum("sbpd,bp->spd", senders.double(), real)
        counts[:p] += real.sum(0)
    if not counts.any():
        raise ValueError(f"task {task.name!r} has no {split} prompts to average over")
    pooled = sums.sum(1) / counts.sum()  # [s, d]
    means = torch.where(counts[None, :, None] > 0, sums / counts.clamp(min=1)[None, :, None], pooled[:, None, :])
    return means.to(adapter.dtype)


def mean(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16) -> Ablation:
    """The per-position mean over the discovery prompts' clean runs (computed once, here)."""
    means = sender_means(adapter, graph, task, "discovery", batch_size)

    def senders(batch: TaskBatch) -> Buffer:
        b, p = batch.clean.shape
        return means[:, :p].unsqueeze(1).expand(-1, b, -1, -1)  # a view: no memory per batch

    return Ablation("mean", senders)


def zero(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16) -> Ablation:
    """Every sender's output zero."""

    def senders(batch: TaskBatch) -> Buffer:
        b, p = batch.clean.shape
        return torch.zeros((), dtype=adapter.dtype, device=adapter.device).expand(
            graph.n_senders, b, p, graph.shape.d_model
        )

    return Ablation("zero", senders)


ABLATIONS: dict[str, Callable[[ModelAdapter, EdgeGraph, Task, int], Ablation]] = {
    "counterfactual": counterfactual,
    "mean": mean,
    "zero": zero,
}


def make_ablation(
    ablation: str | Ablation, adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16
) -> Ablation:
    """The ablation named ``ablation`` for this task (an :class:`Ablation` is returned as is)."""
    if isinstance(ablation, Ablation):
        return ablation
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}: use one of {', '.join(ABLATIONS)}")
    return ABLATIONS[ablation](adapter, graph, task, batch_size)
