"""Choosing a circuit from edge scores, and pruning it to edges on input-to-logits paths.

A circuit is a boolean ``[senders, receivers]`` mask of kept edges; every other edge is patched
from the corrupted run when the circuit is evaluated.

Pruning is exact. A node none of whose kept incoming edges is reachable from the input reads only
corrupted values, so its output equals its corrupted-run output and patching its outgoing edges
changes nothing. A node with no kept path to the logits influences the logits only through
patched edges, which carry corrupted values whatever it computes. Removing both kinds of edge
therefore leaves the circuit's metric unchanged (a test checks this by patching). Under a shared
post-attention norm (Gemma 2/3) the heads of a layer share one scale, so the "node" of these two
rules is the layer's attention as a whole: ``EdgeGraph.receiver_feeds`` says so.

The first rule holds only when the ablated values are a real run of the model (counterfactual
ablation). Under mean or zero ablation a node that reads only ablated values computes f(mean) or
f(0), not the mean or zero its patched edges carry, so only the second rule is exact:
``prune(..., ablation_is_run=False)`` applies it alone.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float

from circuitfinder.engine.graph import EdgeGraph

Mask = Bool[torch.Tensor, "senders receivers"]


def top_edges(
    graph: EdgeGraph, scores: Float[torch.Tensor, "senders receivers"], n: int, among: Mask | None = None
) -> Mask:
    """The ``n`` edges of largest ``|score|`` among ``among`` (default: every edge of the graph);
    ties broken by edge index, so the result is stable."""
    candidates = graph.allowed if among is None else graph.allowed & among
    n = max(0, min(n, int(candidates.sum())))
    flat = torch.where(
        candidates, scores.abs().double(), torch.tensor(-1.0, dtype=torch.float64, device="cpu")
    ).flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:n]
    mask = torch.zeros(graph.allowed.numel(), dtype=torch.bool, device="cpu")
    mask[order] = True
    return mask.view_as(graph.allowed)


def edges_above(graph: EdgeGraph, scores: Float[torch.Tensor, "senders receivers"], threshold: float) -> Mask:
    """Every edge with ``|score| ≥ threshold``."""
    return graph.allowed & (scores.abs() >= threshold)


def prune(graph: EdgeGraph, mask: Mask, ablation_is_run: bool = True) -> Mask:
    """Keep only edges on some input → logits path of kept edges (see the module docstring).

    With ``ablation_is_run=False`` (mean or zero ablation), keep every edge on a path of kept
    edges to the logits, whether or not the input reaches it.
    """
    mask = mask & graph.allowed
    S = graph.n_senders
    feeds = graph.receiver_feeds  # receiver -> sender nodes whose values it changes

    # Forward: which sender nodes carry a clean signal (all of them unless the ablation is a run).
    # Senders are in topological order.
    reached = torch.full((S,), not ablation_is_run, dtype=torch.bool, device="cpu")
    reached[0] = True
    receiver_reached = torch.zeros(graph.n_receivers, dtype=torch.bool, device="cpu")
    for point in graph.receiver_points if ablation_is_run else ():
        cols = slice(point.start, point.stop)
        receiver_reached[cols] = (mask[:, cols] & reached[:, None]).any(0)
        for r in range(point.start, point.stop):
            if receiver_reached[r]:
                reached[list(feeds[r])] = True

    # Backward: which sender nodes reach the logits through kept edges.
    live = torch.zeros(S, dtype=torch.bool, device="cpu")
    receiver_live = torch.zeros(graph.n_receivers, dtype=torch.bool, device="cpu")
    receiver_live[-1] = True
    for point in reversed(graph.receiver_points):
        for r in range(point.start, point.stop):
            if point.kind != "logits":
                receiver_live[r] = bool(live[list(feeds[r])].any())
        cols = slice(point.start, point.stop)
        live |= (mask[:, cols] & receiver_live[cols]).any(1)
        # a sender becomes live before the receivers of earlier layers are visited: senders of a
        # layer only feed receivers of later layers (and its own MLP), visited earlier here.

    return mask & reached[:, None] & live[:, None] & receiver_live[None, :]


def receiver_targets(graph: EdgeGraph, mask: Mask) -> dict[int, tuple[str, ...]]:
    """For each receiver with a kept edge, the node(s) its edges lead to: the node of a query or
    MLP input, the logits, and for a key/value group's input the heads of the group that are
    otherwise in the circuit (senders of kept edges, or heads whose query input is kept), or the
    group's first head when none is. A k/v input changes every head of its group, but a head none
    of whose own edges is kept has its output patched everywhere: it is not part of the circuit."""
    kept = torch.nonzero(mask.any(0)).flatten().tolist()
    kinds, node = graph.receiver_kind, graph.receiver_node
    own = set(torch.nonzero(mask.any(1)).flatten().tolist()) | {node[r][0] for r in kept if kinds[r] == "q"}
    targets = {}
    for r in kept:
        if kinds[r] == "logits":
            targets[r] = ("logits",)
        elif kinds[r] in ("k", "v"):
            heads = [s for s in node[r] if s in own] or [node[r][0]]
            targets[r] = tuple(graph.sender_names[s] for s in heads)
        else:
            targets[r] = (graph.sender_names[node[r][0]],)
    return targets


def circuit_nodes(graph: EdgeGraph, mask: Mask) -> set[str]:
    """The circuit's nodes (input, heads, MLPs, logits): the senders of its edges and the nodes
    they lead to (:func:`receiver_targets`). The one definition behind every node count."""
    names = {graph.sender_names[s] for s in torch.nonzero(mask.any(1)).flatten().tolist()}
    for heads in receiver_targets(graph, mask).values():
        names.update(heads)
    return names


def node_count(graph: EdgeGraph, mask: Mask) -> int:
    """How many nodes the circuit has (:func:`circuit_nodes`)."""
    return len(circuit_nodes(graph, mask))
