"""Edge patching: run the model with any set of edges replaced by their corrupted values.

Method (as in EAP-IG's evaluation, Hanna et al. 2024, and the edge interventions of ACDC,
Conmy et al. 2023): first run the corrupted prompts and record every sender's output. Then run
the clean prompts; as each sender fires, record ``corrupted − current`` for it; as each receiver
reads its input, add ``Σ_s removed[s, r] · (corrupted_s − current_s)`` over the senders computed
before it. A receiver's input is the sum of its senders' outputs, so this replaces exactly the
removed edges' terms by their corrupted values while every kept edge carries the value its sender
has *in this patched run* (which may itself be affected by patches upstream). Everything happens
in one forward pass per batch.

``removed`` is a float ``[senders, receivers]`` weight (1 = patched, 0 = kept; fractions
interpolate, which the tests use to check gradients). A leading batch axis gives each prompt its
own circuit, so several circuits can share one forward pass.
"""

from __future__ import annotations


import torch
from jaxtyping import Float, Int

from discovery.adapter import ModelAdapter
from discovery.graph import EdgeGraph, ReceiverPoint, SenderPoint


def _as_senders(act: torch.Tensor) -> torch.Tensor:
    """A hook's activation as ``[senders, batch, pos, d]``: ``[b, p, heads, d]`` or ``[b, p, d]``."""
    return act.permute(2, 0, 1, 3) if act.dim() == 4 else act.unsqueeze(0)


def sender_buffer(graph: EdgeGraph, batch: int, pos: int, dtype=None, device=None) -> torch.Tensor:
    """A zeroed ``[senders, batch, pos, d_model]`` buffer.

    Senders come first so that any prefix of senders is one contiguous ``[senders, batch·pos·d]``
    matrix: sums over senders are then plain matrix products.
    """
    return torch.zeros(graph.n_senders, batch, pos, graph.shape.d_model, dtype=dtype, device=device)


def record_senders_hooks(adapter: ModelAdapter, graph: EdgeGraph, buffer: torch.Tensor, sign: float,
                         total: torch.Tensor | None = None) -> list:
    """Hooks that add ``sign ×`` each sender's output (detached) into ``buffer`` ``[s, b, p, d]``.

    With ``total`` ``[b, p, d]``, each hook then adds the senders' updated buffer entries to it.
    """

    def make(point: SenderPoint):
        def record(values):
            entries = buffer[point.start : point.stop]
            entries += sign * _as_senders(values.detach())
            if total is not None:
                total.add_(entries.sum(0))

        return record

    return [hook for p in graph.sender_points for hook in adapter.sender_hooks(p.kind, p.layer, make(p))]


@torch.no_grad()
def run_recording_senders(
    adapter: ModelAdapter, graph: EdgeGraph, tokens: Int[torch.Tensor, "batch pos"],
    positions: Int[torch.Tensor, " batch"] | None = None,
) -> tuple[Float[torch.Tensor, "senders batch pos d_model"], torch.Tensor]:
    """One forward pass returning every sender's output and the logits (at ``positions`` if given)."""
    buffer = sender_buffer(graph, *tokens.shape, dtype=adapter.dtype, device=adapter.device)
    with adapter.hooks(record_senders_hooks(adapter, graph, buffer, +1.0)):
        logits = adapter.logits(tokens, positions)
    return buffer, logits


def _removed_slice(removed: torch.Tensor, point: ReceiverPoint) -> torch.Tensor:
    return removed[..., : point.n_senders, point.start : point.stop]


def _mix(upstream: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_s weights[s, r] · upstream[s]`` → ``[batch, pos, r, d]`` (weights may carry a batch axis).

    Args:
        upstream: ``[s, batch, pos, d]``.
        weights: ``[s, r]`` or ``[batch, s, r]``.
    """
    s, b, p, d = upstream.shape
    if weights.dim() == 3:
        return torch.einsum("sbpd,bsr->bprd", upstream, weights)
    mixed = weights.T @ upstream.reshape(s, b * p * d)  # [r, b·p·d]
    return mixed.view(-1, b, p, d).permute(1, 2, 0, 3)


def patch_receivers_hooks(adapter: ModelAdapter, graph: EdgeGraph, diff: torch.Tensor, total: torch.Tensor,
                          removed: torch.Tensor) -> list:
    """Hooks that add the removed edges' ``corrupted − current`` terms to each receiver's input.

    The sum over a receiver's removed edges is computed from whichever side is smaller: the
    senders with a removed edge into the hook point, or those with a kept edge, using
    ``Σ_removed = Σ_all − Σ_kept`` where ``Σ_all`` is the running ``total`` of every sender's
    ``corrupted − current`` so far. Small and nearly full circuits both cost little.

    Args:
        diff: ``[senders, batch, pos, d_model]``, holding ``corrupted − current`` for every sender
            that has fired so far in this pass.
        total: ``[batch, pos, d_model]``, the sum of ``diff`` over the senders fired so far.
        removed: ``[senders, receivers]`` or ``[batch, senders, receivers]`` patch weights.
    """

    def make(point: ReceiverPoint, rows: torch.Tensor, weights: torch.Tensor, from_total: bool):
        def hook(x, hook=None):
            delta = _mix(diff.index_select(0, rows), weights) if len(rows) else 0.0
            if from_total:
                delta = total.unsqueeze(2) - delta
            delta = delta if point.per_head else delta.squeeze(2)
            return x + delta.to(x.dtype) if torch.is_tensor(delta) else x

        return hook

    hooks = []
    for point in graph.receiver_points:
        w = _removed_slice(removed, point).to(diff.dtype)  # every entry here is an edge
        axes = (0, 2) if w.dim() == 3 else (1,)
        rows_removed = torch.nonzero(w.abs().sum(axes)).flatten()
        if len(rows_removed) == 0:  # every edge into this point kept: no hook
            continue
        rows_kept = torch.nonzero((1 - w).abs().sum(axes)).flatten()
        from_total = len(rows_kept) < len(rows_removed)
        rows, weights = (rows_kept, 1 - w) if from_total else (rows_removed, w)
        weights = weights.index_select(w.dim() - 2, rows)
        hooks.append((adapter.receiver_hook(point.kind, point.layer), make(point, rows.to(diff.device), weights, from_total)))
    return hooks


def patched_logits(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted_senders: Float[torch.Tensor, "senders batch pos d_model"],
    removed: torch.Tensor,
    positions: Int[torch.Tensor, " batch"] | None = None,
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Logits of the clean prompts with the ``removed`` edges patched from the corrupted run.

    Args:
        clean: clean token ids.
        corrupted_senders: sender outputs of the corrupted run (from :func:`run_recording_senders`).
        removed: ``[senders, receivers]`` (or per prompt ``[batch, senders, receivers]``) weights,
            1 where the edge is patched. Entries that are not edges are ignored.
        positions: when given, only the logits at these positions, ``[batch, vocab]``.
    """
    removed = removed.to(adapter.device) * graph.allowed.to(adapter.device)
    diff = corrupted_senders.clone()  # becomes corrupted − current as senders fire
    total = torch.zeros_like(diff[0])  # [b, p, d]: Σ over fired senders of corrupted − current
    hooks = record_senders_hooks(adapter, graph, diff, -1.0, total) + patch_receivers_hooks(adapter, graph, diff, total, removed)
    with torch.no_grad(), adapter.hooks(hooks):
        return adapter.logits(clean, positions)

