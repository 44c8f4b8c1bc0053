"""The edge graph of a transformer: senders, receivers and the edges between them.

Senders write to the residual stream: the input embedding, every attention head's output and
every MLP's output. Receivers read from it: every head's query input, every key/value group's key
and value input (grouped-query attention shares one k and one v input per group), every MLP's
input and the logits. An edge joins a sender to a receiver when the sender is computed before
the receiver, so with sequential blocks, L layers, H heads and G key/value groups there are
S = 1 + L(H + 1) senders and

    E = Σ_{l<L} [ (H + 2G)(1 + l(H + 1)) + (1 + l(H + 1) + H) ] + S

edges (32,491 for GPT-2 small, as in EAP-IG and MIB). A receiver's input is the sum of its
senders' outputs (plus constant biases), so patching one edge swaps that one term for its value
in the corrupted run.

Parallel blocks (``shape.parallel``: GPT-NeoX with ``use_parallel_residual``, i.e. every Pythia
model; GPT-J; Phi-1/2; Falcon with ``parallel_attn``; Cohere) compute a layer's attention and MLP
from the same residual stream, so the MLP of layer l reads no head of layer l: those L·H edges do
not exist, and

    E_parallel = E − L·H.

Everything that holds a value per edge is a dense ``[senders, receivers]`` tensor in the index
order fixed here; ``allowed`` marks which entries are edges.

Sender order: ``input``, then per layer ``a{l}.h0 … a{l}.h{H-1}``, ``m{l}``.
Receiver order: per layer ``a{l}.h0<q> … a{l}.h{H-1}<q>``, ``a{l}.g0<k> …``, ``a{l}.g0<v> …``,
``m{l}``; then ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from jaxtyping import Bool

from circuitfinder.engine.adapter import ModelShape


@dataclass(frozen=True)
class SenderPoint:
    """A hook point whose output is one or more senders (all heads of a layer share one)."""

    kind: str  # "input", "attn", "mlp"
    layer: int
    start: int  # first sender index
    stop: int


@dataclass(frozen=True)
class ReceiverPoint:
    """A hook point whose input is one or more receivers (all q heads of a layer share one)."""

    kind: str  # "q", "k", "v", "mlp", "logits"
    layer: int
    start: int  # first receiver index
    stop: int
    n_senders: int  # senders computed before it: indices [0, n_senders)
    per_head: bool  # the hook's tensor has a head/group axis


@dataclass(frozen=True)
class EdgeGraph:
    """Index maps and names for a model's senders, receivers and edges."""

    shape: ModelShape

    @property
    def n_senders(self) -> int:
        return 1 + self.shape.n_layers * (self.shape.n_heads + 1)

    @property
    def receivers_per_layer(self) -> int:
        return self.shape.n_heads + 2 * self.shape.n_kv_groups + 1

    @property
    def n_receivers(self) -> int:
        return self.shape.n_layers * self.receivers_per_layer + 1

    @cached_property
    def sender_points(self) -> tuple[SenderPoint, ...]:
        H = self.shape.n_heads
        points = [SenderPoint("input", -1, 0, 1)]
        for layer in range(self.shape.n_layers):
            base = 1 + layer * (H + 1)
            points += [SenderPoint("attn", layer, base, base + H), SenderPoint("mlp", layer, base + H, base + H + 1)]
        return tuple(points)

    @cached_property
    def receiver_points(self) -> tuple[ReceiverPoint, ...]:
        H, G = self.shape.n_heads, self.shape.n_kv_groups
        points = []
        for layer in range(self.shape.n_layers):
            base, before = layer * self.receivers_per_layer, 1 + layer * (H + 1)
            points += [
                ReceiverPoint("q", layer, base, base + H, before, True),
                ReceiverPoint("k", layer, base + H, base + H + G, before, True),
                ReceiverPoint("v", layer, base + H + G, base + H + 2 * G, before, True),
                ReceiverPoint(
                    "mlp",
                    layer,
                    base + H + 2 * G,
                    base + H + 2 * G + 1,
                    before if self.shape.parallel else before + H,
                    False,
                ),
            ]
        points.append(
            ReceiverPoint("logits", self.shape.n_layers, self.n_receivers - 1, self.n_receivers, self.n_senders, False)
        )
        return tuple(points)

    @cached_property
    def sender_names(self) -> tuple[str, ...]:
        names = ["input"]
        for layer in range(self.shape.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.shape.n_heads)] + [f"m{layer}"]
        return tuple(names)

    @cached_property
    def receiver_names(self) -> tuple[str, ...]:
        names = []
        for layer in range(self.shape.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(self.shape.n_heads)]
            names += [f"a{layer}.g{g}<{s}>" for s in "kv" for g in range(self.shape.n_kv_groups)]
            names.append(f"m{layer}")
        return tuple(names + ["logits"])

    @cached_property
    def allowed(self) -> Bool[torch.Tensor, "senders receivers"]:
        """True where a sender is computed before a receiver: the graph's edges."""
        mask = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool, device="cpu")
        for r in self.receiver_points:
            mask[: r.n_senders, r.start : r.stop] = True
        return mask

    @property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    def edge_name(self, sender: int, receiver: int) -> str:
        return f"{self.sender_names[sender]}->{self.receiver_names[receiver]}"

    def edge_index(self, name: str) -> tuple[int, int]:
        """``(sender, receiver)`` indices of an edge named like ``a0.h3->a5.h1<q>``."""
        sender, _, receiver = name.partition("->")
        return self._sender_index[sender], self._receiver_index[receiver]

    @cached_property
    def _sender_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.sender_names)}

    @cached_property
    def _receiver_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.receiver_names)}

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value group (1 without grouped-query attention)."""
        return self.shape.n_heads // self.shape.n_kv_groups

    def group_of(self, head: int) -> int:
        """The key/value group a query head reads."""
        return head // self.heads_per_group

    def group_heads(self, group: int) -> range:
        """The query heads that read key/value group ``group``."""
        return range(group * self.heads_per_group, (group + 1) * self.heads_per_group)

    @cached_property
    def receiver_kind(self) -> tuple[str, ...]:
        """For each receiver, its kind: ``q``, ``k``, ``v``, ``mlp`` or ``logits``."""
        return tuple(p.kind for p in self.receiver_points for _ in range(p.start, p.stop))

    @cached_property
    def receiver_node(self) -> tuple[tuple[int, ...], ...]:
        """For each receiver, the sender indices of the node(s) it feeds.

        A q input feeds its head; a k or v input of group g feeds every head of that group; an
        MLP input feeds the MLP. The logits feed no sender (empty tuple).
        """
        H = self.shape.n_heads
        out: list[tuple[int, ...]] = []
        for r in self.receiver_points:
            for j in range(r.stop - r.start):
                if r.kind == "logits":
                    out.append(())
                    continue
                base = 1 + r.layer * (H + 1)
                if r.kind == "q":
                    out.append((base + j,))
                elif r.kind in "kv":
                    out.append(tuple(base + h for h in self.group_heads(j)))
                else:
                    out.append((base + H,))
        return tuple(out)

    @cached_property
    def receiver_feeds(self) -> tuple[tuple[int, ...], ...]:
        """For each receiver, the sender indices whose values it changes (what pruning follows).

        As :attr:`receiver_node`, except where heads of a layer share a norm (rules in
        ``circuitfinder.engine.adapter``): under a shared post-attention norm (``shape.post_norm``,
        Gemma 2/3) each q/k/v input of a layer changes every head's value of that layer through the
        norm's common scale; under a query/key norm over all heads (``shape.shared_qk_norm``,
        OLMo-2) each q and k input does.
        """
        shared = ("q", "k", "v") if self.shape.post_norm else ("q", "k") if self.shape.shared_qk_norm else ()
        if not shared:
            return self.receiver_node
        H = self.shape.n_heads
        points = [p for p in self.receiver_points for _ in range(p.start, p.stop)]  # one per receiver
        first = [1 + p.layer * (H + 1) for p in points]  # the layer's first head
        return tuple(
            tuple(range(f, f + H)) if p.kind in shared else node
            for p, f, node in zip(points, first, self.receiver_node)
        )


def expected_edge_count(n_layers: int, n_heads: int, n_kv_groups: int, parallel: bool = False) -> int:
    """DESIGN.md's closed form for the number of edges, for checking the graph."""
    L, H, G = n_layers, n_heads, n_kv_groups
    S = 1 + L * (H + 1)
    sequential = sum((H + 2 * G) * (1 + l * (H + 1)) + (1 + l * (H + 1) + H) for l in range(L)) + S
    return sequential - L * H if parallel else sequential
