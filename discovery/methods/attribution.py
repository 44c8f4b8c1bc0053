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

"Corrupted" is whatever the chosen ablation (:mod:`circuitfinder.engine.ablation`) puts in a removed edge:
the corrupted prompt's sender outputs (counterfactual, the default), their mean over the task's
prompts, or zero; ``Δ_s = ablated_s − clean_s`` throughout.

EAP-IG (below) averages the gradient along a path from the ablated to the clean run: on the
inputs (the embedding interpolated) or on the activations (each sender hook point interpolated in
turn). EAP is the one-point case at the clean end. Methods share one signature
``(adapter, graph, task, batch_size, progress, steps, ablation) -> scores [senders, receivers]``
and are registered by name in :data:`circuitfinder.methods.registry.METHODS`.

Node scores (:func:`node_scores`) are the sums of edge scores over each sender's outgoing edges:
a sender reaches the metric only through the residual stream, i.e. through the receivers it
feeds, so ``Σ_r Δ_s · ∂m/∂r = Δ_s · ∂m/∂(output of s)``, exactly: the node's own attribution-patching
score (Nanda 2023; Kramár et al. 2024, "AtP*", arXiv 2403.00745), or with EAP-IG its integrated-
gradients form (Marks et al. 2024, arXiv 2403.19647). A test checks the equality.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch
from jaxtyping import Float

from circuitfinder.engine.ablation import Ablation, make_ablation
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.graph import EdgeGraph, ReceiverPoint, SenderPoint
from circuitfinder.engine.patching import (
    RunningTotal,
    patch_receivers_hooks,
    record_senders_hooks,
    run_recording_senders,
)
from circuitfinder.tasks.base import Task, TaskBatch

if TYPE_CHECKING:
    import pandas as pd

    from circuitfinder.engine.faithfulness import CircuitEvaluator

Scores = Float[torch.Tensor, "senders receivers"]


class AttributionMethod(Protocol):
    def __call__(
        self,
        adapter: ModelAdapter,
        graph: EdgeGraph,
        task: Task,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
        steps: int = 5,
        ablation: str | Ablation = "counterfactual",
    ) -> Scores: ...


def _gradient_hooks(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    diff: torch.Tensor,
    scores: torch.Tensor,
    senders: SenderPoint | None = None,
) -> list:
    """Hooks that, in the backward pass, add ``diff · grad`` for every edge into each receiver.

    With ``senders``, only the edges from that hook point's senders (into receivers after it).
    """

    def make(point: ReceiverPoint):
        start, stop = (0, point.n_senders) if senders is None else (senders.start, senders.stop)

        def accumulate(grad):
            g = (grad.permute(2, 0, 1, 3) if point.per_head else grad.unsqueeze(0)).to(diff.dtype)  # [r, b, p, d]
            upstream = diff[start:stop].reshape(stop - start, -1)  # [s, b·p·d], contiguous
            scores[start:stop, point.start : point.stop] += upstream @ g.reshape(g.shape[0], -1).T

        def hook(x, hook=None):
            if not x.requires_grad:
                return x
            # A fresh node: the hooked tensor may also be the residual stream itself (the MLP's
            # input is the block's mid residual), whose gradient includes paths around the receiver.
            x = x.clone()
            x.register_hook(accumulate)
            return x

        return hook

    points = [p for p in graph.receiver_points if senders is None or p.n_senders >= senders.stop]
    return [(adapter.receiver_hook(p.kind, p.layer), make(p)) for p in points]


def input_hook(adapter: ModelAdapter, point: torch.Tensor | None) -> tuple:
    """Make the embedding a leaf that requires grad, so gradients reach every receiver while the
    weights stay frozen; with ``point`` ``[b, p, d]``, replace the embedding by it as well."""

    def hook(x, hook=None):
        return (x if point is None else point).detach().clone().requires_grad_(True)

    return (adapter.SENDER_INPUT, hook)


def score_matrix(adapter: ModelAdapter, graph: EdgeGraph) -> Scores:
    """The zero ``[senders, receivers]`` matrix scores are summed into: on the model's device, in
    float32 at least (a half-precision model's per-batch products are summed in float32)."""
    dtype = torch.promote_types(adapter.dtype, torch.float32)
    return torch.zeros(graph.n_senders, graph.n_receivers, dtype=dtype, device=adapter.device)


def attribute_batch(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    task: Task,
    batch: TaskBatch,
    scores: torch.Tensor,
    weight: float,
    alphas: tuple[float, ...] = (1.0,),
    ablated: torch.Tensor | None = None,
) -> None:
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


def attribute_circuit_batch(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    task: Task,
    batch: TaskBatch,
    removed: torch.Tensor,
    scores: torch.Tensor,
    weight: float,
    ablated: torch.Tensor,
) -> torch.Tensor:
    """Add one batch's attribution *at a circuit* into ``scores`` (times ``weight``); return the
    batch's metric values in that circuit ``[batch]``.

    The derivative of the exactly patched metric in each edge's patch weight, at the circuit
    whose ``removed`` edges ``[senders, receivers]`` are patched from ``ablated`` (the corrupted
    run by default): ``(ablated_s − current_s) · ∂m/∂(input of r)`` with ``current`` and the
    gradient those of the patched run. At the full circuit (nothing removed) this is EAP. For a
    kept edge it estimates the change in metric when that edge alone is removed; for a removed
    one, minus the change when it alone is restored. One patched forward and one backward.
    """
    removed = removed.to(adapter.device, adapter.dtype) * graph.allowed.to(adapter.device)
    diff = ablated.to(adapter.device, adapter.dtype).clone()  # becomes ablated − current
    total, live = RunningTotal(torch.zeros_like(diff[0])), []
    hooks = [input_hook(adapter, None)] + record_senders_hooks(adapter, graph, diff, -1.0, total, live)
    hooks += patch_receivers_hooks(adapter, graph, diff, total, removed, live)
    hooks += _gradient_hooks(adapter, graph, diff, scores)  # after the patch: the gradient of the patched input
    with torch.enable_grad(), adapter.hooks(hooks):
        metric = task.metric(adapter.logits(batch.clean, batch.last), batch)
        (metric.sum() * weight).backward()
    return metric.detach()


def attribute_circuit(evaluator: "CircuitEvaluator", removed: torch.Tensor) -> tuple[Scores, float]:
    """Attribution at the circuit ``removed`` (:func:`attribute_circuit_batch`), averaged over the
    evaluator's prompts with its ablation, and the circuit's mean metric on them (exact)."""
    adapter, graph = evaluator.adapter, evaluator.graph
    scores = score_matrix(adapter, graph)
    metric = 0.0
    for batch, ablated in evaluator.ablated_batches():
        values = attribute_circuit_batch(
            adapter, graph, evaluator.task, batch, removed, scores, 1.0 / evaluator.n, ablated
        )
        metric += float(values.double().sum()) / evaluator.n
    return (scores * graph.allowed.to(scores.device)).cpu(), metric


def _output_hook(adapter: ModelAdapter, point: SenderPoint, value: torch.Tensor) -> tuple:
    """Replace a sender hook point's output by ``value`` ``[senders, b, p, d]``, as a leaf that
    requires grad (so every receiver after it gets a gradient, and none before it)."""

    def hook(x, hook=None):
        out = value.permute(1, 2, 0, 3) if x.dim() == 4 else value[0]
        return out.to(x.dtype).detach().clone().requires_grad_(True)

    return (adapter.sender_hook(point.kind, point.layer), hook)


def attribute_batch_activations(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    task: Task,
    batch: TaskBatch,
    scores: torch.Tensor,
    weight: float,
    alphas: tuple[float, ...],
    ablated: torch.Tensor | None = None,
) -> None:
    """Add one batch's EAP-IG-activations scores, times ``weight``, into ``scores``.

    For each sender hook point (the input, each layer's attention heads together, each MLP) and
    each α: a forward on the clean prompts with that point's output set to
    ``ablated + α (clean − ablated)`` (upstream clean, downstream recomputed) and a backward that
    adds ``Δ_s · ∂m/∂r / len(alphas)`` for the edges from that point's senders only.
    """
    if ablated is None:
        ablated = run_recording_senders(adapter, graph, batch.corrupted, batch.last)[0]
    clean, _ = run_recording_senders(adapter, graph, batch.clean, batch.last)  # [s, b, p, d]
    diff = ablated.to(adapter.device, adapter.dtype) - clean  # ablated − clean
    del ablated
    for point in graph.sender_points:
        rows = slice(point.start, point.stop)
        for alpha in alphas:
            hooks = [_output_hook(adapter, point, clean[rows] + (1 - alpha) * diff[rows])]
            hooks += _gradient_hooks(adapter, graph, diff, scores, senders=point)
            with torch.enable_grad(), adapter.hooks(hooks):
                metric = task.metric(adapter.logits(batch.clean, batch.last), batch)
                (metric.sum() * weight / len(alphas)).backward()


def _attribute(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    task: Task,
    batch_size: int,
    progress: Callable[[int], None] | None,
    alphas: tuple[float, ...],
    ablation: str | Ablation,
    per_batch=attribute_batch,
    shard: tuple[int, int] = (0, 1),
) -> Scores:
    """The scores summed over the discovery batches; with ``shard = (k, n)`` only over batches
    ``k, k + n, …`` (one worker's share: the shares' sum is the whole, ``methods.pool.ray_scores``)."""
    ablation = make_ablation(ablation, adapter, graph, task, batch_size)
    scores = score_matrix(adapter, graph)
    n = len(task.indices("discovery"))
    k, n_shards = shard
    for i, batch in enumerate(task.batches("discovery", batch_size)):
        if i % n_shards != k:
            continue
        batch = batch.to(adapter.device)
        per_batch(adapter, graph, task, batch, scores, 1.0 / n, alphas, ablated=ablation.senders(batch))
        if progress:
            progress(batch.size)
    return (scores * graph.allowed.to(scores.device)).cpu()


def eap(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    task: Task,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    steps: int = 1,
    ablation: str | Ablation = "counterfactual",
    ig_rule: str = "midpoint",
    shard: tuple[int, int] = (0, 1),
) -> Scores:
    """EAP scores of every edge on the task's discovery prompts: the gradient at the clean run.

    ``steps`` and ``ig_rule`` are ignored (EAP takes one gradient); they are there so every method
    has one signature. ``shard = (k, n)``: only every n-th batch from the k-th (a worker's share).
    """
    return _attribute(adapter, graph, task, batch_size, progress, (1.0,), ablation, shard=shard)


IG_RULES = ("midpoint", "left", "right")


def ig_alphas(steps: int, rule: str = "midpoint") -> tuple[float, ...]:
    """The interpolation points of ``steps`` equal parts of [0, 1] (α = 0 ablated, α = 1 clean).

    ``midpoint``: (k + ½)/m, k = 0 … m−1, this project's default: the midpoint rule of the path
    integral, exact for a linear gradient and never the path's ends. ``left``: k/m, k = 0 … m−1, as
    the published EAP-IG code interpolates the inputs (the fully ablated point in, the clean one
    out). ``right``: k/m, k = 1 … m, as it interpolates activations.
    """
    if steps < 1:
        raise ValueError(f"EAP-IG needs at least one step, got {steps}")
    if rule not in IG_RULES:
        raise ValueError(f"unknown interpolation rule {rule!r}: use one of {', '.join(IG_RULES)}")
    offset = {"midpoint": 0.5, "left": 0.0, "right": 1.0}[rule]
    return tuple((k + offset) / steps for k in range(steps))


def eap_ig(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    task: Task,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    steps: int = 5,
    ablation: str | Ablation = "counterfactual",
    ig_rule: str = "midpoint",
    shard: tuple[int, int] = (0, 1),
) -> Scores:
    """EAP-IG scores (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness", arXiv 2403.17806).

    Integrated gradients on the inputs: the gradient at each receiver is averaged over ``steps``
    forward/backward passes whose embedding moves from the ablated to the clean prompt's, then
    multiplied by the sender's ``ablated − clean`` difference:

        score(s → r) = (ablated_s − clean_s) · (1/m) Σ_k ∂m/∂(input of r) |_{embedding = e_a + α_k (e − e_a)}

    with α_k the points of ``ig_rule`` (:func:`ig_alphas`; midpoints by default). Gradients are
    accumulated into the scores step by step, so memory does not grow with m. Same sign and units
    as EAP.
    """
    return _attribute(adapter, graph, task, batch_size, progress, ig_alphas(steps, ig_rule), ablation, shard=shard)


def eap_ig_activations(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    task: Task,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    steps: int = 5,
    ablation: str | Ablation = "counterfactual",
    ig_rule: str = "midpoint",
    shard: tuple[int, int] = (0, 1),
) -> Scores:
    """EAP-IG on the activations (MIB's "EAP-IG-activations", Mueller et al. 2025, arXiv 2504.13151).

    Instead of the embedding, the output of each sender hook point u (the input; the heads of a
    layer, which share one hook; an MLP) is moved from its ablated to its clean value, one hook
    point at a time, everything upstream clean and everything downstream recomputed, as in
    Marks et al. 2024's integrated-gradients node attribution:

        score(s → r) = (ablated_s − clean_s) · (1/m) Σ_k ∂m/∂(input of r) |_{out_u = a_u + α_k (c_u − a_u)},  s ∈ u

    with α_k the midpoints of m equal steps. Summed over a hook point's outgoing edges this is
    the integrated gradient of the point's output, so it tends to ``m(u ablated) − m(clean)``
    as m grows (completeness; a test checks it).

    The EAP-IG code (hannamw/EAP-IG, ``get_scores_ig_activations``, used by MIB) runs the same
    interpolated passes (α = k/m, k = 1…m) but adds every pass's gradients to every edge and
    divides by (hook points × m); in a pass interpolating u, a receiver at or before u gets a
    zero or truncated gradient (u's output is a constant there), so an edge's score mixes in
    passes unrelated to it. Here an edge takes its gradients only from its own sender's passes.
    Cost: ``(2L + 1) · m`` forward and backward passes per batch; memory does not grow with m.
    """
    return _attribute(
        adapter,
        graph,
        task,
        batch_size,
        progress,
        ig_alphas(steps, ig_rule),
        ablation,
        per_batch=attribute_batch_activations,
        shard=shard,
    )


def node_scores(graph: EdgeGraph, scores: Scores) -> "pd.Series":
    """Score of every sender node (``input``, ``a{l}.h{h}``, ``m{l}``), indexed by name.

    The sum of the node's outgoing edge scores, which equals its attribution-patching score
    ``Δ_node · ∂m/∂(node output)`` (averaged along the same path for EAP-IG): see the module
    docstring. Same sign and units as edge scores.
    """
    import pandas as pd

    values = (scores * graph.allowed.to(scores.device)).sum(1)
    return pd.Series(values.double().cpu().numpy(), index=list(graph.sender_names), name="score")
