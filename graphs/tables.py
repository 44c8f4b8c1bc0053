"""Circuits as tables: every edge's score (``scores.parquet``), the nodes' scores (``nodes.csv``),
and tables a person reads: per-layer counts and the top edges with head roles.

All are pandas DataFrames; :func:`write_tables` saves the readable ones as CSV and Markdown, and
:func:`read_scores` turns ``scores.parquet`` back into a ``[senders, receivers]`` tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.errors import UserError
from circuitfinder.graphs.circuit import Circuit, parse_name


def scores_table(circuit: Circuit) -> pd.DataFrame:
    """One row per edge of the graph: name, sender, receiver, score, rank by |score|, in_circuit."""
    graph = circuit.graph
    s, r = torch.nonzero(graph.allowed, as_tuple=True)
    values = circuit.scores[s, r]
    rank = torch.empty_like(s)
    rank[torch.sort(values.abs(), descending=True, stable=True).indices] = torch.arange(1, len(s) + 1, device="cpu")
    senders = [graph.sender_names[i] for i in s.tolist()]
    receivers = [graph.receiver_names[i] for i in r.tolist()]
    return pd.DataFrame(
        {
            "edge": [f"{a}->{b}" for a, b in zip(senders, receivers)],
            "sender": senders,
            "receiver": receivers,
            "score": values.numpy(),
            "rank": rank.numpy(),
            "in_circuit": circuit.mask[s, r].numpy(),
        }
    )


def read_scores(path: Path, graph: EdgeGraph) -> torch.Tensor:
    """Every edge's score from ``scores.parquet`` as a dense float64 ``[senders, receivers]`` tensor.

    Raises:
        UserError: the table does not score exactly this graph's edges with finite numbers.
    """
    table = pd.read_parquet(path, columns=["edge", "score"])
    if len(table) != graph.n_edges or table["edge"].duplicated().any():
        raise UserError(f"{path} holds {len(table):,} edge scores; this model's graph has {graph.n_edges:,} edges")
    try:
        index = [graph.edge_index(e) for e in table["edge"]]
    except KeyError as exc:
        raise UserError(f"{path} scores an edge this model does not have ({exc.args[0]})") from None
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64, device="cpu")
    scores[[i for i, _ in index], [j for _, j in index]] = torch.tensor(
        table["score"].to_numpy(dtype="float64"), device="cpu"
    )
    if not torch.isfinite(scores[graph.allowed]).all():
        raise UserError(f"{path} holds scores that are not finite numbers")
    return scores


def nodes_table(circuit: Circuit) -> pd.DataFrame:
    """One row per sender node: name, score (the sum of its edge scores), rank by |score|, in_circuit."""
    from circuitfinder.methods.attribution import node_scores

    values = node_scores(circuit.graph, torch.nan_to_num(circuit.scores))
    return pd.DataFrame(
        {
            "node": values.index,
            "score": values.to_numpy(),
            "rank": values.abs().rank(ascending=False, method="first").astype(int).to_numpy(),
            "in_circuit": circuit.mask.any(1).numpy(),
        }
    )


def _fmt(value, floatfmt: str) -> str:
    if value is None or value is pd.NA or isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value).replace("|", "\\|")


def to_markdown(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned; empty cells for None and NaN)."""
    cols = list(frame.columns)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in cols]
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, floatfmt) for v in row) + " |")
    return "\n".join(lines)


def _role(record: Circuit, node: str) -> str:
    return (record.roles.get(node) or {}).get("role") or ""


def layer_table(record: Circuit) -> pd.DataFrame:
    """One row per layer: the circuit's heads (with roles) and MLP there, and its edges in and out.

    ``edges_in`` counts circuit edges whose receiver is in the layer (q/k/v inputs and the MLP's),
    ``edges_out`` those whose sender is; ``abs_score_in`` sums |score| over ``edges_in``.
    """
    graph = record.to_networkx()
    rows = []
    for layer in range(record.n_layers):
        heads = sorted((d["head"], n) for n, d in graph.nodes(data=True) if d["kind"] == "attn" and d["layer"] == layer)
        e_in = [e for e in record.edges if parse_name(e["receiver"]).layer == layer]
        e_out = [e for e in record.edges if e["sender"] != "input" and parse_name(e["sender"]).layer == layer]
        rows.append(
            {
                "layer": layer,
                "heads": len(heads),
                "head_names": ", ".join(n + (f" ({_role(record, n)})" if _role(record, n) else "") for _, n in heads),
                "mlp": f"m{layer}" in graph,
                "edges_in": len(e_in),
                "edges_out": len(e_out),
                "abs_score_in": sum(abs(float(e["score"])) for e in e_in),
            }
        )
    return pd.DataFrame(rows)


def top_edges_table(record: Circuit, n: int = 20) -> pd.DataFrame:
    """The ``n`` edges of largest |score|, with the roles of the heads they join."""
    rows = []
    ranked = sorted(record.strongest(n).edges, key=lambda e: (-abs(e["score"]), e["sender"], e["receiver"]))
    for rank, e in enumerate(ranked, 1):
        r = parse_name(e["receiver"])
        receiver_node = f"a{r.layer}.h{r.head}" if r.kind == "attn" and r.head is not None else e["receiver"]
        rows.append(
            {
                "rank": rank,
                "edge": f"{e['sender']}->{e['receiver']}",
                "score": float(e["score"]),
                "sender_role": _role(record, e["sender"]),
                "receiver_role": _role(record, receiver_node),
            }
            | ({"necessity": e["necessity"]} if "necessity" in e else {})
        )
    return pd.DataFrame(rows)


def write_tables(record: Circuit, folder: Path, top: int = 20, prefix: str = "") -> list[Path]:
    """Write ``layers.csv/.md`` and ``top_edges.csv/.md`` (names after ``prefix``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{record.task} circuit of {record.model} ({record.method}, {record.n_edges:,} edges)"
    written = []
    for name, frame, heading in (
        ("layers", layer_table(record), "per layer"),
        ("top_edges", top_edges_table(record, top), f"the {top} strongest edges"),
    ):
        csv, md = folder / f"{prefix}{name}.csv", folder / f"{prefix}{name}.md"
        frame.to_csv(csv, index=False)
        md.write_text(f"# {title}: {heading}\n\n{to_markdown(frame)}\n")
        written += [csv, md]
    return written
