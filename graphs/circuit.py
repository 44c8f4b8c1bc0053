"""A found circuit as data: JSON on disk, a NetworkX graph in memory.

``circuit.json`` (schema ``circuits/circuit``, version 1) holds the model's shape and the kept
edges, each as ``{"sender": "a0.h3", "receiver": "a5.h1<q>", "score": -0.12}`` with an optional
``"necessity"`` (the metric's change when that edge alone is removed from the circuit), and an
optional ``"roles"`` object (head name → role scores and label, see ``circuitfinder.graphs.roles``). Node
names follow DESIGN.md: ``input``, ``a{layer}.h{head}``, ``m{layer}``, ``logits``; a receiver
name is its node plus a slot (``<q>``, ``<k>``, ``<v>``), where k/v slots name the key/value
group (``a5.g1<k>``) under grouped-query attention.

The NetworkX view (:meth:`CircuitRecord.to_networkx`) is the circuit merged to node level:
heads and MLPs are the units, and the circuit's edges between two units become one graph edge
that keeps every part (per-slot scores), so the record can be rebuilt from it exactly
(:func:`from_networkx`). Attributes:

* node: ``kind`` (input/attn/mlp/logits), ``layer`` (−1 for input, ``n_layers`` for logits),
  ``head`` (None unless attn), ``role`` (a label or None) and any role scores;
* edge: ``slot`` (``"q"``, ``"kv"``, … the receiving head inputs, in q, k, v order; None for MLP
  and logits receivers), ``score`` (sum over slots, signed), ``score_q``/``score_k``/``score_v``
  (per slot), ``abs_score`` (sum of |score| of the merged edges), ``count`` (how many circuit
  edges it stands for), and ``necessity`` (and ``necessity_q`` …) when the record has it.

A k/v edge into group g reaches every query head that reads that group; in the graph it points
at each head of the group that is otherwise in the circuit, or at the group's first head if none
is (each copy carries the group edge's score).
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
SLOTS = "qkv"

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


def check_edge(sender: str, receiver: str, n_layers: int, n_heads: int, n_kv_groups: int, parallel: bool = False) -> str | None:
    """What is wrong with an edge of a model of this shape, or None if it is an edge of its graph
    (``parallel``: a layer's MLP reads no head of its layer, ``circuitfinder.engine.graph``)."""
    try:
        s, r = parse_name(sender), parse_name(receiver)
    except CircuitFileError as exc:
        return str(exc)
    if s.kind == "logits" or s.slot or s.group is not None:
        return f"{sender!r} is not a sender (input, a{{l}}.h{{h}} or m{{l}})"
    if r.kind == "input" or (r.kind == "attn" and not r.slot):
        return f"{receiver!r} is not a receiver (a{{l}}.h{{h}}<q>, a{{l}}.g{{g}}<k|v>, m{{l}} or logits)"
    if r.kind == "attn" and (r.slot == "q") != (r.head is not None):
        return f"{receiver!r}: a query input names its head (a{{l}}.h{{h}}<q>), a key/value input its group (a{{l}}.g{{g}}<k>)"
    for p, name in ((s, sender), (r, receiver)):
        if p.layer is not None and p.layer >= n_layers:
            return f"{name!r}: layer {p.layer} but the model has {n_layers}"
        if p.head is not None and p.head >= n_heads:
            return f"{name!r}: head {p.head} but the model has {n_heads} per layer"
        if p.group is not None and p.group >= n_kv_groups:
            return f"{name!r}: key/value group {p.group} but the model has {n_kv_groups} per layer"
    if r.kind == "attn" and s.layer >= r.layer or r.kind == "mlp" and (s.layer > r.layer or s.kind == "mlp" and s.layer == r.layer):
        return f"{sender!r} is not computed before {receiver!r}"
    if parallel and r.kind == "mlp" and s.kind == "attn" and s.layer == r.layer:
        return f"{sender!r} does not reach {receiver!r}: the model's blocks are parallel"
    return None


@dataclass
class CircuitRecord:
    """What ``circuit.json`` holds: the model's shape, the kept edges, and optional head roles."""

    model: str
    task: str
    method: str
    n_layers: int
    n_heads: int
    n_kv_groups: int
    edges: list[dict]  # {"sender", "receiver", "score"[, "necessity"]}
    metadata: dict = field(default_factory=dict)
    roles: dict[str, dict] = field(default_factory=dict)  # head in the circuit -> {"role": str|None, score name: float}
    parallel: bool = False  # parallel blocks: no head -> same-layer MLP edge (written only when true)

    @property
    def heads_per_group(self) -> int:
        return max(1, self.n_heads // max(1, self.n_kv_groups))

    def edge_names(self) -> list[str]:
        return [f"{e['sender']}->{e['receiver']}" for e in self.edges]

    def nodes(self) -> set[str]:
        """Heads and MLPs the circuit touches (as senders, or through their inputs)."""
        g = self.to_networkx()
        return {n for n, d in g.nodes(data=True) if d["kind"] in ("attn", "mlp")}

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
            **({"parallel": True} if self.parallel else {}),
            "metadata": self.metadata,
            "edges": [{"sender": e["sender"], "receiver": e["receiver"], "score": float(e["score"])}
                      | ({"necessity": float(e["necessity"])} if e.get("necessity") is not None else {})
                      for e in edges],
        }
        if self.roles:
            payload["roles"] = {k: self.roles[k] for k in sorted(self.roles)}
        return json.dumps(payload, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "circuit file") -> "CircuitRecord":
        """Read ``circuit.json`` text, checking everything and naming the first thing wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CircuitFileError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (ValueError, RecursionError) as exc:  # an integer too long to parse, nesting too deep
            raise CircuitFileError(f"{source} is not valid JSON ({str(exc).split(';')[0] or 'nested too deeply'})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            hint = " (an EAP-IG/MIB graph? use `circuits convert`)" if isinstance(data, dict) and "cfg" in data else ""
            raise CircuitFileError(f"{source} is not a circuit file (schema must be {SCHEMA!r}){hint}")
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
        parallel = data.get("parallel", False)
        if not isinstance(parallel, bool):
            raise CircuitFileError(f"{source}: 'parallel' must be true or false, got {parallel!r}")
        for k in ("model", "task", "method"):
            if not isinstance(data[k], str):
                raise CircuitFileError(f"{source}: {k!r} must be a string, got {data[k]!r}")
        if not isinstance(data.get("metadata", {}), dict):
            raise CircuitFileError(f"{source}: 'metadata' must be an object")
        edges = data["edges"]
        if not isinstance(edges, list):
            raise CircuitFileError(f"{source}: 'edges' must be a list")
        seen = set()
        for k, e in enumerate(edges):
            if not isinstance(e, dict) or not {"sender", "receiver", "score"} <= set(e):
                raise CircuitFileError(f"{source}: edge {k} needs sender, receiver and score")
            name = f"{e['sender']}->{e['receiver']}"
            problem = check_edge(e["sender"], e["receiver"], L, H, G, parallel)
            if problem:
                raise CircuitFileError(f"{source}: edge {k} ({name}): {problem}")
            for key in ("score", "necessity"):
                if key in e and not (_number(e[key]) or key == "necessity" and e[key] is None):
                    raise CircuitFileError(f"{source}: edge {k} ({name}): {key} must be a finite number, got {e[key]!r}")
            if name in seen:
                raise CircuitFileError(f"{source}: edge {k} ({name}) appears twice")
            seen.add(name)
        roles = data.get("roles", {})
        if not isinstance(roles, dict) or not all(isinstance(v, dict) for v in roles.values()):
            raise CircuitFileError(f"{source}: 'roles' must map head names to objects")
        for name in roles:
            p = parse_name(name)
            if p.kind != "attn" or p.head is None or p.slot or p.layer >= L or p.head >= H:
                raise CircuitFileError(f"{source}: roles: {name!r} is not a head of this model")
        roles = {k: {"role": v.get("role"), **{s: x for s, x in v.items() if s != "role"}} for k, v in roles.items()}
        return cls(
            model=data["model"], task=data["task"], method=data["method"], n_layers=L, n_heads=H, n_kv_groups=G,
            edges=edges, metadata=data.get("metadata", {}), roles=roles, parallel=parallel,
        )

    def with_edges(self, edges: list[dict]) -> "CircuitRecord":
        """The same circuit description with other edges (roles and metadata copied)."""
        return CircuitRecord(self.model, self.task, self.method, self.n_layers, self.n_heads, self.n_kv_groups,
                             edges, dict(self.metadata), dict(self.roles), self.parallel)

    def top(self, n: int) -> "CircuitRecord":
        """The ``n`` edges of largest ``|score|`` (for drawing large circuits legibly)."""
        return self.with_edges(sorted(self.edges, key=lambda e: (-abs(float(e["score"])), e["sender"], e["receiver"]))[:n])

    def pruned(self) -> "CircuitRecord":
        """Only the edges on some ``input`` → ``logits`` path (see :func:`on_paths`)."""
        return from_networkx(on_paths(self.to_networkx()), like=self)

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
        """The circuit merged to node level, losslessly (see the module docstring)."""
        graph = nx.DiGraph(model=self.model, task=self.task, method=self.method, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_groups=self.n_kv_groups, metadata=dict(self.metadata))
        hpg = self.heads_per_group

        def add_node(name: str) -> None:
            if name in graph:
                return
            p = parse_name(name)
            layer = self.n_layers if p.kind == "logits" else p.layer
            info = dict(self.roles.get(name, {}))
            graph.add_node(name, kind=p.kind, layer=layer, head=p.head, role=info.pop("role", None), **info)

        in_circuit_heads = {e["sender"] for e in self.edges} | {
            e["receiver"].split("<")[0] for e in self.edges if "<q>" in e["receiver"]
        }
        for e in sorted(self.edges, key=lambda e: (e["sender"], e["receiver"])):
            add_node(e["sender"])
            r = parse_name(e["receiver"])
            if r.kind == "attn" and r.group is not None:
                heads = [f"a{r.layer}.h{h}" for h in range(r.group * hpg, (r.group + 1) * hpg)]
                targets = [h for h in heads if h in in_circuit_heads] or heads[:1]
            else:
                targets = [e["receiver"].split("<")[0]]
            score = float(e["score"])
            necessity = e.get("necessity")
            for t in targets:
                add_node(t)
                if not graph.has_edge(e["sender"], t):
                    graph.add_edge(e["sender"], t, slot=None, score=0.0, abs_score=0.0, count=0)
                d = graph.edges[e["sender"], t]
                d["score"] += score
                d["abs_score"] += abs(score)
                d["count"] += 1
                if necessity is not None:
                    d["necessity"] = d.get("necessity", 0.0) + float(necessity)
                if r.slot:
                    d["slot"] = "".join(s for s in SLOTS if s in (d["slot"] or "") + r.slot)
                    d[f"score_{r.slot}"] = score
                    if necessity is not None:
                        d[f"necessity_{r.slot}"] = float(necessity)
        return graph


def from_networkx(graph: nx.DiGraph, like: CircuitRecord | None = None) -> CircuitRecord:
    """Rebuild the record from its node-level graph (the inverse of ``to_networkx``).

    Args:
        graph: a graph made by :meth:`CircuitRecord.to_networkx` (possibly a subgraph of one).
        like: take model, task, method and shape from this record instead of the graph's attributes.
    """
    g = graph.graph
    src = like or CircuitRecord(g["model"], g["task"], g["method"], int(g["n_layers"]), int(g["n_heads"]),
                                int(g["n_kv_groups"]), [], dict(g.get("metadata") or {}))
    hpg = src.heads_per_group
    edges: dict[str, dict] = {}
    for u, v, d in graph.edges(data=True):
        t = graph.nodes[v]
        parts = [(s, d[f"score_{s}"], d.get(f"necessity_{s}")) for s in (d.get("slot") or "")] or [(None, d["score"], d.get("necessity"))]
        for slot, score, necessity in parts:
            if slot is None:
                receiver = v
            elif slot == "q":
                receiver = f"{v}<q>"
            else:
                receiver = f"a{t['layer']}.g{t['head'] // hpg}<{slot}>"
            e = {"sender": u, "receiver": receiver, "score": float(score)}
            if necessity is not None:
                e["necessity"] = float(necessity)
            edges[f"{u}->{receiver}"] = e
    roles = {}
    for n, d in graph.nodes(data=True):
        scores = {k: v for k, v in d.items() if k not in ("kind", "layer", "head", "role") and v is not None}
        if d.get("kind") == "attn" and (scores or d.get("role") is not None):
            roles[n] = {"role": d.get("role"), **scores}
    out = src.with_edges(sorted(edges.values(), key=lambda e: (e["sender"], e["receiver"])))
    out.roles = roles
    return out


def attach_roles(record: CircuitRecord, table) -> None:
    """Put the role labels and scores of the circuit's heads into ``record.roles``.

    Args:
        record: the circuit; only its heads get roles (NaN scores are left out).
        table: rows with ``node``, ``role`` and score columns (``circuitfinder.graphs.roles.measure_roles``'s
            DataFrame, or ``roles.csv`` read back); ``layer`` and ``head`` are skipped.
    """
    heads = {n for n, k in record.to_networkx().nodes(data="kind") if k == "attn"}
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
    record.roles = roles


def load_circuit(source: Path) -> CircuitRecord:
    """A circuit from ``circuit.json`` or a run folder; roles from the record, else ``roles.csv`` beside it.

    Raises:
        CircuitFileError: no circuit there, or not a valid circuit file.
    """
    source = Path(source)
    path = source / "circuit.json" if source.is_dir() else source
    if not path.is_file():
        raise CircuitFileError(f"no circuit file at {source} (give a circuit.json file or a run folder holding one)")
    record = CircuitRecord.load(path)
    roles = path.parent / "roles.csv"
    if not record.roles and roles.is_file():
        import pandas as pd

        attach_roles(record, pd.read_csv(roles))
    return record


def on_paths(graph: nx.DiGraph) -> nx.DiGraph:
    """The subgraph of nodes on some ``input`` → ``logits`` path (drops dangling pieces).

    A node no path from the input reaches reads only patched (corrupted) values, and a node with
    no path to the logits cannot affect them through the circuit: removing both changes nothing.
    """
    if "input" not in graph or "logits" not in graph:
        return graph.subgraph([]).copy()
    keep = (nx.descendants(graph, "input") | {"input"}) & (nx.ancestors(graph, "logits") | {"logits"})
    return graph.subgraph(keep).copy()


def summary_graph(graph: nx.DiGraph, max_nodes: int = 30, max_links: int | None = None) -> nx.DiGraph:
    """A node-level summary of a large circuit: its heaviest heads and MLPs and links.

    A node's weight is the ``abs_score`` of the edges into and out of it. Kept: the ``max_nodes``
    heaviest heads and MLPs, the input and the logits, and among them the ``max_links`` (default
    2 × ``max_nodes``) links of largest ``abs_score``, restricted to input → logits paths.
    """
    weight = {n: sum(d["abs_score"] for *_, d in graph.in_edges(n, data=True))
              + sum(d["abs_score"] for *_, d in graph.out_edges(n, data=True))
              for n, k in graph.nodes(data="kind") if k in ("attn", "mlp")}
    keep = sorted(weight, key=lambda n: (-weight[n], n))[:max_nodes] + ["input", "logits"]
    sub = graph.subgraph([n for n in keep if n in graph])
    links = sorted(sub.edges(data="abs_score"), key=lambda e: (-e[2], e[0], e[1]))[: max_links or 2 * max_nodes]
    return on_paths(sub.edge_subgraph([(u, v) for u, v, _ in links]).copy())
