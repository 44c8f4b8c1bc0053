"""A found circuit as data: JSON on disk, a NetworkX graph in memory.

``circuit.json`` (schema ``circuits/circuit``, version 1) holds the model's shape and the kept
edges, each as ``{"sender": "a0.h3", "receiver": "a5.h1<q>", "score": -0.12}``. Node names
follow DESIGN.md: ``input``, ``a{layer}.h{head}``, ``m{layer}``, ``logits``; a receiver name is
its node plus a slot (``<q>``, ``<k>``, ``<v>``), where k/v slots name the key/value group
(``a5.g1<k>``) under grouped-query attention.

The NetworkX view is node-level: one node per sender/receiver node, one edge per kept circuit
edge, with the receiver slot on the edge. A k/v edge into group g under grouped-query attention
reaches every query head that reads that group; in the graph it points at the group's first
head's node only if no query head of the group is otherwise in the circuit, and at each head of
the group that is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

SCHEMA = "circuits/circuit"
VERSION = 1

_NODE = re.compile(r"^(input|logits|m(?P<ml>\d+)|a(?P<al>\d+)\.(?:h(?P<h>\d+)|g(?P<g>\d+)))(?:<(?P<slot>[qkv])>)?$")


class CircuitFileError(ValueError):
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
    if name.startswith("input"):
        return NodeName("input", layer=-1)
    if name.startswith("logits"):
        return NodeName("logits")
    if m.group("ml") is not None:
        return NodeName("mlp", layer=int(m.group("ml")))
    head = int(m.group("h")) if m.group("h") is not None else None
    group = int(m.group("g")) if m.group("g") is not None else None
    return NodeName("attn", layer=int(m.group("al")), head=head, group=group, slot=m.group("slot"))


@dataclass
class CircuitRecord:
    """What ``circuit.json`` holds."""

    model: str
    task: str
    method: str
    n_layers: int
    n_heads: int
    n_kv_groups: int
    edges: list[dict]  # {"sender", "receiver", "score"}
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> str:
        edges = sorted(self.edges, key=lambda e: (e["sender"], e["receiver"]))
        payload = {
            "schema": SCHEMA,
            "version": VERSION,
            "model": self.model,
            "task": self.task,
            "method": self.method,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_groups": self.n_kv_groups,
            "metadata": self.metadata,
            "edges": [{"sender": e["sender"], "receiver": e["receiver"], "score": float(e["score"])} for e in edges],
        }
        return json.dumps(payload, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "circuit file") -> "CircuitRecord":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CircuitFileError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (ValueError, RecursionError) as exc:  # an integer too long to parse, nesting too deep
            raise CircuitFileError(f"{source} is not valid JSON ({str(exc).split(';')[0] or 'nested too deeply'})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise CircuitFileError(f"{source} is not a circuit file (schema must be {SCHEMA!r})")
        if data.get("version") != VERSION:
            raise CircuitFileError(f"{source} has schema version {data.get('version')!r}; this tool reads {VERSION}")
        missing = [k for k in ("model", "task", "method", "n_layers", "n_heads", "n_kv_groups", "edges") if k not in data]
        if missing:
            raise CircuitFileError(f"{source} lacks the field(s) {', '.join(missing)}")
        for k in ("n_layers", "n_heads", "n_kv_groups"):
            if not isinstance(data[k], int) or isinstance(data[k], bool) or data[k] < 1:
                raise CircuitFileError(f"{source}: {k!r} must be a positive integer, got {data[k]!r}")
        L, H, G = data["n_layers"], data["n_heads"], data["n_kv_groups"]
        if H % G:
            raise CircuitFileError(f"{source}: n_heads {H} is not a multiple of n_kv_groups {G}")
        for k in ("model", "task", "method"):
            if not isinstance(data[k], str):
                raise CircuitFileError(f"{source}: {k!r} must be a string, got {data[k]!r}")
        if not isinstance(data.get("metadata", {}), dict):
            raise CircuitFileError(f"{source}: 'metadata' must be an object")
        edges = data["edges"]
        if not isinstance(edges, list):
            raise CircuitFileError(f"{source}: 'edges' must be a list")
        for k, e in enumerate(edges):
            if not isinstance(e, dict) or not {"sender", "receiver", "score"} <= set(e):
                raise CircuitFileError(f"{source}: edge {k} needs sender, receiver and score")
            parse_name(e["sender"])
            parse_name(e["receiver"])
            score = e["score"]
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise CircuitFileError(f"{source}: edge {k}: score must be a finite number, got {e['score']!r}")
        return cls(
            model=data["model"], task=data["task"], method=data["method"],
            n_layers=int(data["n_layers"]), n_heads=int(data["n_heads"]), n_kv_groups=int(data["n_kv_groups"]),
            edges=edges, metadata=data.get("metadata", {}),
        )

    def top(self, n: int) -> "CircuitRecord":
        """The ``n`` edges of largest ``|score|`` (for drawing large circuits legibly)."""
        edges = sorted(self.edges, key=lambda e: (-abs(float(e["score"])), e["sender"], e["receiver"]))[:n]
        return CircuitRecord(self.model, self.task, self.method, self.n_layers, self.n_heads, self.n_kv_groups,
                             edges, dict(self.metadata))

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "CircuitRecord":
        path = Path(path)
        if not path.is_file():
            raise CircuitFileError(f"no circuit file at {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CircuitFileError(f"{path} is not a circuit file (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise CircuitFileError(f"cannot read {path} ({exc.strerror})") from None
        return cls.from_json(text, source=str(path))

    def to_networkx(self) -> nx.DiGraph:
        """The circuit as a node-level DiGraph.

        Nodes carry ``kind`` (input/attn/mlp/logits), ``layer`` (−1 for input, n_layers for
        logits) and ``head``. Edges carry ``slot`` (q/k/v for attention inputs, None otherwise)
        and ``score``; parallel q/k/v edges between the same two nodes are kept as one edge whose
        ``slots`` lists every slot and whose ``score`` is the sum.
        """
        graph = nx.DiGraph(model=self.model, task=self.task, method=self.method, n_layers=self.n_layers)
        heads_per_group = max(1, self.n_heads // max(1, self.n_kv_groups))

        def add_node(name: str) -> None:
            if name in graph:
                return
            p = parse_name(name)
            layer = self.n_layers if p.kind == "logits" else p.layer
            graph.add_node(name, kind=p.kind, layer=layer, head=p.head)

        in_circuit_heads = {e["sender"] for e in self.edges} | {
            e["receiver"].split("<")[0] for e in self.edges if "<q>" in e["receiver"]
        }
        for e in self.edges:
            add_node(e["sender"])
            r = parse_name(e["receiver"])
            if r.kind == "attn" and r.group is not None:
                heads = [f"a{r.layer}.h{h}" for h in range(r.group * heads_per_group, (r.group + 1) * heads_per_group)]
                targets = [h for h in heads if h in in_circuit_heads] or heads[:1]
            else:
                targets = [e["receiver"].split("<")[0]]
            for t in targets:
                add_node(t)
                if graph.has_edge(e["sender"], t):
                    data = graph.edges[e["sender"], t]
                    data["slots"] = sorted(set(data["slots"]) | {r.slot})
                    data["score"] += float(e["score"])
                else:
                    graph.add_edge(e["sender"], t, slot=r.slot, slots=[r.slot] if r.slot else [], score=float(e["score"]))
        return graph


def on_paths(graph: nx.DiGraph) -> nx.DiGraph:
    """The subgraph of nodes on some ``input`` → ``logits`` path (drops dangling pieces)."""
    if "input" not in graph or "logits" not in graph:
        return graph.subgraph([]).copy()
    keep = (nx.descendants(graph, "input") | {"input"}) & (nx.ancestors(graph, "logits") | {"logits"})
    return graph.subgraph(keep).copy()
