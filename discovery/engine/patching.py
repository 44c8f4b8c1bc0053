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
interpolate, which the tests use to check gradients). A leading axis of size k gives each of k
equal consecutive blocks of the batch its own circuit (k = batch: one per prompt), so several
circuits share one forward pass: repeat the prompts k times (``TaskBatch.repeat``).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from jaxtyping import Float, Int

from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.graph import EdgeGraph, ReceiverPoint, SenderPoint


def _as_senders(act: torch.Tensor) -> torch.Tensor:
    """A hook's activation as ``[senders, batch, pos, d]``: ``[b, p, heads, d]`` or ``[b, p, d]``."""
    return act.permute(2, 0, 1, 3) if act.dim() == 4 else act.unsqueeze(0)


class SenderDiff:
    """``corrupted − current`` of every sender, ``[senders, batch, pos, d_model]``, held as row
    chunks ``(first row, rows)`` that cover the senders in order.

    A pass resumed from an earlier one (:class:`PassRecord`) borrows the rows of the blocks it
    skips from that pass's record (whole chunks as they are, never written again; the part of a
    chunk that straddles the split is copied, so a borrowed view never keeps more alive than it
    uses) and owns one chunk for the rest, filled as its senders fire. So no pass copies the
    whole ``[senders, …]`` buffer, and the rows a receiver gathers are the same values, in the
    same order, as from one tensor: the sums are bit for bit the same.
    """

    def __init__(self, chunks: list[tuple[int, torch.Tensor]]):
        self.chunks = chunks

    @classmethod
    def resumed(cls, earlier: "SenderDiff | None", shared: int, own: torch.Tensor) -> "SenderDiff":
        """Rows ``[0, shared)`` from ``earlier``, the rest in ``own`` ``[senders − shared, …]``."""
        chunks = []
        for first, rows in earlier.chunks if earlier is not None and shared else []:
            if first >= shared:
                break
            take = min(len(rows), shared - first)
            chunks.append((first, rows if take == len(rows) else rows[:take].clone()))
        return cls(chunks + [(shared, own)])

    def own_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the last (own) chunk, to be written."""
        first, rows = self.chunks[-1]
        if start < first:
            raise RuntimeError(f"sender rows {start}-{stop} belong to a block this pass resumed past")
        return rows[start - first : stop - first]

    def gather(self, rows: torch.Tensor, block: slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` (ascending) of the prompts ``block``: ``[len(rows), b, p, d]``."""
        if len(self.chunks) == 1:
            return self.chunks[0][1][:, block].index_select(0, rows)
        parts = []
        for first, chunk in self.chunks:
            inside = rows[(rows >= first) & (rows < first + len(chunk))]
            if len(inside):
                parts.append(chunk[:, block].index_select(0, inside - first))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class RunningTotal:
    """``Σ (corrupted − current)`` over the senders fired so far in a pass, ``[batch, pos, d_model]``,
    and how many have fired (senders fire in graph order, so always a prefix ``[0, fired)``).

    A receiver sums its removed edges from the smaller side, ``Σ_removed = Σ_{s<n} − Σ_kept`` with
    ``n = point.n_senders`` (:func:`patch_receivers_hooks`), so it needs the total over the senders
    computed *before it*. On sequential blocks that is all that has fired when it reads. On
    parallel blocks the MLP of layer l reads after its own layer's heads have fired, and those
    heads are not its edges: :meth:`before` takes their rows back out of the total.
    """

    def __init__(self, value: torch.Tensor, fired: int = 0):
        self.value, self.fired = value, fired

    def add(self, entries: torch.Tensor, stop: int) -> None:
        """Add the entries ``[senders, b, p, d]`` of the senders ending at index ``stop``."""
        self.value.add_(entries.sum(0))
        self.fired = stop

    def before(
        self, n: int, rows_of: Callable[[torch.Tensor], torch.Tensor], block: slice = slice(None)
    ) -> torch.Tensor:
        """The total over senders ``[0, n)`` for the prompts ``block``; ``rows_of(indices)`` gives
        those senders' entries ``[len(indices), b, p, d]`` for the same prompts."""
        if n > self.fired:
            raise RuntimeError(
                f"a receiver reads senders [0, {n}) but only {self.fired} have fired: the edge graph's order is wrong"
            )
        running = self.value[block]
        if n == self.fired:
            return running
        return running - rows_of(torch.arange(n, self.fired, device=running.device)).sum(0)


def sender_buffer(graph: EdgeGraph, batch: int, pos: int, dtype=None, device=None) -> torch.Tensor:
    """A zeroed ``[senders, batch, pos, d_model]`` buffer.

    Senders come first so that any prefix of senders is one contiguous ``[senders, batch·pos·d]``
    matrix: sums over senders are then plain matrix products.
    """
    return torch.zeros(graph.n_senders, batch, pos, graph.shape.d_model, dtype=dtype, device=device)


def record_senders_hooks(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    buffer: torch.Tensor,
    sign: float,
    total: RunningTotal | None = None,
    live: list | None = None,
) -> list:
    """Hooks that add ``sign ×`` each sender's output (detached) into ``buffer`` ``[s, b, p, d]``.

    With ``total``, each hook then adds the senders' updated buffer entries to it.
    With ``live``, each hook also appends the output itself, still in the autograd graph
    (``[b, p, heads, d]`` or ``[b, p, d]``, one entry per sender point in graph order).
    """

    def make(point: SenderPoint):
        def record(values):
            if live is not None:
                live.append(values)
            entries = buffer[point.start : point.stop]
            entries += sign * _as_senders(values.detach())
            if total is not None:
                total.add(entries, point.stop)

        return record

    return [hook for p in graph.sender_points for hook in adapter.sender_hooks(p.kind, p.layer, make(p))]


@torch.no_grad()
def run_recording_senders(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    tokens: Int[torch.Tensor, "batch pos"],
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
    """``Σ_s weights[s, r] · upstream[s]`` → ``[batch, pos, r, d]``.

    Args:
        upstream: ``[s, batch, pos, d]``.
        weights: ``[s, r]``.
    """
    s, b, p, d = upstream.shape
    mixed = weights.T @ upstream.reshape(s, b * p * d)  # [r, b·p·d]
    return mixed.view(-1, b, p, d).permute(1, 2, 0, 3)


def _plan(w: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """For one circuit's weights ``[s, r]`` into a hook point: the sender rows to sum, their
    weights, and whether to subtract that sum from the running total; None if nothing is patched."""
    rows_removed = torch.nonzero(w.abs().sum(1)).flatten()
    if len(rows_removed) == 0:
        return None
    rows_kept = torch.nonzero((1 - w).abs().sum(1)).flatten()
    from_total = len(rows_kept) < len(rows_removed)
    rows, weights = (rows_kept, 1 - w) if from_total else (rows_removed, w)
    return rows.to(device), weights.index_select(0, rows), from_total


def _blockwise(plans: list, delta: Callable[[tuple, slice], torch.Tensor]) -> Callable:
    """A receiver hook adding ``delta(plan, block)`` to each of ``len(plans)`` equal blocks of the
    batch (a circuit's plan per block, None where it patches nothing; one plan: the whole batch)."""

    def hook(x, hook=None):
        if len(plans) == 1:
            return x + delta(plans[0], slice(None)).to(x.dtype)
        x, size = x.clone(), x.shape[0] // len(plans)
        for j, plan in enumerate(plans):
            if plan is not None:
                block = slice(j * size, (j + 1) * size)
                x[block] += delta(plan, block).to(x.dtype)
        return x

    return hook


class _RemovedSendersGradient(torch.autograd.Function):
    """Zero in the forward pass; in the backward, ``−Σ_r removed[s, r] · ∂m/∂(input of r)`` into
    each sender's output ``s``.

    A patched receiver reads ``x + Σ_s removed[s, r] · (corrupted_s − current_s)`` with
    ``current_s`` taken, detached, from the buffer, so autograd alone would differentiate as if
    every removed edge still carried its sender's value. This term supplies the missing
    ``−removed · current`` derivative without keeping any sender's values for the backward pass.
    """

    @staticmethod
    def forward(ctx, weights, per_head, like, *senders):  # weights [n_senders, r], senders in graph order
        ctx.save_for_backward(weights)
        ctx.per_head, ctx.shapes = per_head, [s.shape for s in senders]
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        g = grad if ctx.per_head else grad.unsqueeze(2)  # [b, p, r, d]
        grads, start = [], 0
        for shape in ctx.shapes:
            n = shape[2] if len(shape) == 4 else 1
            into = -torch.einsum("sr,bprd->bpsd", weights[start : start + n].to(g.dtype), g)
            grads.append(into if len(shape) == 4 else into.squeeze(2))
            start += n
        return (None, None, None, *grads)


def patch_receivers_hooks(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    diff: torch.Tensor,
    total: RunningTotal,
    removed: torch.Tensor,
    live: list | None = None,
) -> list:
    """Hooks that add the removed edges' ``corrupted − current`` terms to each receiver's input.

    The sum over a receiver's removed edges is computed from whichever side is smaller: the
    senders with a removed edge into the hook point, or those with a kept edge, using
    ``Σ_removed = Σ_all − Σ_kept`` where ``Σ_all`` is the running ``total`` of ``corrupted −
    current`` over the senders computed before the receiver (:class:`RunningTotal`). Small and
    nearly full circuits both cost little. With a circuit per block of the batch, each block
    takes its own smaller side.

    Args:
        diff: ``[senders, batch, pos, d_model]`` (a tensor or a :class:`SenderDiff`), holding
            ``corrupted − current`` for every sender that has fired so far in this pass.
        total: the sum of ``diff`` over the senders fired so far (:class:`RunningTotal`).
        removed: ``[senders, receivers]`` or ``[k, senders, receivers]`` patch weights (a circuit
            per block of ``batch / k`` consecutive prompts).
        live: the senders' outputs in the autograd graph, as :func:`record_senders_hooks` appends
            them; with it (one circuit only), the patched run is differentiable exactly, in the
            model's activations and hence in the patch weights (see ``attribute_circuit_batch``).
    """

    def delta(point: ReceiverPoint, plan, rows_slice: slice) -> torch.Tensor:
        rows, weights, from_total = plan
        gather = partial(diffs.gather, block=rows_slice)
        d = _mix(gather(rows), weights) if len(rows) else 0.0
        if from_total:
            d = total.before(point.n_senders, gather, rows_slice).unsqueeze(2) - d
        return d if point.per_head else d.squeeze(2)

    diffs = diff if isinstance(diff, SenderDiff) else SenderDiff([(0, diff)])
    dtype, device = total.value.dtype, total.value.device
    hooks = []
    for point in graph.receiver_points:
        w = _removed_slice(removed, point).to(dtype)  # every entry here is an edge
        plans = [_plan(wj, device) for wj in (w if w.dim() == 3 else [w])]
        if all(plan is None for plan in plans):  # every edge into this point kept: no hook
            continue
        hook = _blockwise(plans, partial(delta, point))
        if live is not None:
            points_before = sum(1 for p in graph.sender_points if p.stop <= point.n_senders)
            hook = _LiveSlice(hook, w, point.per_head, live, points_before)
        hooks.append((adapter.receiver_hook(point.kind, point.layer), hook))
    return hooks


class _LiveSlice:
    """A receiver hook made differentiable: its patch, plus :class:`_RemovedSendersGradient` over
    the first ``points`` live sender outputs (those fired before this receiver)."""

    def __init__(self, hook: Callable, weights: torch.Tensor, per_head: bool, live: list, points: int):
        self.hook, self.weights, self.per_head, self.live, self.points = hook, weights, per_head, live, points

    def __call__(self, x, hook=None):
        senders = self.live[: self.points]
        return self.hook(x) + _RemovedSendersGradient.apply(self.weights, self.per_head, x, *senders)


@dataclass(eq=False)  # records are told apart by identity
class PassRecord:
    """What one patched pass leaves so that a later pass can skip the blocks it shares with it.

    Two circuits whose patch weights agree on every receiver before block ``l`` give blocks
    ``0 … l−1`` the same inputs, hence the same values: a pass of the second can take those
    blocks' outputs, the ``corrupted − current`` entries of their senders and the running total
    from the first pass's record, and compute only blocks ``l`` on (:func:`patched_logits`
    ``resume``). An iterative search (ACDC, group tests) tries circuits that differ from the
    current one only in a few receivers, mostly late ones, so most of each pass is skipped.
    Memory: the rows of the ``[senders, batch, pos, d_model]`` buffer it computed (the rest it
    shares with the pass it resumed from; :class:`SenderDiff`) plus two residual streams per block.
    """

    removed: torch.Tensor  # [senders, receivers] patch weights of the pass (edges only)
    diff: SenderDiff  # [senders, batch, pos, d_model]: corrupted − current at the end of the pass
    totals: list  # totals[l], l ≥ 1: Σ diff over the senders computed before block l (l = n_layers: all)
    outputs: list  # what each block returned

    def shared_layers(self, graph: EdgeGraph, removed: torch.Tensor) -> int:
        """How many leading blocks a pass with patch weights ``removed`` shares with this one:
        the layer of the first receiver whose weights differ (``n_layers`` when none does)."""
        split = stack_split(graph, torch.stack([self.removed, removed.to(self.removed.device)]))
        return graph.shape.n_layers if split is None else split[0]


def patched_logits(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted_senders: Float[torch.Tensor, "senders batch pos d_model"],
    removed: torch.Tensor,
    positions: Int[torch.Tensor, " batch"] | None = None,
    resume: PassRecord | None = None,
    record: bool = False,
):
    """Logits of the clean prompts with the ``removed`` edges patched from the corrupted run.

    Args:
        clean: clean token ids.
        corrupted_senders: sender outputs of the corrupted run (from :func:`run_recording_senders`).
        removed: ``[senders, receivers]`` weights, 1 where the edge is patched, or ``[k, senders,
            receivers]``: one circuit per block of ``batch / k`` consecutive prompts (k = batch:
            one per prompt). Entries that are not edges are ignored.
        positions: when given, only the logits at these positions, ``[batch, vocab]``.
        resume: the record of an earlier pass on the same prompts (one circuit): the blocks it
            shares with this one are not run again (:class:`PassRecord`); the logits are the same,
            bit for bit.
        record: also return this pass's :class:`PassRecord` (one circuit), as ``(logits, record)``.
    """
    if removed.dim() == 3 and clean.shape[0] % removed.shape[0]:
        raise ValueError(f"{removed.shape[0]} circuits do not divide a batch of {clean.shape[0]} prompts")
    removed = removed.to(adapter.device) * graph.allowed.to(adapter.device)
    start = 0 if resume is None else resume.shared_layers(graph, removed)
    shared = next((p.start for p in graph.sender_points if p.layer >= start), graph.n_senders) if start else 0
    # corrupted − current: rows of skipped blocks from the resumed pass, the rest written as senders fire
    diff = SenderDiff.resumed(resume.diff if start else None, shared, torch.empty_like(corrupted_senders[shared:]))
    # [b, p, d]: Σ over the fired senders
    total = (
        RunningTotal(resume.totals[start].clone(), shared)
        if start
        else RunningTotal(torch.zeros_like(corrupted_senders[0]))
    )

    def recorder(point: SenderPoint):
        def record(values):
            entries = diff.own_rows(point.start, point.stop)
            torch.sub(corrupted_senders[point.start : point.stop], _as_senders(values.detach()), out=entries)
            total.add(entries, point.stop)

        return record

    hooks = [h for p in graph.sender_points for h in adapter.sender_hooks(p.kind, p.layer, recorder(p))]
    hooks += patch_receivers_hooks(adapter, graph, diff, total, removed)
    totals, outputs = ([None] + (resume.totals[1:start] if start else [])), []
    if record:

        def snapshot(x, hook=None):
            totals.append(total.value.clone())
            return x

        hooks += [(adapter.layer_entry(layer), snapshot) for layer in range(max(start, 1), graph.shape.n_layers + 1)]
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(adapter.hooks(hooks))
        if start:
            stack.enter_context(adapter.blocks_replayed(resume.outputs, start))
        if record:
            stack.enter_context(adapter.blocks_recorded(outputs))
        logits = adapter.logits(clean, positions)
    return (logits, PassRecord(removed, diff, totals, outputs)) if record else logits


def stack_split(graph: EdgeGraph, removed: torch.Tensor) -> tuple[int, int] | None:
    """Where stacked circuits ``[k, s, r]`` part: the layer of the first receiver whose edges
    differ between them, and how many senders come before that layer (shared by all); None if
    the circuits are equal."""
    for point in graph.receiver_points:
        w = _removed_slice(removed, point)
        if bool((w != w[:1]).any()):
            return point.layer, next((p.start for p in graph.sender_points if p.layer >= point.layer), graph.n_senders)
    return None


@torch.no_grad()
def stacked_patched_logits(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted_senders: Float[torch.Tensor, "senders batch pos d_model"],
    removed: Float[torch.Tensor, "k senders receivers"],
    positions: Int[torch.Tensor, " batch"] | None = None,
) -> torch.Tensor:
    """Logits of k circuits on the same prompts, ``[k · batch, …]`` (circuit j on rows j·batch …).

    Equal to :func:`patched_logits` on the prompts repeated k times with a ``[k, s, r]`` mask,
    but the layers before the first receiver where the circuits differ run once, on ``batch``
    rows: the residual stream is repeated k times only as it enters that layer. Senders computed
    before that point have one ``corrupted − current`` entry shared by all circuits; later senders
    have one per circuit. An iterative search (ACDC) stacks circuits that differ in the edges into
    one late receiver, so most of the model runs once per stack instead of once per circuit.
    Memory: the later senders' entries, ``(senders − shared) × k × batch × pos × d_model``.
    """
    k = removed.shape[0]
    removed = removed.to(adapter.device) * graph.allowed.to(adapter.device)
    if not adapter.grows_mid_pass:  # the definition itself: the prompts repeated, one circuit per copy
        return patched_logits(
            adapter,
            graph,
            clean.repeat(k, 1),
            corrupted_senders.repeat(1, k, 1, 1),
            removed,
            None if positions is None else positions.repeat(k),
        )
    split = stack_split(graph, removed)
    if split is None:  # one circuit k times
        logits = patched_logits(adapter, graph, clean, corrupted_senders, removed[0], positions)
        return logits.repeat(k, *[1] * (logits.dim() - 1))
    return _stacked_from(adapter, graph, clean, corrupted_senders, removed, positions, split)


def _stacked_from(
    adapter: ModelAdapter,
    graph: EdgeGraph,
    clean: torch.Tensor,
    corrupted_senders: torch.Tensor,
    removed: torch.Tensor,
    positions: torch.Tensor | None,
    split: tuple[int, int],
) -> torch.Tensor:
    """:func:`stacked_patched_logits` for circuits that differ from the receivers of layer
    ``split[0]`` on, whose first ``split[1]`` senders fire before that layer."""
    k = removed.shape[0]
    layer, shared = split
    # corrupted − current, written as each sender fires: one per prompt before the split, one per circuit and
    # prompt after
    b = clean.shape[0]
    pre = torch.empty_like(corrupted_senders[:shared])  # [shared, b, p, d]
    post = corrupted_senders.new_empty((corrupted_senders.shape[0] - shared, k * b, *corrupted_senders.shape[2:]))
    total = RunningTotal(torch.zeros_like(corrupted_senders[0]))

    def recorder(point: SenderPoint):
        def record(values):
            corrupted, values = corrupted_senders[point.start : point.stop], _as_senders(values.detach())
            if point.start < shared:
                entries = pre[point.start : point.stop]
                torch.sub(corrupted, values, out=entries)
            else:
                entries = post[point.start - shared : point.stop - shared]
                n = entries.shape[0]
                torch.sub(
                    corrupted.unsqueeze(1),
                    values.reshape(n, k, b, *values.shape[2:]),
                    out=entries.view(n, k, b, *entries.shape[2:]),
                )
            total.add(entries, point.stop)

        return record

    def expand(x, hook=None):
        total.value = total.value.repeat(k, 1, 1)
        return repeat(x)

    def gather(rows: torch.Tensor, block: slice) -> torch.Tensor:
        """Entries of senders ``rows`` for the prompts ``block``: shared ones before the split, the block's own
        after."""
        early = rows < shared
        parts = [pre.index_select(0, rows[early])] if bool(early.any()) else []
        if not bool(early.all()):
            parts.append(post[:, block].index_select(0, rows[~early] - shared))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def delta(point: ReceiverPoint, plan, block: slice) -> torch.Tensor:
        rows, weights, from_total = plan
        d = _mix(gather(rows, block), weights) if len(rows) else 0.0
        if from_total:
            d = total.before(point.n_senders, partial(gather, block=block), block).unsqueeze(2) - d
        return d if point.per_head else d.squeeze(2)

    with adapter.batch_repeated_from(layer, k) as (where, repeat):
        hooks = [h for p in graph.sender_points for h in adapter.sender_hooks(p.kind, p.layer, recorder(p))]
        hooks.append((where, expand))  # after the input's recorder, before the logits' receiver
        for point in graph.receiver_points:
            w = _removed_slice(removed, point).to(pre.dtype)
            plans = [_plan(w[0], pre.device)] if point.layer < layer else [_plan(wj, pre.device) for wj in w]
            if any(plan is not None for plan in plans):
                hooks.append((adapter.receiver_hook(point.kind, point.layer), _blockwise(plans, partial(delta, point))))
        with adapter.hooks(hooks):
            return adapter.logits(clean, None if positions is None else positions.repeat(k))
