"""Published circuits as edge masks over a model's edge graph, for grading discovery methods.

A reference is a JSON file in ``graphs/references/`` (package data): named groups
of nodes (``input``, ``a{l}.h{h}``, ``m{l}``, ``logits``), the node classes the paper names, and
connections ``{"from": groups, "to": groups, "slots": "qkv"}``. A connection makes every
sender of its ``from`` groups an edge to every receiver of its ``to`` groups, restricted to edges
of the graph (sender computed before receiver); ``slots`` says which inputs of a head receive
(``q``, ``k``, ``v``; default all three; a k/v slot is the head's key/value group), while an MLP
and the logits have one input. The edge mask is the union of the connections; the node-level
reference is every head and MLP at an end of a reference edge.

**gpt2-ioi**: the 26 heads of Wang et al. 2022 ("Interpretability in the wild",
arXiv:2211.00593) in seven classes, turned into edges as the ACDC evaluation did (Conmy et al.
2023, arXiv:2304.14997, ``get_ioi_true_edges``): input → previous-token and duplicate-token heads
(q, k, v), S-inhibition queries and the three mover classes' keys and values; previous-token →
induction (k, v); induction and duplicate-token → S-inhibition (k, v); S-inhibition → name
movers, backup and negative name movers (q); movers → logits. *"MLPs count as part of the input
side and of the output side"* is read as ACDC's code computes it: (1) wherever a rule starts at
the input, every earlier MLP is a sender too, and wherever it ends at the logits, every later
MLP is a receiver too; (2) the input, all 12 MLPs and the logits are fully connected among
themselves (input → MLPs, MLP → later MLP, MLPs → logits, input → logits); (3) every MLP feeds
the q, k and v of every later circuit head, and every circuit head feeds every MLP of its layer
and later, whatever the rules say (ACDC starts from the full graph on the 26 heads and MLPs and
removes only head-to-head edges and the input's and logits' edges of circuit heads). Rule (1) is
therefore contained in (2) and (3). The input → movers (k, v) rule is in ACDC's code though not
in every summary of it (``note`` in the file). On GPT-2 small: 963 of 32,491 edges; 38 nodes (the
26 heads and the 12 MLPs).

**gpt2-greater-than**: Hanna et al. 2023 ("How does GPT-2 compute greater-than?",
arXiv:2305.00586) as in ACDC's ``get_greaterthan_true_edges``: input → early heads (0.1, 0.3,
0.5) and MLPs 0–3; head 0.1 → MLPs 0–3; early heads and MLPs 0–3 → the mid heads (5.5, 6.1, 6.9,
7.10, 8.11, 9.1; q, k, v); mid heads → MLPs 8–11; MLPs within 0–3 and within 8–11 connected; mid
heads and MLPs 8–11 → logits; and, because Hanna et al. patch the mid heads' queries cleanly,
every MLP before layer 9 → every later MLP before layer 9 and → the mid heads' queries. The
latter puts MLPs 4–7 among the reference's nodes: 235 edges, 21 nodes (9 heads, 12 MLPs). The
authors' later list adds heads 5.1 and 8.8; ACDC's reference, and this one, do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool

from circuitfinder.engine.adapter import ModelShape
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import circuit_nodes
from circuitfinder.errors import UserError
from circuitfinder.graphs.circuit import parse_name
from circuitfinder.graphs.references import read

SCHEMA = "circuits/reference"


@dataclass(frozen=True)
class Connection:
    senders: tuple[str, ...]  # group names
    receivers: tuple[str, ...]
    slots: str  # head inputs: a subset of "qkv"


@dataclass(frozen=True)
class Reference:
    """A published circuit: its groups of nodes and the connections that make its edges."""

    name: str
    task: str
    model: str
    n_layers: int
    n_heads: int
    n_kv_groups: int
    title: str
    citation: str
    classes: tuple[str, ...]  # the groups that are the paper's classes of heads (and MLPs)
    groups: dict[str, tuple[str, ...]]
    connections: tuple[Connection, ...]
    published: dict

    def node_classes(self) -> dict[str, str]:
        """Node name → its class (the first class listing it)."""
        out: dict[str, str] = {}
        for c in self.classes:
            for node in self.groups[c]:
                out.setdefault(node, c)
        return out


def _names(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def load_reference(name: str) -> Reference:
    """The reference called ``name`` (see :func:`circuitfinder.graphs.references.available`).

    Raises:
        UserError: no reference of that name (the message lists the available ones).
    """
    data = read(name)
    if data.get("schema") != SCHEMA or data.get("version") != 1:
        raise ValueError(f"reference {name}: not a {SCHEMA} version 1 file")
    groups = {k: tuple(v) for k, v in data["groups"].items()}
    connections = tuple(
        Connection(_names(c["from"]), _names(c["to"]), c.get("slots", "qkv")) for c in data["connections"]
    )
    for c in connections:
        unknown = [g for g in c.senders + c.receivers if g not in groups]
        if unknown or not set(c.slots) <= set("qkv"):
            raise ValueError(f"reference {name}: bad connection {c} (unknown groups {unknown})")
    return Reference(
        name=data["name"],
        task=data["task"],
        model=data["model"],
        n_layers=data["n_layers"],
        n_heads=data["n_heads"],
        n_kv_groups=data["n_kv_groups"],
        title=data["title"],
        citation=data["citation"],
        classes=tuple(data["classes"]),
        groups=groups,
        connections=connections,
        published=data.get("published", {}),
    )


def check_shape(reference: Reference, shape: ModelShape | EdgeGraph) -> EdgeGraph:
    """The edge graph of ``shape``, if it is the reference model's; else a UserError saying why not."""
    graph = shape if isinstance(shape, EdgeGraph) else EdgeGraph(shape)
    s = graph.shape
    want = (reference.n_layers, reference.n_heads, reference.n_kv_groups)
    if (s.n_layers, s.n_heads, s.n_kv_groups) != want:
        raise UserError(
            f"reference {reference.name} is for {reference.model} ({want[0]} layers, {want[1]} heads, {want[2]} "
            f"key/value groups); this model has {s.n_layers} layers, {s.n_heads} heads, {s.n_kv_groups} key/value "
            f"groups"
        )
    return graph


def _receivers(graph: EdgeGraph, node: str, slots: str) -> list[str]:
    """The receivers of a node: a head's ``slots`` inputs (k, v: its group's), else the node itself."""
    p = parse_name(node)
    if p.kind != "attn":
        return [node]
    return [f"{node}<q>" if s == "q" else f"a{p.layer}.g{graph.group_of(p.head)}<{s}>" for s in slots]


def reference_mask(reference: Reference, shape: ModelShape | EdgeGraph) -> Bool[torch.Tensor, "senders receivers"]:
    """The reference's edges as a ``[senders, receivers]`` mask over the model's edge graph.

    Raises:
        UserError: the model's shape is not the reference model's.
    """
    graph = check_shape(reference, shape)
    sender = {n: i for i, n in enumerate(graph.sender_names)}
    receiver = {n: i for i, n in enumerate(graph.receiver_names)}
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool, device="cpu")
    for c in reference.connections:
        rows = [sender[n] for g in c.senders for n in reference.groups[g]]
        cols = [receiver[r] for g in c.receivers for n in reference.groups[g] for r in _receivers(graph, n, c.slots)]
        mask[torch.tensor(rows, device="cpu")[:, None], torch.tensor(cols, device="cpu")[None, :]] = True
    return mask & graph.allowed


def node_mask(graph: EdgeGraph, edges: Bool[torch.Tensor, "senders receivers"]) -> Bool[torch.Tensor, " senders"]:
    """The heads and MLPs of the circuit ``edges``, indexed like senders (``input`` always False):
    its nodes by the one rule of ``circuitfinder.engine.masks.circuit_nodes``."""
    names = circuit_nodes(graph, edges)
    return torch.tensor([n in names and n != "input" for n in graph.sender_names], device="cpu")


def reference_nodes(reference: Reference, shape: ModelShape | EdgeGraph) -> set[str]:
    """The node-level reference: the heads and MLPs at an end of a reference edge."""
    graph = check_shape(reference, shape)
    touched = node_mask(graph, reference_mask(reference, graph))
    return {graph.sender_names[i] for i in torch.nonzero(touched).flatten().tolist()}
