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

"Corrupted" is whatever the chosen ablation (:mod:`discovery.ablation`) puts in a removed edge:
the corrupted prompt's sender outputs (counterfactual, the default), their mean over the task's
prompts, or zero; ``Δ_s = ablated_s − clean_s`` throughout.

EAP-IG (below) averages the gradient over embeddings interpolated between the ablated and the
clean run's; EAP is its one-point case at the clean end. Methods share one signature
``(adapter, graph, task, batch_size, progress, steps, ablation) -> scores [senders, receivers]``
and are registered by name in :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from jaxtyping import Float

from discovery.ablation import Ablation, make_ablation
from discovery.adapter import ModelAdapter
from discovery.graph import EdgeGraph, ReceiverPoint
from discovery.patching import record_senders_hooks, run_recording_senders
from tasks.base import Task, TaskBatch

Scores = Float[torch.Tensor, "senders receivers"]


class AttributionMethod(Protocol):
    def __call__(self, adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None, steps: int = 5,
                 ablation: str | Ablation = "counterfactual") -> Scores: ...


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
                    weight: float, alphas: tuple[float, ...] = (1.0,), ablated: torch.Tensor | None = None) -> None:
    """Add one batch's scores, times ``weight``, into ``scores``: Δsender · mean gradient over ``alphas``.

    ``ablated`` is the batch's ablated sender buffer ``[senders, batch, pos, d]`` (by default the
    corrupted prompts' run). A clean forward records ``Δ = ablated − clean`` for every sender;
    then, for each α, a forward from the embedding ``ablated + α (clean − ablated)`` and a
    backward add ``Δ · ∂m/∂receiver / len(alphas)``. For EAP (α = 1 only) the clean forward is
    the gradient pass itself.
    """
    if ablated is None:
        ablated = run_recording_senders(adapter, graph, batch.corrupted, batch.last)[0]
    diff = ablated.to(adapter.device, adapter.dtype).clone()  # becomes ablated − clean
    eap_only = alphas == (1.0,)
    if not eap_only:
        ablated_input = diff[0].clone()  # [b, p, d]
        with torch.no_grad(), adapter.hooks(record_senders_hooks(adapter, graph, diff, -1.0)):
            adapter.logits(batch.clean, batch.last)
        clean_input = ablated_input - diff[0]
    for alpha in alphas:
        if eap_only:  # the clean run: record its senders (diff is complete before the backward)
            hooks = [input_hook(adapter, None)] + record_senders_hooks(adapter, graph, diff, -1.0)
        else:
            hooks = [input_hook(adapter, ablated_input + alpha * (clean_input - ablated_input))]
        hooks += _gradient_hooks(adapter, graph, diff, scores)
        with torch.enable_grad(), adapter.hooks(hooks):
            metric = task.metric(adapter.logits(batch.clean, batch.last), batch)
            (metric.sum() * weight / len(alphas)).backward()


def _attribute(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int,
               progress: Callable[[int], None] | None, alphas: tuple[float, ...], ablation: str | Ablation) -> Scores:
    ablation = make_ablation(ablation, adapter, graph, task, batch_size)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=adapter.dtype, device=adapter.device)
    n = len(task.indices("discovery"))
    for batch in task.batches("discovery", batch_size):
        batch = batch.to(adapter.device)
        attribute_batch(adapter, graph, task, batch, scores, 1.0 / n, alphas, ablated=ablation.senders(batch))
        if progress:
            progress(batch.size)
    return (scores * graph.allowed.to(scores.device)).cpu()


def eap(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16,
        progress: Callable[[int], None] | None = None, steps: int = 1,
        ablation: str | Ablation = "counterfactual") -> Scores:
    """EAP scores of every edge on the task's discovery prompts: the gradient at the clean run.

    ``steps`` is ignored (EAP takes one gradient); it is there so every method has one signature.
    """
    return _attribute(adapter, graph, task, batch_size, progress, (1.0,), ablation)


def ig_alphas(steps: int) -> tuple[float, ...]:
    """Midpoints ``(k + ½) / steps`` of ``steps`` equal parts of [0, 1] (the midpoint rule)."""
    if steps < 1:
        raise ValueError(f"EAP-IG needs at least one step, got {steps}")
    return tuple((k + 0.5) / steps for k in range(steps))


def eap_ig(adapter: ModelAdapter, graph: EdgeGraph, task: Task, batch_size: int = 16,
           progress: Callable[[int], None] | None = None, steps: int = 5,
           ablation: str | Ablation = "counterfactual") -> Scores:
    """EAP-IG scores (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness", arXiv 2403.17806).

    Integrated gradients on the inputs: the gradient at each receiver is averaged over ``steps``
    forward/backward passes whose embedding moves from the ablated to the clean prompt's, then
    multiplied by the sender's ``ablated − clean`` difference:

        score(s → r) = (ablated_s − clean_s) · (1/m) Σ_k ∂m/∂(input of r) |_{embedding = e_a + α_k (e − e_a)}

    with α_k the midpoints of m equal steps. Gradients are accumulated into the scores step by
    step, so memory does not grow with m. Same sign and units as EAP.
    """
    return _attribute(adapter, graph, task, batch_size, progress, ig_alphas(steps), ablation)


@dataclass(frozen=True)
class Method:
    """A registered attribution method: its function, its cost, and a line for the help text."""

    score: AttributionMethod
    # (steps, graph) -> forward passes per batch under counterfactual ablation, the corrupted and
    # clean no-grad passes included (every other pass also has a backward)
    forwards_per_batch: Callable[[int, EdgeGraph], int]
    description: str


METHODS: dict[str, Method] = {
    "eap": Method(eap, lambda steps, graph: 2, "EAP (Syed et al. 2023): gradient at the clean run"),
    "eap-ig": Method(eap_ig, lambda steps, graph: 2 + steps,
                     "EAP-IG on inputs (Hanna et al. 2024): gradient averaged over --ig-steps"),
}
