"""One circuit object: a model's edge graph, the score of every edge, and which edges are kept.

:class:`Circuit` follows the pattern of EAP-IG's ``Graph`` (Hanna et al. 2024): the edge graph
(``circuitfinder.engine.graph.EdgeGraph``), a dense ``[senders, receivers]`` score tensor, a
boolean in-circuit mask of the same shape and, where measured, each edge's necessity (the
metric's change when that edge alone is removed from the circuit); plus what made it (model, task,
method) and the roles of its heads. Nodes, edges, the NetworkX view, the JSON file and the diagram
are views of it. Scores not known (a circuit read from ``circuit.json`` knows only its own edges')
are NaN.

``circuit.json`` (schema ``circuits/circuit``, version 1) is its serialised form: the model's
shape and the kept edges, each as ``{"sender": "a0.h3", "receiver": "a5.h1<q>", "score": -0.12}``
with an optional ``"necessity"``, and an optional ``"roles"`` object (head name → role scores and
label, see ``circuitfinder.graphs.roles``). Node names follow DESIGN.md: ``input``,
``a{layer}.h{head}``, ``m{layer}``, ``logits``; a receiver name is its node plus a slot (``<q>``,
``<k>``, ``<v>``), where k/v slots name the key/value group (``a5.g1<k>``) under grouped-query
attention.

The NetworkX view (:meth:`Circuit.to_networkx`) is the circuit merged to node level: heads and
MLPs are the units, and the circuit's edges between two units become one graph edge that keeps
every part (per-slot scores), so the circuit can be rebuilt from it exactly (:func:`from_networkx`).
Attributes:

* node: ``kind`` (input/attn/mlp/logits), ``layer`` (−1 for input, ``n_layers`` for logits),
  ``head`` (None unless attn), ``role`` (a label or None) and any role scores;
* edge: ``slot`` (``"q"``, ``"kv"``, … the receiving head inputs, in q, k, v order; None for MLP
  and logits receivers), ``score`` (sum over slots, signed), ``score_q``/``score_k``/``score_v``
  (per slot), ``abs_score`` (sum of |score| of the merged edges), ``count`` (how many circuit
  edges it stands for), and ``necessity`` (and ``necessity_q`` …) when the circuit has it.

A k/v edge into group g reaches every query head that reads that group; in the graph it points
at each head of the group that is otherwise in the circuit, or at the group's first head if none
is (``circuitfinder.engine.masks.receiver_targets``, the rule every node count uses).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import networkx as nx
import torch
from jaxtyping import Bool, Float

from circuitfinder.engine.adapter import ModelShape
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import circuit_nodes, edges_above, prune, receiver_targets, top_edges
from circuitfinder.errors import UserError

SCHEMA = "circuits/circuit"
VERSION = 1
SLOTS = "qkv"

_NODE = re.compile(r"^(input|logits|m(?P<ml>\d+)|a(?P<al>\d+)\.(?:h(?P<h>\d+)|g(?P<g>\d+)))(?:<(?P<slot>[qkv])>)?$")


class CircuitFileError(UserError, ValueError):
    """A circuit file that cannot be read; the message says what is wrong."""


@dataclass(frozen=True)
class NodeName:
    """A parsed node or receiver name."""

    kind: str  # "input", "attn", "mlp", "logits"
    layer: int | None = None
    head: int | None = None
    group: int | None = None
    slot: str | None = None  # "q", "k", "v" or None


def parse_name(name: str) -> NodeName:
    """Parse ``input``, ``logits``, ``m3``, ``a2.h1``, ``a2.h1<q>``, ``a2.g0<k>``."""
    m = _NODE.match(name) if isinstance(name, str) else None
    if not m or (m.group("slot") and not m.group("al")):
        raise CircuitFileError(f"not a node name: {name!r}")
    if name == "input":
        return NodeName("input", layer=-1)
    if name == "logits":
        return NodeName("logits")
    if m.group("ml") is not None:
        return NodeName("mlp", layer=int(m.group("ml")))
    head = int(m.group("h")) if m.group("h") is not None else None
    group = int(m.group("g")) if m.group("g") is not None else None
    return NodeName("attn", layer=int(m.group("al")), head=head, group=group, slot=m.group("slot"))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_edge(graph: EdgeGraph, sender: str, receiver: str) -> str | None:
    """What is wrong with an edge name for this graph, or None if it is one of the graph's edges.

    Names are checked here; whether a well-named pair is an edge is the graph's own rule
    (``EdgeGraph.allowed``), so that rule has one home."""
    n_layers, n_heads, n_kv_groups = graph.shape.n_layers, graph.shape.n_heads, graph.shape.n_kv_groups
    try:
        s, r = parse_name(sender), parse_name(receiver)
    except CircuitFileError as exc:
        return str(exc)
    if s.kind == "logits" or s.slot or s.group is not None:
        return f"{sender!r} is not a sender (input, a{{l}}.h{{h}} or m{{l}})"
    if r.kind == "input" or (r.kind == "attn" and not r.slot):
        return f"{receiver!r} is not a receiver (a{{l}}.h{{h}}<q>, a{{l}}.g{{g}}<k|v>, m{{l}} or logits)"
    if r.kind == "attn" and (r.slot == "q") != (r.head is not None):
        return (
            f"{receiver!r}: a query input names its head (a{{l}}.h{{h}}<q>), a key/value input its group "
            f"(a{{l}}.g{{g}}<k>)"
        )
    for p, name in ((s, sender), (r, receiver)):
        if p.layer is not None and p.layer >= n_layers:
            return f"{name!r}: layer {p.layer} but the model has {n_layers}"
        if p.head is not None and p.head >= n_heads:
            return f"{name!r}: head {p.head} but the model has {n_heads} per layer"
        if p.group is not None and p.group >= n_kv_groups:
            return f"{name!r}: key/value group {p.group} but the model has {n_kv_groups} per layer"
    if not graph.allowed[graph.edge_index(f"{sender}->{receiver}")]:
        if graph.shape.parallel and r.kind == "mlp" and s.kind == "attn" and s.layer == r.layer:
            return f"{sender!r} does not reach {receiver!r}: the model's blocks are parallel"
        return f"{sender!r} is not computed before {receiver!r}"
    return None


Mask = Bool[torch.Tensor, "senders receivers"]
EdgeValues = Float[torch.Tensor, "senders receivers"]


def _values(graph: EdgeGraph, values: torch.Tensor | None) -> torch.Tensor:
    """Per-edge values as float64 (NaN off the graph's edges); NaN everywhere when None."""
    shape = (graph.n_senders, graph.n_receivers)
    if values is None:
        return torch.full(shape, math.nan, dtype=torch.float64, device="cpu")
    values = torch.as_tensor(values, device="cpu").detach().to(torch.float64)
    if tuple(values.shape) != shape:
        raise ValueError(f"edge values must have shape {shape} [senders, receivers], got {tuple(values.shape)}")
    return torch.where(graph.allowed, values, torch.tensor(math.nan, dtype=torch.float64, device="cpu"))


def _checked_edges(graph: EdgeGraph, edges, source: str) -> list[dict]:
    """A circuit file's ``edges``, each a known edge of ``graph`` once, with finite numbers."""
    if not isinstance(edges, list):
        raise CircuitFileError(f"{source}: 'edges' must be a list")
    seen = set()
    for k, e in enumerate(edges):
        if not isinstance(e, dict) or not {"sender", "receiver", "score"} <= set(e):
            raise CircuitFileError(f"{source}: edge {k} needs sender, receiver and score")
        name = f"{e['sender']}->{e['receiver']}"
        problem = check_edge(graph, e["sender"], e["receiver"])
        if problem:
            raise CircuitFileError(f"{source}: edge {k} ({name}): {problem}")
        for key in ("score", "necessity"):
            if key in e and not (_number(e[key]) or key == "necessity" and e[key] is None):
                raise CircuitFileError(f"{source}: edge {k} ({name}): {key} must be a finite number, got {e[key]!r}")
        if name in seen:
            raise CircuitFileError(f"{source}: edge {k} ({name}) appears twice")
        seen.add(name)
    return edges


def _checked_roles(roles, n_layers: int, n_heads: int, source: str) -> dict[str, dict]:
    """A circuit file's ``roles``: head names of this model, each with a ``role`` entry first."""
    if not isinstance(roles, dict) or not all(isinstance(v, dict) for v in roles.values()):
        raise CircuitFileError(f"{source}: 'roles' must map head names to objects")
    for name in roles:
        p = parse_name(name)
        if p.kind != "attn" or p.head is None or p.slot or p.layer >= n_layers or p.head >= n_heads:
            raise CircuitFileError(f"{source}: roles: {name!r} is not a head of this model")
    return {k: {"role": v.get("role"), **{s: x for s, x in v.items() if s != "role"}} for k, v in roles.items()}


@dataclass(frozen=True, eq=False)
class Circuit:
    """A circuit of a model: its edge graph, every edge's score, and the in-circuit mask.

    Args:
        graph: the model's edge graph.
        mask: ``[senders, receivers]`` booleans, true for the edges kept (others are patched).
        scores: ``[senders, receivers]`` edge scores (attribution's, or any); NaN where unknown.
        model, task, method: what made it.
        necessity: ``[senders, receivers]`` each kept edge's necessity, NaN where unmeasured.
        roles: head name → ``{"role": label or None, score name: value}``.
        metadata: anything else worth keeping in ``circuit.json`` (held-out faithfulness, ...).

    Example::

        circuit = run.circuit.top(500).prune()
        circuit.nodes(); circuit.to_networkx(); circuit.draw("ioi")
    """

    graph: EdgeGraph
    mask: Mask
    scores: EdgeValues | None = None
    model: str = "model"
    task: str = "task"
    method: str = "method"
    necessity: EdgeValues | None = None
    roles: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        mask = torch.as_tensor(self.mask, device="cpu").to(torch.bool)
        if tuple(mask.shape) != tuple(self.graph.allowed.shape):
            raise ValueError(
                f"mask must have shape {tuple(self.graph.allowed.shape)} [senders, receivers], got {tuple(mask.shape)}"
            )
        object.__setattr__(self, "mask", mask & self.graph.allowed)
        object.__setattr__(self, "scores", _values(self.graph, self.scores))
        if self.necessity is not None:
            object.__setattr__(self, "necessity", _values(self.graph, self.necessity))

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_scores(cls, graph: EdgeGraph, scores: EdgeValues, **about) -> "Circuit":
        """An empty circuit that knows every edge's score: take ``.top(n)`` or ``.above(t)`` of it."""
        return cls(graph, torch.zeros_like(graph.allowed), scores, **about)

    @classmethod
    def from_edges(cls, graph: EdgeGraph, edges: list[dict], **about) -> "Circuit":
        """A circuit of the named edges, each ``{"sender", "receiver", "score"[, "necessity"]}``.

        Raises:
            CircuitFileError: a name that is not an edge of ``graph``.
        """
        mask = torch.zeros_like(graph.allowed)
        scores = torch.full(mask.shape, math.nan, dtype=torch.float64, device="cpu")
        necessity = scores.clone()
        for e in edges:
            problem = check_edge(graph, e["sender"], e["receiver"])
            if problem:
                raise CircuitFileError(problem)
            s, r = graph.edge_index(f"{e['sender']}->{e['receiver']}")
            mask[s, r] = True
            scores[s, r] = float(e["score"])
            if e.get("necessity") is not None:
                necessity[s, r] = float(e["necessity"])
        return cls(graph, mask, scores, necessity=necessity if not necessity.isnan().all() else None, **about)

    MEASURED = ("faithfulness",)  # metadata that describe this edge set, not the model or the scores

    def replace(self, **changes) -> "Circuit":
        """A copy with some fields changed (``mask``, ``roles``, ``metadata``, ...). A copy with
        other edges leaves out what was measured on these (necessity, faithfulness)."""
        mask = changes.get("mask")
        if mask is not None and not torch.equal(
            torch.as_tensor(mask, device="cpu").bool() & self.graph.allowed, self.mask
        ):
            changes.setdefault("necessity", None)
            changes.setdefault("metadata", {k: v for k, v in self.metadata.items() if k not in self.MEASURED})
        return dataclasses.replace(self, **changes)

    # ---- what it holds ------------------------------------------------------------------------

    @property
    def shape(self) -> ModelShape:
        return self.graph.shape

    @property
    def n_layers(self) -> int:
        return self.graph.shape.n_layers

    @property
    def n_heads(self) -> int:
        return self.graph.shape.n_heads

    @property
    def n_kv_groups(self) -> int:
        return self.graph.shape.n_kv_groups

    @property
    def parallel(self) -> bool:
        return self.graph.shape.parallel

    @property
    def n_edges(self) -> int:
        """Edges in the circuit."""
        return int(self.mask.sum())

    @cached_property
    def edges(self) -> tuple[dict, ...]:
        """The kept edges in the graph's order, each ``{"sender", "receiver", "score"[, "necessity"]}``."""
        out = []
        for s, r in torch.nonzero(self.mask).tolist():
            e = {
                "sender": self.graph.sender_names[s],
                "receiver": self.graph.receiver_names[r],
                "score": float(self.scores[s, r]),
            }
            if self.necessity is not None and not math.isnan(self.necessity[s, r]):
                e["necessity"] = float(self.necessity[s, r])
            out.append(e)
        return tuple(out)

    def edge_names(self) -> list[str]:
        return [f"{e['sender']}->{e['receiver']}" for e in self.edges]

    def nodes(self) -> set[str]:
        """Its nodes, input and logits included (``circuitfinder.engine.masks.circuit_nodes``)."""
        return circuit_nodes(self.graph, self.mask)

    def heads(self) -> list[str]:
        """Its attention heads, in layer order."""
        nodes = self.nodes()
        return [n for n in self.graph.sender_names if n in nodes and n.startswith("a")]

    def __repr__(self) -> str:
        nodes = self.nodes()
        units = sum(1 for n in nodes if n not in ("input", "logits"))
        faith = self.metadata.get("faithfulness")
        return (
            f"Circuit({self.task} · {self.model} · {self.method}: {self.n_edges:,} of {self.graph.n_edges:,} edges, "
            f"{units} heads and MLPs" + ("" if faith is None else f", faithfulness {faith:.3f}") + ")"
        )

    # ---- other circuits from this one ---------------------------------------------------------

    def top(self, n: int) -> "Circuit":
        """The ``n`` edges of largest |score| among every scored edge of the graph (ties: graph order)."""
        return self.replace(mask=top_edges(self.graph, self.scores, n, among=~self.scores.isnan()))

    def above(self, threshold: float) -> "Circuit":
        """Every scored edge with |score| ≥ ``threshold``."""
        return self.replace(mask=edges_above(self.graph, self.scores, threshold))

    def strongest(self, n: int) -> "Circuit":
        """The circuit's own ``n`` edges of largest |score| (for drawing large circuits legibly)."""
        return self.replace(mask=top_edges(self.graph, self.scores, n, among=self.mask & ~self.scores.isnan()))

    def prune(self, ablation_is_run: bool = True) -> "Circuit":
        """Only edges on input → logits paths of kept edges: the same metric, exactly
        (``circuitfinder.engine.masks.prune``; ``ablation_is_run=False`` under mean or zero ablation)."""
        # the metric is unchanged, so what was measured on the circuit still holds
        return self.replace(
            mask=prune(self.graph, self.mask, ablation_is_run), metadata=self.metadata, necessity=self.necessity
        )

    def with_roles(self, table) -> "Circuit":
        """A copy with the role labels and scores of its heads (from ``measure_roles``'s DataFrame,
        ``roles.csv`` read back, or a dict of head → role entry); NaN scores are left out."""
        if isinstance(table, dict):
            return self.replace(roles=dict(table))
        heads = {n for n in self.nodes() if n.startswith("a")}
        rows = table.to_dict("records") if hasattr(table, "to_dict") else list(table)
        roles = {}
        for row in rows:
            if row.get("node") not in heads:
                continue
            role = row.get("role")
            entry = {"role": role if isinstance(role, str) and role else None}
            for k, v in row.items():
                if k not in ("node", "layer", "head", "role") and _number(v):
                    entry[k] = float(v)
            roles[row["node"]] = entry
        return self.replace(roles=roles)

    # ---- files --------------------------------------------------------------------------------

    def to_json(self) -> str:
        edges = sorted(self.edges, key=lambda e: (e["sender"], e["receiver"]))
        shape = self.graph.shape
        payload = {
            "schema": SCHEMA,
            "version": VERSION,
            "model": self.model,
            "task": self.task,
            "method": self.method,
            "n_layers": shape.n_layers,
            "n_heads": shape.n_heads,
            "n_kv_groups": shape.n_kv_groups,
            **({"parallel": True} if shape.parallel else {}),
            **({"post_norm": True} if shape.post_norm else {}),
            **({"shared_qk_norm": True} if shape.shared_qk_norm else {}),
            **({"d_model": shape.d_model} if shape.d_model else {}),
            "metadata": self.metadata,
            "edges": edges,
        }
        if self.roles:
            payload["roles"] = {k: self.roles[k] for k in sorted(self.roles)}
        return json.dumps(payload, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "circuit file") -> "Circuit":
        """Read ``circuit.json`` text, checking everything and naming the first thing wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CircuitFileError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (ValueError, RecursionError) as exc:  # an integer too long to parse, nesting too deep
            raise CircuitFileError(
                f"{source} is not valid JSON ({str(exc).split(';')[0] or 'nested too deeply'})"
            ) from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            hint = " (an EAP-IG/MIB graph? use `circuits convert`)" if isinstance(data, dict) and "cfg" in data else ""
            raise CircuitFileError(f"{source} is not a circuit file (schema must be {SCHEMA!r}){hint}")
        if data.get("version") != VERSION:
            raise CircuitFileError(f"{source} has schema version {data.get('version')!r}; this tool reads {VERSION}")
        missing = [
            k for k in ("model", "task", "method", "n_layers", "n_heads", "n_kv_groups", "edges") if k not in data
        ]
        if missing:
            raise CircuitFileError(f"{source} lacks the field(s) {', '.join(missing)}")
        for k in ("n_layers", "n_heads", "n_kv_groups"):
            if not isinstance(data[k], int) or isinstance(data[k], bool) or data[k] < 1:
                raise CircuitFileError(f"{source}: {k!r} must be a positive integer, got {data[k]!r}")
        L, H, G = data["n_layers"], data["n_heads"], data["n_kv_groups"]
        if H % G:
            raise CircuitFileError(f"{source}: n_heads {H} is not a multiple of n_kv_groups {G}")
        for k in ("parallel", "post_norm", "shared_qk_norm"):
            if not isinstance(data.get(k, False), bool):
                raise CircuitFileError(f"{source}: {k!r} must be true or false, got {data[k]!r}")
        d_model = data.get("d_model", 0)
        if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 0:
            raise CircuitFileError(f"{source}: 'd_model' must be a positive integer, got {d_model!r}")
        for k in ("model", "task", "method"):
            if not isinstance(data[k], str):
                raise CircuitFileError(f"{source}: {k!r} must be a string, got {data[k]!r}")
        if not isinstance(data.get("metadata", {}), dict):
            raise CircuitFileError(f"{source}: 'metadata' must be an object")
        graph = EdgeGraph(
            ModelShape(
                L,
                H,
                G,
                d_model=d_model,
                post_norm=data.get("post_norm", False),
                parallel=data.get("parallel", False),
                shared_qk_norm=data.get("shared_qk_norm", False),
            )
        )
        edges = _checked_edges(graph, data["edges"], source)
        roles = _checked_roles(data.get("roles", {}), L, H, source)
        return cls.from_edges(
            graph,
            edges,
            model=data["model"],
            task=data["task"],
            method=data["method"],
            metadata=data.get("metadata", {}),
            roles=roles,
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Circuit":
        path = Path(path)
        if not path.is_file():
            raise CircuitFileError(f"no circuit file at {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CircuitFileError(
                f"{path} is not a circuit file (not UTF-8 text: {exc.reason} at byte {exc.start})"
            ) from None
        except OSError as exc:
            raise CircuitFileError(f"cannot read {path} ({exc.strerror})") from None
        return cls.from_json(text, source=str(path))

    # ---- views --------------------------------------------------------------------------------

    def to_networkx(self) -> nx.DiGraph:
        """The circuit merged to node level, losslessly (see the module docstring)."""
        shape = self.graph.shape
        graph = nx.DiGraph(
            model=self.model,
            task=self.task,
            method=self.method,
            n_layers=shape.n_layers,
            n_heads=shape.n_heads,
            n_kv_groups=shape.n_kv_groups,
            parallel=shape.parallel,
            post_norm=shape.post_norm,
            shared_qk_norm=shape.shared_qk_norm,
            d_model=shape.d_model,
            metadata=dict(self.metadata),
        )

        def add_node(name: str) -> None:
            if name in graph:
                return
            p = parse_name(name)
            layer = shape.n_layers if p.kind == "logits" else p.layer
            info = dict(self.roles.get(name, {}))
            graph.add_node(name, kind=p.kind, layer=layer, head=p.head, role=info.pop("role", None), **info)

        targets = receiver_targets(self.graph, self.mask)
        for e, (s, r) in sorted(
            zip(self.edges, torch.nonzero(self.mask).tolist()), key=lambda x: (x[0]["sender"], x[0]["receiver"])
        ):
            add_node(e["sender"])
            slot = parse_name(e["receiver"]).slot
            score, necessity = e["score"], e.get("necessity")
            for t in targets[r]:
                add_node(t)
                if not graph.has_edge(e["sender"], t):
                    graph.add_edge(e["sender"], t, slot=None, score=0.0, abs_score=0.0, count=0)
                d = graph.edges[e["sender"], t]
                d["score"] += score
                d["abs_score"] += abs(score)
                d["count"] += 1
                if necessity is not None:
                    d["necessity"] = d.get("necessity", 0.0) + necessity
                if slot:
                    d["slot"] = "".join(s for s in SLOTS if s in (d["slot"] or "") + slot)
                    d[f"score_{slot}"] = score
                    if necessity is not None:
                        d[f"necessity_{slot}"] = necessity
        return graph

    def draw(
        self,
        path: Path | None = None,
        formats=("svg",),
        style: str = "default",
        level: str = "edge",
        max_edges: int = 200,
        max_nodes: int = 30,
    ):
        """The Graphviz diagram (``circuitfinder.graphs.render``); written to ``path.svg`` … when given.

        Returns:
            the ``graphviz.Digraph`` (a notebook shows it), or the written paths when ``path`` is given.
        """
        from circuitfinder.graphs.render import circuit_dot, write_diagram

        dot = circuit_dot(self, style=style, level=level, max_edges=max_edges, max_nodes=max_nodes)
        return dot if path is None else write_diagram(dot, Path(path), formats)

    def _repr_svg_(self) -> str | None:
        """A notebook shows the circuit as its diagram (None, and so the repr, without Graphviz's dot)."""
        import shutil

        if not shutil.which("dot") or not self.n_edges:
            return None
        return self.draw().pipe(format="svg").decode()


def from_networkx(graph: nx.DiGraph, like: Circuit | None = None) -> Circuit:
    """Rebuild the circuit from its node-level graph (the inverse of :meth:`Circuit.to_networkx`).

    Args:
        graph: a graph made by :meth:`Circuit.to_networkx` (possibly a subgraph of one).
        like: take the edge graph, model, task, method and scores from this circuit instead of the
            graph's attributes.
    """
    g = graph.graph
    about = {} if like is not None else {"metadata": dict(g.get("metadata") or {})}  # the graph's own, then
    if like is None:
        shape = ModelShape(
            int(g["n_layers"]),
            int(g["n_heads"]),
            int(g["n_kv_groups"]),
            d_model=int(g.get("d_model") or 0),
            post_norm=bool(g.get("post_norm", False)),
            parallel=bool(g.get("parallel", False)),
            shared_qk_norm=bool(g.get("shared_qk_norm", False)),
        )
        like = Circuit.from_scores(
            EdgeGraph(shape),
            None,
            model=g["model"],
            task=g["task"],
            method=g["method"],
            metadata=dict(g.get("metadata") or {}),
        )
    edges: dict[str, dict] = {}
    for u, v, d in graph.edges(data=True):
        t = graph.nodes[v]
        parts = [(s, d[f"score_{s}"], d.get(f"necessity_{s}")) for s in (d.get("slot") or "")] or [
            (None, d["score"], d.get("necessity"))
        ]
        for slot, score, necessity in parts:
            if slot is None:
                receiver = v
            elif slot == "q":
                receiver = f"{v}<q>"
            else:
                receiver = f"a{t['layer']}.g{like.graph.group_of(t['head'])}<{slot}>"
            e = {"sender": u, "receiver": receiver, "score": float(score)}
            if necessity is not None:
                e["necessity"] = float(necessity)
            edges[f"{u}->{receiver}"] = e
    roles = {}
    for n, d in graph.nodes(data=True):
        scores = {k: v for k, v in d.items() if k not in ("kind", "layer", "head", "role") and v is not None}
        if d.get("kind") == "attn" and (scores or d.get("role") is not None):
            roles[n] = {"role": d.get("role"), **scores}
    rebuilt = Circuit.from_edges(like.graph, list(edges.values()))
    known = ~like.scores.isnan() & ~rebuilt.mask
    return like.replace(
        mask=rebuilt.mask,
        scores=torch.where(known, like.scores, rebuilt.scores),
        necessity=rebuilt.necessity,
        roles=roles,
        **about,
    )


def load_circuit(source: Path) -> Circuit:
    """A circuit from ``circuit.json`` or a run folder; roles from the file, else ``roles.csv`` beside it.

    Raises:
        CircuitFileError: no circuit there, or not a valid circuit file.
    """
    source = Path(source)
    path = source / "circuit.json" if source.is_dir() else source
    if not path.is_file():
        raise CircuitFileError(f"no circuit file at {source} (give a circuit.json file or a run folder holding one)")
    circuit = Circuit.load(path)
    roles = path.parent / "roles.csv"
    if not circuit.roles and roles.is_file():
        import pandas as pd

        circuit = circuit.with_roles(pd.read_csv(roles))
    return circuit


def summary_graph(circuit: Circuit, max_nodes: int = 30, max_links: int | None = None) -> nx.DiGraph:
    """A node-level summary of a large circuit: its heaviest heads and MLPs and links.

    A node's weight is the ``abs_score`` of the edges into and out of it. Kept: the ``max_nodes``
    heaviest heads and MLPs, the input and the logits, and among them the ``max_links`` (default
    2 × ``max_nodes``) links of largest ``abs_score``; the edges they stand for are then pruned to
    input → logits paths (:meth:`Circuit.prune`).
    """
    graph = circuit.to_networkx()
    weight = {
        n: sum(d["abs_score"] for *_, d in graph.in_edges(n, data=True))
        + sum(d["abs_score"] for *_, d in graph.out_edges(n, data=True))
        for n, k in graph.nodes(data="kind")
        if k in ("attn", "mlp")
    }
    keep = sorted(weight, key=lambda n: (-weight[n], n))[:max_nodes] + ["input", "logits"]
    sub = graph.subgraph([n for n in keep if n in graph])
    links = sorted(sub.edges(data="abs_score"), key=lambda e: (-e[2], e[0], e[1]))[: max_links or 2 * max_nodes]
    return from_networkx(sub.edge_subgraph([(u, v) for u, v, _ in links]).copy(), like=circuit).prune().to_networkx()
