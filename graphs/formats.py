"""Circuits in other tools' formats: GraphML, and the EAP-IG / MIB graph JSON.

**GraphML** (``networkx.write_graphml``) holds the node-level graph of
:meth:`Circuit.to_networkx` with GraphML-safe values: attributes that are None are left
out (and restored as None on reading), and the record's ``metadata`` is a JSON string. Reading a
file written here and calling :func:`circuitfinder.graphs.circuit.from_networkx` gives the record back exactly.

**EAP-IG / MIB graph JSON** is what ``eap.graph.Graph.to_json`` of Hanna et al.'s EAP-IG writes
and what the MIB circuit track (Mueller et al. 2025) takes as a submission::

    {"cfg": {"n_layers": 30, "n_heads": 9, "parallel_attn_mlp": false, "d_model": 576, ...},
     "nodes": {"input": {"in_graph": true}, "a0.h1": {"in_graph": false}, ..., "logits": {...}},
     "edges": {"input->a0.h1<q>": {"score": -0.01, "in_graph": true}, "a0.h1->m1": {...}, ...}}

An edge may also carry ``"necessity"`` (this tool's; EAP-IG reads only ``score`` and
``in_graph``). Node and edge names are this tool's, except that EAP-IG gives every query head its own key and
value input (TransformerLens's ``ungroup_grouped_query_attention``): ``a3.h4<k>`` rather than
``a3.g1<k>``. Under grouped-query attention a group's k/v edge is written once per query head of
the group, every copy in the circuit if the group edge is, with the group's score split evenly
among them (the last copy takes the rounding remainder, so the copies sum to the group's score
exactly: the gradient on a shared input is the sum of the gradients on its copies). Reading
merges the copies back: the group edge's score is their sum, and it is in the circuit if any
copy is (``metadata["mib_partial_groups"]`` counts groups whose copies disagreed).
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

from circuitfinder.engine.adapter import ModelShape
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.graphs.circuit import Circuit, CircuitFileError, check_edge, parse_name

_NONE_DEFAULTS = ("head", "role", "slot")


def save_graphml(graph: nx.DiGraph, path: Path) -> None:
    """Write a circuit graph as GraphML (None-valued attributes are left out)."""
    g = nx.DiGraph()
    g.graph.update({k: (json.dumps(v) if k == "metadata" else v) for k, v in graph.graph.items() if v is not None})
    for n, d in graph.nodes(data=True):
        g.add_node(n, **{k: v for k, v in d.items() if v is not None})
    for u, v, d in graph.edges(data=True):
        g.add_edge(u, v, **{k: x for k, x in d.items() if x is not None})
    nx.write_graphml(g, path)


def load_graphml(path: Path) -> nx.DiGraph:
    """Read a circuit graph written by :func:`save_graphml` (attributes as they were)."""
    try:
        g = nx.read_graphml(path)
    except Exception as exc:  # noqa: BLE001 - parse errors of several kinds; say which file
        raise CircuitFileError(f"{path} is not a GraphML file ({exc})") from None
    if not g.is_directed() or "n_layers" not in g.graph:
        raise CircuitFileError(f"{path} is not a circuit graph written by this tool (no n_layers)")
    g.graph.pop("node_default", None), g.graph.pop("edge_default", None)
    g.graph["metadata"] = json.loads(g.graph.get("metadata", "{}"))
    for _, d in g.nodes(data=True):
        for k in _NONE_DEFAULTS[:2]:
            d.setdefault(k, None)
    for *_, d in g.edges(data=True):
        d.setdefault("slot", None)
    return g


# ---------------------------------------------------------------------------------------------
# EAP-IG / MIB graph JSON
# ---------------------------------------------------------------------------------------------


def _split(score: float, n: int) -> list[float]:
    """``n`` parts of ``score`` whose left-to-right float sum is exactly ``score``.

    The first n−1 parts are score/n; their sum ``acc`` lies within a factor of two of ``score``,
    so ``score − acc`` is exact (Sterbenz), and so is ``acc + (score − acc)``.
    """
    if n == 1:
        return [score]
    part = score / n
    acc = 0.0
    for _ in range(n - 1):
        acc += part
    return [part] * (n - 1) + [score - acc]


def _mib_receivers(receiver: str, graph: EdgeGraph) -> list[str]:
    """EAP-IG's name(s) for one of our receivers: a k/v group becomes one input per query head."""
    p = parse_name(receiver)
    if p.kind != "attn" or p.slot == "q":
        return [receiver]
    return [f"a{p.layer}.h{h}<{p.slot}>" for h in graph.group_heads(p.group)]


def to_mib(record: Circuit, scores: dict[str, float] | None = None, d_model: int | None = None) -> dict:
    """The circuit as an EAP-IG / MIB graph JSON object (see the module docstring).

    Args:
        record: the circuit (its edges are ``in_graph``).
        scores: every edge's score by name (a run's ``scores.parquet``), so that the file holds the
            whole graph as MIB expects; without it only the circuit's edges are written.
        d_model: the model's width, which EAP-IG's ``Graph.from_json`` needs; taken from
            ``record.metadata["d_model"]`` or the bundled models' table when not given.
    """
    if d_model is None:
        d_model = record.metadata.get("d_model") or record.shape.d_model or None
    if d_model is None:
        from circuitfinder.engine.models import BUNDLED

        spec = BUNDLED.get(record.model)
        d_model = spec.shape[3] if spec else None
    all_scores = dict(scores or {})
    kept, necessity = set(), {}
    for e in record.edges:
        name = f"{e['sender']}->{e['receiver']}"
        all_scores[name] = float(e["score"])
        kept.add(name)
        if e.get("necessity") is not None:
            necessity[name] = float(e["necessity"])
    edges: dict[str, dict] = {}
    for name in sorted(all_scores):
        sender, _, receiver = name.partition("->")
        targets = _mib_receivers(receiver, record.graph)
        parts = _split(float(all_scores[name]), len(targets))
        extra = _split(necessity[name], len(targets)) if name in necessity else [None] * len(targets)
        for target, part, nec in zip(targets, parts, extra):
            edges[f"{sender}->{target}"] = {"score": part, "in_graph": name in kept} | (
                {} if nec is None else {"necessity": nec}
            )
    graph = record.to_networkx()
    nodes = {"input": {"in_graph": True}}
    for layer in range(record.n_layers):
        for h in range(record.n_heads):
            nodes[f"a{layer}.h{h}"] = {"in_graph": f"a{layer}.h{h}" in graph}
        nodes[f"m{layer}"] = {"in_graph": f"m{layer}" in graph}
    nodes["logits"] = {"in_graph": True}
    cfg = {
        "n_layers": record.n_layers,
        "n_heads": record.n_heads,
        "parallel_attn_mlp": False,
        "n_key_value_heads": record.n_kv_groups,
    }
    if d_model is not None:
        cfg["d_model"] = int(d_model)
    return {
        "cfg": cfg,
        "nodes": nodes,
        "edges": edges,
        "circuits": {"model": record.model, "task": record.task, "method": record.method, "metadata": record.metadata},
    }


def _merged(groups: dict[str, list[tuple]]) -> tuple[list[dict], int]:
    """One edge per key/value group from EAP-IG's per-head edges: kept when any of its heads' edges
    is in the graph, with their scores (and necessities) summed; and how many groups were split."""
    kept, partial = [], 0
    for name, parts in sorted(groups.items()):
        flags = {flag for _, flag, _ in parts}
        partial += len(flags) > 1
        if True in flags:
            score, necessity = 0.0, None
            for s, _, nec in parts:
                score += s
                if isinstance(nec, (int, float)) and not isinstance(nec, bool):
                    necessity = (necessity or 0.0) + nec
            sender, _, receiver = name.partition("->")
            kept.append(
                {"sender": sender, "receiver": receiver, "score": score}
                | ({} if necessity is None else {"necessity": necessity})
            )
    return kept, partial


def from_mib(
    data: dict, source: str = "graph file", model: str | None = None, task: str | None = None, method: str | None = None
) -> Circuit:
    """Read an EAP-IG / MIB graph JSON object: the edges with ``in_graph`` true become the circuit.

    Raises:
        CircuitFileError: a missing key, a malformed edge name or entry, or a name outside the model.
    """
    if not isinstance(data, dict):
        raise CircuitFileError(f"{source} is not an EAP-IG/MIB graph (expected a JSON object)")
    missing = [k for k in ("cfg", "nodes", "edges") if k not in data]
    if missing:
        raise CircuitFileError(f"{source} is not an EAP-IG/MIB graph: it lacks {', '.join(missing)}")
    cfg, edges = data["cfg"], data["edges"]
    for k in ("n_layers", "n_heads"):
        if not isinstance(cfg, dict) or not isinstance(cfg.get(k), int) or cfg[k] < 1:
            raise CircuitFileError(f"{source}: cfg.{k} must be a positive integer")
    if cfg.get("parallel_attn_mlp"):
        raise CircuitFileError(f"{source}: models with parallel attention and MLP are not supported")
    L, H = cfg["n_layers"], cfg["n_heads"]
    G = cfg.get("n_key_value_heads") or H
    if not isinstance(G, int) or H % G:
        raise CircuitFileError(f"{source}: cfg.n_key_value_heads {G!r} does not divide n_heads {H}")
    if not isinstance(edges, dict):
        raise CircuitFileError(f"{source}: 'edges' must be an object mapping edge names to {{score, in_graph}}")
    graph = EdgeGraph(ModelShape(L, H, G, d_model=0))  # the width, when given, is kept in the metadata
    groups: dict[str, list[tuple[float, bool]]] = {}
    for name, info in edges.items():
        sender, arrow, receiver = name.partition("->")
        if not arrow or not isinstance(info, dict) or "in_graph" not in info:
            raise CircuitFileError(f"{source}: edge {name!r} needs a name 'sender->receiver' and an in_graph value")
        try:
            r = parse_name(receiver)
        except CircuitFileError as exc:
            raise CircuitFileError(f"{source}: edge {name!r}: {exc}") from None
        if r.kind == "attn" and r.slot in ("k", "v"):
            if r.head is None:
                raise CircuitFileError(
                    f"{source}: edge {name!r}: EAP-IG names key/value inputs by head (a{{l}}.h{{h}}<k>)"
                )
            if r.head >= H:
                raise CircuitFileError(f"{source}: edge {name!r}: head {r.head} but the model has {H} per layer")
            receiver = f"a{r.layer}.g{graph.group_of(r.head)}<{r.slot}>"
        problem = check_edge(graph, sender, receiver)
        if problem:
            raise CircuitFileError(f"{source}: edge {name!r}: {problem}")
        score = info.get("score", 0.0)
        if score is None or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise CircuitFileError(f"{source}: edge {name!r}: score must be a number, got {score!r}")
        groups.setdefault(f"{sender}->{receiver}", []).append(
            (float(score), bool(info["in_graph"]), info.get("necessity"))
        )
    kept, partial = _merged(groups)
    info = data.get("circuits", {}) if isinstance(data.get("circuits"), dict) else {}
    metadata = dict(info.get("metadata") or {})
    if partial:
        metadata["mib_partial_groups"] = partial
    if "d_model" in cfg and "d_model" not in metadata and not info:
        metadata["d_model"] = cfg["d_model"]
    return Circuit.from_edges(
        graph,
        kept,
        model=model or info.get("model", "unknown"),
        task=task or info.get("task", "unknown"),
        method=method or info.get("method", "unknown"),
        metadata=metadata,
    )


def save_mib(record: Circuit, path: Path, scores: dict[str, float] | None = None, d_model: int | None = None) -> None:
    Path(path).write_text(json.dumps(to_mib(record, scores, d_model)) + "\n")


def load_mib(path: Path, **names) -> Circuit:
    path = Path(path)
    if not path.is_file():
        raise CircuitFileError(f"no graph file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CircuitFileError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return from_mib(data, source=str(path), **names)
