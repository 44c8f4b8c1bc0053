"""Circuits as tables a person can read: per-layer counts and the top edges with head roles.

Both are pandas DataFrames; :func:`write_tables` saves each as CSV and Markdown.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from circuitfinder.graphs.circuit import CircuitRecord, parse_name


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
    lines = ["| " + " | ".join(map(str, cols)) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, floatfmt) for v in row) + " |")
    return "\n".join(lines)


def _role(record: CircuitRecord, node: str) -> str:
    return (record.roles.get(node) or {}).get("role") or ""


def layer_table(record: CircuitRecord) -> pd.DataFrame:
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
        rows.append({
            "layer": layer,
            "heads": len(heads),
            "head_names": ", ".join(n + (f" ({_role(record, n)})" if _role(record, n) else "") for _, n in heads),
            "mlp": f"m{layer}" in graph,
            "edges_in": len(e_in),
            "edges_out": len(e_out),
            "abs_score_in": sum(abs(float(e["score"])) for e in e_in),
        })
    return pd.DataFrame(rows)


def top_edges_table(record: CircuitRecord, n: int = 20) -> pd.DataFrame:
    """The ``n`` edges of largest |score|, with the roles of the heads they join."""
    rows = []
    for rank, e in enumerate(record.top(n).edges, 1):
        r = parse_name(e["receiver"])
        receiver_node = f"a{r.layer}.h{r.head}" if r.kind == "attn" and r.head is not None else e["receiver"]
        rows.append({
            "rank": rank,
            "edge": f"{e['sender']}->{e['receiver']}",
            "score": float(e["score"]),
            "sender_role": _role(record, e["sender"]),
            "receiver_role": _role(record, receiver_node),
        } | ({"necessity": e["necessity"]} if "necessity" in e else {}))
    return pd.DataFrame(rows)


def write_tables(record: CircuitRecord, folder: Path, top: int = 20, prefix: str = "") -> list[Path]:
    """Write ``layers.csv/.md`` and ``top_edges.csv/.md`` (names after ``prefix``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{record.task} circuit of {record.model} ({record.method}, {len(record.edges):,} edges)"
    written = []
    for name, frame, heading in (("layers", layer_table(record), "per layer"),
                                 ("top_edges", top_edges_table(record, top), f"the {top} strongest edges")):
        csv, md = folder / f"{prefix}{name}.csv", folder / f"{prefix}{name}.md"
        frame.to_csv(csv, index=False)
        md.write_text(f"# {title}: {heading}\n\n{to_markdown(frame)}\n")
        written += [csv, md]
    return written
