"""Edge attribution: a score for every edge from gradients, in a few passes per batch.

EAP (edge attribution patching; Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery", arXiv 2310.10348) estimates the effect of patching edge s → r to
first order:

    score(s → r) = (corrupted_s − clean_s) · ∂m/∂(input of r)

summed over positions and averaged over prompts, from one corrupted forward, one clean forward
and one backward per batch. The receiver gradients come from tensor hooks on each receiver's
input, so all edges into a hook point are scored by one einsum.

Sign and units (pinned by a test): a score is in the metric's units and estimates
``m(that edge patched) − m(clean)`` for the mean metric over the discovery prompts. An edge whose
score is negative supports the behaviour (patching it lowers a logit difference). Circuits rank
edges by ``|score|``.

EAP-IG (below) averages the gradient over embeddings interpolated between the corrupted and the
clean prompt; EAP is its one-point case at the clean end. Methods share one signature
``(adapter, graph, task, batch_size, progress, steps) -> scores [senders, receivers]`` and are
registered by name in :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from jaxtyping import Float

from discovery.adapter import ModelAdapter
from discovery.graph import EdgeGraph, ReceiverPoint
from discovery.patching import record_senders_hooks, sender_buffer
from tasks.base import Task, TaskBatch

Scores = Float[torch.Tensor, "senders receivers"]


class AttributionMethod(Protocol):
    def __call__(self, adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None, steps: int = 5) -> Scores: ...


def _gradient_hooks(adapter: ModelAdapter, graph: EdgeGraph, diff: torch.Tensor, scores: torch.Tensor) -> list:
    """Hooks that, in the backward pass, add ``diff · grad`` for every edge into each receiver."""

    def make(point: ReceiverPoint):
        def accumulate(grad):
            g = (grad.permute(2, 0, 1, 3) if point.per_head else grad.unsqueeze(0)).to(diff.dtype)  # [r, b, p, d]
            upstream = diff[: point.n_senders].reshape(point.n_senders, -1)  # [s, b·p·d], contiguous
            scores[: point.n_senders, point.start : point.stop] += upstream @ g.reshape(g.shape[0], -1).T

        def hook(x, hook=None):
            if not x.requires_grad:
                return x
            # A fresh node: the hooked tensor may also be the residual stream itself (the MLP's
            # input is the block's mid residual), whose gradient includes paths around the receiver.
            x = x.clone()
            x.register_hook(accumulate)
            return x

        return hook

    return [(adapter.receiver_hook(p.kind, p.layer), make(p)) for p in graph.receiver_points]


def input_hook(adapter: ModelAdapter, point: torch.Tensor | None) -> tuple:
    """Make the embedding a leaf that requires grad, so gradients reach every receiver while the
    weights stay frozen; with ``point`` ``[b, p, d]``, replace the embedding by it as well."""

    def hook(x, hook=None):
        return (x if point is None else point).detach().clone().requires_grad_(True)

    return (adapter.SENDER_INPUT, hook)


def attribute_batch(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch: TaskBatch, scores: torch.Tensor,
                    weight: float, alphas: tuple[float, ...] = (1.0,)) -> None:
    """Add one batch's scores, times ``weight``, into ``scores``: Δsender · mean gradient over ``alphas``.

    A corrupted and a clean forward record ``corrupted − clean`` for every sender; then, for each
    α, a forward from the embedding ``corrupted + α (clean − corrupted)`` and a backward add
    ``Δ · ∂m/∂receiver / len(alphas)``. For EAP (α = 1 only) the clean forward is the gradient
    pass itself: three passes per batch.
    """
    diff = sender_buffer(graph, *batch.clean.shape, dtype=adapter.dtype, device=adapter.device)
    with torch.no_grad(), adapter.hooks(record_senders_hooks(adapter, graph, diff, +1.0)):
        adapter.logits(batch.corrupted, batch.last)
    eap_only = alphas == (1.0,)
    if not eap_only:
        corrupted_input = diff[0].clone()  # [b, p, d]
        with torch.no_grad(), adapter.hooks(record_senders_hooks(adapter, graph, diff, -1.0)):
            adapter.logits(batch.clean, batch.last)
        clean_input = corrupted_input - diff[0]
    for alpha in alphas:
        if eap_only:  # the clean run: record its senders (diff is complete before the backward)
            hooks = [input_hook(adapter, None)] + record_senders_hooks(adapter, graph, diff, -1.0)
        else:
            hooks = [input_hook(adapter, corrupted_input + alpha * (clean_input - corrupted_input))]
        hooks += _gradient_hooks(adapter, graph, diff, scores)
        with torch.enable_grad(), adapter.hooks(hooks):
            metric = task.metric(adapter.logits(batch.clean, batch.last), batch)
            (metric.sum() * weight / len(alphas)).backward()


def _attribute(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int,
               progress: Callable[[int], None] | None, alphas: tuple[float, ...]) -> Scores:
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=adapter.dtype, device=adapter.device)
    n = len(task.indices("discovery"))
    for batch in task.batches("discovery", batch_size):
        attribute_batch(adapter, graph, task, batch.to(adapter.device), scores, 1.0 / n, alphas)
        if progress:
            progress(batch.size)
    return (scores * graph.allowed.to(scores.device)).cpu()


def eap(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16,
        progress: Callable[[int], None] | None = None, steps: int = 1) -> Scores:
    """EAP scores of every edge on the task's discovery prompts: the gradient at the clean run.

    ``steps`` is ignored (EAP takes one gradient); it is there so every method has one signature.
    """
    return _attribute(adapter, graph, task, batch_size, progress, alphas=(1.0,))


def ig_alphas(steps: int) -> tuple[float, ...]:
    """Midpoints ``(k + ½) / steps`` of ``steps`` equal parts of [0, 1] (the midpoint rule)."""
    if steps < 1:
        raise ValueError(f"EAP-IG needs at least one step, got {steps}")
    return tuple((k + 0.5) / steps for k in range(steps))


def eap_ig(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16,
           progress: Callable[[int], None] | None = None, steps: int = 5) -> Scores:
    """EAP-IG scores (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness", arXiv 2403.17806).

    Integrated gradients on the inputs: the gradient at each receiver is averaged over ``steps``
    forward/backward passes whose embedding moves from the corrupted to the clean prompt's, then
    multiplied by the sender's ``corrupted − clean`` difference:

        score(s → r) = (corrupted_s − clean_s) · (1/m) Σ_k ∂m/∂(input of r) |_{embedding = e_c + α_k (e − e_c)}

    with α_k the midpoints of m equal steps. Gradients are accumulated into the scores step by
    step, so memory does not grow with m. Same sign and units as EAP.
    """
    return _attribute(adapter, graph, task, batch_size, progress, alphas=ig_alphas(steps))


@dataclass(frozen=True)
class Method:
    """A registered attribution method: its function, its cost, and a line for the help text."""

    score: AttributionMethod
    forwards_per_batch: Callable[[int], int]  # steps -> forward passes per batch (each but one no-grad also has a backward)
    description: str


METHODS: dict[str, Method] = {
    "eap": Method(eap, lambda steps: 2, "EAP (Syed et al. 2023): gradient at the clean run"),
    "eap-ig": Method(eap_ig, lambda steps: 2 + steps, "EAP-IG on inputs (Hanna et al. 2024): gradient averaged over --ig-steps"),
}
