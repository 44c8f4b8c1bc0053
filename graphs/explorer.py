"""An interactive circuit explorer: one self-contained HTML page per run folder (``circuit.html``).

:func:`write_explorer` reads a run folder and writes one HTML file that opens from disk with no
network: the page's script, style and data are all inlined. :func:`write_compare_page` draws two
circuits on one layout, coloured by which of them holds each edge.

**What the page shows.** The run's scored edges (``scores.parquet``; without it, only the
circuit's own edges are known), drawn with data flowing upwards: the input at the bottom, the
logits at the top, one rank per layer. A control picks the edges drawn: the circuit's own
(the default view), the top N by |score| among all scored edges, or every edge with
|score| ≥ a threshold; the held-out faithfulness at that size is read from ``curve.csv`` (the
curve's point at that size, or interpolated between its two neighbours, and the page says
which). Edges of the circuit are opaque, other edges faint; blue edges support the behaviour
(score < 0), red ones oppose it, as in ``circuitfinder.graphs.render``. Hovering an edge shows
its score, rank, sign and, where the run has them, its necessity (``necessity.csv``'s
metric_drop) and exact effect (``validation.csv``). Clicking a node opens a panel with its role
and role scores (``roles.csv``, else ``circuit.json``'s roles), its edges highlighted, and for
a head its attention pattern on a few prompts when the caller passes ``attention``. Edge level
draws every edge (a key/value group's input drawn to the group's first head in the view);
node level one link per pair of units with summed |score|, as ``to_networkx`` and
``summary_graph`` merge them. The view exports as SVG (built from the drawn positions) and PNG
(``cy.png``).

**Layout.** Cytoscape.js (vendored under ``graphs/assets``, see its README) draws, pans and
zooms. Positions are a preset: y from the layer (the MLP of a layer a little above its heads),
x from the head index (heads grouped by key/value group, the MLP at the right), so a node keeps
its place whatever edges are shown and a layer is one horizontal band. Why not dagre's own
layout: the ranks are already known, while dagre derives ranks from edge lengths (so a node's
rank would shift as edges come and go) and needs seconds for a few hundred links, since an edge
across many layers becomes a chain of dummy nodes. So the vendored cytoscape-dagre (with dagre)
does only what it adds: the "order within layers by dagre" option, where dagre orders the nodes
within each rank to reduce crossings (its ranks fixed through ``minLen``) and y is then set back
from the layer; it is skipped above 400 drawn links. Drawing only: edges along one column bow
sideways so as not to cross the nodes between their ends, and above 1,500 drawn edges lines are
straight, without arrows.

**Size.** The 2,000 edges of largest |score| are embedded in full; the rest as compact arrays
(sender and receiver indices, scores rounded to 4 significant digits) in a separate JSON block
that the page parses only when the control asks for more edges. With all 70,651 scored edges of
SmolLM2 the page is about 1.7 MB (0.5 MB of it the libraries) and opens in about 2 s; drawing
thousands of edges takes seconds more (the page says so above 5,000), node level is lighter.

**Attention patterns** (the ``attention`` argument) are a dict from head name to the patterns
of a few prompts::

    {"a9.h6": {"tokens": [["When", " Mary", ...], ...],        # one token list per prompt
               "patterns": [[[1.0, 0.0, ...], ...], ...],      # per prompt [query][key] weights
               "labels": ["prompt 0", ...]}}                   # optional caption per prompt

``patterns[p]`` has one row per query position and one column per key position, each
``len(tokens[p])`` long (rows may be fewer: only the last query positions); arrays and tensors
are taken too (anything with ``tolist``). Weights are rounded to 3 decimals.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from circuitfinder.graphs.circuit import Circuit, load_circuit, parse_name

ASSETS = Path(__file__).with_name("assets")
LIBRARIES = ("cytoscape.min.js", "cytoscape-dagre.min.js")
FULL_EDGES = 2000  # edges embedded in full precision; the rest compact, parsed on demand
SUMMARY_KEYS = (
    "faithfulness",
    "metric",
    "ablation",
    "edges_total",
    "edges_kept",
    "nodes_kept",
    "target_faithfulness",
    "meets_target",
    "cpr",
    "cmd",
    "accuracy_clean",
    "prompts_heldout",
)


def _script_json(data) -> str:
    """JSON safe inside a ``<script>`` element: every ``<`` escaped, so no ``</script>`` or ``<!--``."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _sig(value: float, digits: int = 4) -> float:
    """A float rounded to ``digits`` significant digits."""
    return float(f"{value:.{digits}g}")


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.is_file() else None
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def _about(circuit: Circuit) -> dict:
    """The model's shape and what made the circuit."""
    return {
        "model": circuit.model,
        "task": circuit.task,
        "method": circuit.method,
        "n_layers": circuit.n_layers,
        "n_heads": circuit.n_heads,
        "n_kv_groups": circuit.n_kv_groups,
        "parallel": circuit.parallel,
    }


def _ranked_scores(run_dir: Path, circuit: Circuit) -> tuple[pd.DataFrame, str]:
    """Every scored edge (name, sender, receiver, score) ordered by |score|, largest first.

    Scores come from ``scores.parquet`` with the circuit's own scores for its edges (as
    ``Run.load`` merges them); without the parquet file, the circuit's edges only. Ties keep the
    file's ``rank`` order (``scores_table``'s), else file order.
    """
    own = pd.DataFrame(list(circuit.edges), columns=["sender", "receiver", "score"])
    own["edge"] = own["sender"] + "->" + own["receiver"]
    path = run_dir / "scores.parquet"
    source = "circuit.json"
    frame = own
    if path.is_file():
        table = pd.read_parquet(path)
        if "sender" not in table or "receiver" not in table:
            table[["sender", "receiver"]] = table["edge"].str.split("->", n=1, expand=True)
        if "rank" in table:
            table = table.sort_values("rank", kind="stable")
        table = table[["edge", "sender", "receiver", "score"]].copy()
        table = table[pd.to_numeric(table["score"], errors="coerce").notna()]
        mine = dict(zip(own["edge"], own["score"]))
        table["score"] = [mine.get(e, s) for e, s in zip(table["edge"], table["score"].astype(float))]
        known = set(table["edge"])
        frame = pd.concat([table, own[[e not in known for e in own["edge"]]]], ignore_index=True)
        source = "scores.parquet"
    frame = frame.assign(score=frame["score"].astype(float))
    order = (-frame["score"].abs()).to_numpy().argsort(kind="stable")  # ties keep their order
    return frame.iloc[order].reset_index(drop=True), source


def _roles(run_dir: Path, circuit: Circuit) -> tuple[dict, list[str]]:
    """Head name → role entry (``roles.csv`` for every head when present, else the circuit's)."""
    table = _read_csv(run_dir / "roles.csv")
    roles = {}
    if table is not None and "node" in table:
        for row in table.to_dict("records"):
            role = row.get("role")
            entry = {"role": role if isinstance(role, str) and role else None}
            entry |= {
                k: _finite(v)
                for k, v in row.items()
                if k not in ("node", "layer", "head", "role") and _finite(v) is not None
            }
            roles[str(row["node"])] = entry
    if not roles:
        roles = {
            k: {kk: (vv if kk == "role" or _finite(vv) is None else _finite(vv)) for kk, vv in v.items()}
            for k, v in circuit.roles.items()
        }
    columns = sorted({k for v in roles.values() for k in v if k != "role"})
    return roles, columns


def _curve(run_dir: Path) -> list[dict]:
    """``curve.csv``'s points (top_n, edges_kept, faithfulness, percent), by size."""
    table = _read_csv(run_dir / "curve.csv")
    if table is None or not {"top_n", "faithfulness"} <= set(table):
        return []
    rows = []
    for row in table.sort_values("top_n").to_dict("records"):
        top_n, faith = _finite(row.get("top_n")), _finite(row.get("faithfulness"))
        if top_n is not None and faith is not None:
            rows.append(
                {
                    "top_n": int(top_n),
                    "faithfulness": faith,
                    "edges_kept": _finite(row.get("edges_kept")),
                    "percent": _finite(row.get("percent")),
                }
            )
    return rows


def _per_edge(run_dir: Path, name: str, columns: tuple[str, ...], index: dict[str, int]) -> dict:
    """Columns of ``necessity.csv`` / ``validation.csv`` by edge rank: ``{"i": [...], column: [...]}``."""
    table = _read_csv(run_dir / name)
    out = {"i": []} | {c: [] for c in columns}
    if table is None or "edge" not in table or not set(columns) & set(table):
        return out
    for row in table.to_dict("records"):
        i = index.get(str(row["edge"]))
        if i is None:
            continue
        out["i"].append(i)
        for c in columns:
            out[c].append(_finite(row.get(c)))
    return out


def check_attention(attention: dict | None) -> dict:
    """The ``attention`` argument checked and made plain JSON (see the module docstring).

    Raises:
        ValueError: a key that is not a head name, or tokens and patterns that do not fit.
    """
    out = {}
    for head, entry in (attention or {}).items():
        p = parse_name(head)
        if p.kind != "attn" or p.head is None or p.slot:
            raise ValueError(f"attention: {head!r} is not a head name (a{{layer}}.h{{head}})")
        plain = lambda x: x.tolist() if hasattr(x, "tolist") else x  # noqa: E731 - arrays and tensors
        tokens, patterns = plain(entry.get("tokens")), plain(entry.get("patterns"))
        if not isinstance(tokens, list) or not isinstance(patterns, list) or len(tokens) != len(patterns):
            raise ValueError(f"attention[{head!r}]: needs 'tokens' and 'patterns', one entry per prompt each")
        labels = list(entry.get("labels") or [f"prompt {k}" for k in range(len(tokens))])
        rows = []
        for k, (toks, pattern) in enumerate(zip(tokens, patterns)):
            toks, pattern = [str(t) for t in plain(toks)], [plain(r) for r in plain(pattern)]
            if not pattern or len(pattern) > len(toks) or any(len(r) != len(toks) for r in pattern):
                raise ValueError(
                    f"attention[{head!r}]: prompt {k} has {len(toks)} tokens, so its pattern must have "
                    f"at most {len(toks)} rows of {len(toks)} weights [query][key]"
                )
            rows.append([[round(float(w), 3) for w in r] for r in pattern])
        out[head] = {
            "tokens": [[str(t) for t in plain(x)] for x in tokens],
            "patterns": rows,
            "labels": [str(x) for x in labels],
        }
    return out


def explorer_data(run_dir: Path, attention: dict | None = None, full_edges: int = FULL_EDGES) -> tuple[dict, dict]:
    """What the page embeds: the main data (always parsed) and the compact rest (parsed on demand).

    Edges are numbered by rank (0 = largest |score|). ``top`` holds the first ``full_edges`` as
    sender and receiver indices (into ``senders``/``receivers``) and full scores; ``rest`` the
    others, scores to 4 significant digits; ``circuit`` the circuit's own edges (their ranks and
    full scores), so the default view never needs ``rest``.
    """
    run_dir = Path(run_dir)
    circuit = load_circuit(run_dir)
    summary = _read_json(run_dir / "summary.json")
    ranked, source = _ranked_scores(run_dir, circuit)
    senders = sorted(set(ranked["sender"]), key=lambda n: _node_key(n))
    receivers = sorted(set(ranked["receiver"]), key=lambda n: _node_key(n))
    si, ri = {n: k for k, n in enumerate(senders)}, {n: k for k, n in enumerate(receivers)}
    s = [si[n] for n in ranked["sender"]]
    r = [ri[n] for n in ranked["receiver"]]
    v = ranked["score"].tolist()
    index = {e: k for k, e in enumerate(ranked["edge"])}
    k = min(full_edges, len(v))
    own = sorted(index[n] for n in circuit.edge_names())
    necessity = {
        n: e["necessity"] for n, e in zip(circuit.edge_names(), circuit.edges) if e.get("necessity") is not None
    }
    roles, role_columns = _roles(run_dir, circuit)
    faith = _finite(summary.get("faithfulness", circuit.metadata.get("faithfulness")))
    data = {
        "kind": "run",
        "about": _about(circuit)
        | {
            "scores_source": source,
            "n_scored": len(v),
            "faithfulness": faith,
            "min_abs": min((abs(x) for x in v if x), default=None),
            "faithfulness_source": "summary.json" if "faithfulness" in summary else "circuit.json",
            "summary": {key: summary[key] for key in SUMMARY_KEYS if key in summary},
            "name": run_dir.resolve().name,
        },
        "senders": senders,
        "receivers": receivers,
        "top": {"s": s[:k], "r": r[:k], "v": v[:k]},
        "n_rest": len(v) - k,
        "circuit": {
            "i": own,
            "s": [s[i] for i in own],
            "r": [r[i] for i in own],
            "v": [v[i] for i in own],
            "necessity": [necessity.get(ranked["edge"][i]) for i in own],
        },
        "necessity": _per_edge(run_dir, "necessity.csv", ("metric_drop", "distance_rise"), index),
        "validation": _per_edge(run_dir, "validation.csv", ("exact_effect",), index),
        "roles": roles,
        "role_columns": role_columns,
        "curve": _curve(run_dir),
        "attention": check_attention(attention),
    }
    rest = {"s": s[k:], "r": r[k:], "v": [_sig(x) for x in v[k:]]}
    return data, rest


def _node_key(name: str) -> tuple:
    """Graph order of node and receiver names: input, then layer by layer (heads, groups, MLP), logits."""
    p = parse_name(name)
    if p.kind == "input":
        return (-1, 0, 0, "")
    if p.kind == "logits":
        return (1 << 30, 0, 0, "")
    sub = {"attn": 0, "mlp": 2}[p.kind] if p.slot is None or p.slot == "q" else 1
    return (p.layer, sub, p.head if p.head is not None else (p.group or 0), p.slot or "")


def _page(data: dict, rest: dict | None = None, side_html: str = "") -> str:
    """The HTML page: template, vendored libraries, the app's script and the data, all inlined."""
    template = (ASSETS / "explorer.html").read_text(encoding="utf-8")
    libraries = "\n".join(
        f"<script>/* {name}: see README.md of circuitfinder/graphs/assets */\n"
        f"{(ASSETS / name).read_text(encoding='utf-8')}\n</script>"
        for name in LIBRARIES
    )
    about = data.get("about") or {}
    title = data.get("title") or f"{about.get('task')} circuit · {about.get('model')} · {about.get('method')}"
    parts = {
        "__TITLE__": html.escape(title),
        "/*__CSS__*/": (ASSETS / "explorer.css").read_text(encoding="utf-8"),
        "<!--__LIBRARIES__-->": libraries,
        "<!--__DATA__-->": f'<script type="application/json" id="cf-data">{_script_json(data)}</script>\n'
        f'<script type="application/json" id="cf-rest">{_script_json(rest or {})}</script>',
        "<!--__SIDE__-->": side_html,
        "/*__APP__*/": (ASSETS / "explorer.js").read_text(encoding="utf-8"),
    }
    # one pass, so that no inserted text is searched for later markers
    return re.sub("|".join(re.escape(k) for k in parts), lambda m: parts[m.group(0)], template)


def _write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_explorer(run_dir: Path, out_path: Path | None = None, attention: dict | None = None) -> Path:
    """Write the interactive explorer of a run folder (default ``run_dir / "circuit.html"``).

    Args:
        run_dir: a run folder holding ``circuit.json``; ``scores.parquet``, ``summary.json``,
            ``curve.csv``, ``roles.csv``, ``necessity.csv`` and ``validation.csv`` are used when present.
        out_path: where to write the page.
        attention: head name → attention patterns of a few prompts (shape in the module
            docstring); default: the run folder's ``attention.json`` when it has one.

    Returns:
        The path written.

    Raises:
        CircuitFileError: no valid ``circuit.json`` in ``run_dir``; ValueError: bad ``attention``.
    """
    run_dir = Path(run_dir)
    if attention is None and (run_dir / "attention.json").is_file():
        attention = _read_json(run_dir / "attention.json")
    data, rest = explorer_data(run_dir, attention)
    return _write(out_path or run_dir / "circuit.html", _page(data, rest))


# ---- comparing two circuits ---------------------------------------------------------------------


def markdown_to_html(text: str) -> str:
    """A small Markdown subset as HTML: ``#`` headings, ``-`` lists, pipe tables, paragraphs (all escaped)."""
    out, table, items = [], [], []

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]

    def flush() -> None:
        if items:
            out.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in items) + "</ul>")
            items.clear()
        if table:
            rows = [cells(x) for x in table if not re.fullmatch(r"\|?[\s:|-]+\|?", x.strip())]
            head, body = rows[0], rows[1:]
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
                + "</tbody></table>"
            )
            table.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            if items:
                flush()
            table.append(stripped)
            continue
        if table:
            flush()
        if stripped.startswith(("- ", "* ")):
            items.append(stripped[2:])
            continue
        flush()
        heading = re.match(r"(#{1,4})\s+(.*)", stripped)
        if heading:
            level = len(heading.group(1)) + 1
            out.append(f"<h{level}>{html.escape(heading.group(2))}</h{level}>")
        elif stripped:
            out.append(f"<p>{html.escape(stripped)}</p>")
    flush()
    return "\n".join(out)


def _as_circuit(source) -> tuple[Circuit, str]:
    """A circuit and its caption, from a :class:`Circuit`, a run folder or a ``circuit.json`` path."""
    if isinstance(source, Circuit):
        return source, f"{source.task} · {source.model} · {source.method}"
    circuit = load_circuit(Path(source))
    path = Path(source).resolve()
    return (
        circuit,
        f"{circuit.task} · {circuit.model} · {circuit.method} ({path.name if path.is_dir() else path.parent.name})",
    )


def _default_table(a: Circuit, b: Circuit, names: tuple[str, str]) -> str:
    """The comparison's tables as Markdown (metrics and relative depth, from ``circuitfinder.graphs.compare``)."""
    from circuitfinder.graphs.compare import compare_circuits
    from circuitfinder.graphs.tables import to_markdown

    comparison = compare_circuits(a, b, names=names)
    metrics = pd.DataFrame(
        {
            "metric": list(comparison.metrics),
            "value": [
                "" if x is None else str(x) if not isinstance(x, float) else f"{x:.4g}"
                for x in comparison.metrics.values()
            ],
        }
    )
    return (
        f"## Metrics\n\n{to_markdown(metrics)}\n\n"
        f"## By relative depth\n\n{to_markdown(comparison.depth, floatfmt='.2f')}\n"
    )


def _circuit_part(circuit: Circuit) -> dict:
    """One side of a comparison: shape, edges (sender, receiver, score) and head roles."""
    edges = sorted(circuit.edges, key=lambda e: -abs(e["score"]))
    return {
        "about": _about(circuit),
        "edges": [[e["sender"], e["receiver"], e["score"]] for e in edges],
        "roles": {
            k: {kk: vv for kk, vv in v.items() if kk == "role" or _finite(vv) is not None}
            for k, v in circuit.roles.items()
        },
    }


def write_compare_page(a_run_or_circuit, b_run_or_circuit, out_path: Path, table_markdown: str | None = None) -> Path:
    """Write one page drawing two circuits on one layout, with the comparison table beside it.

    Nodes sit at relative depth (y = layer / n_layers), so circuits of models of different depth
    line up. Between circuits of one model shape nodes and edges match by name and each edge is
    shared, only in A or only in B (black, blue, orange, as ``diff_to_dot`` colours them);
    between shapes, A's heads are drawn left of B's and no edge is shared.

    Args:
        a_run_or_circuit, b_run_or_circuit: a :class:`Circuit`, a run folder or a ``circuit.json``.
        out_path: where to write the page.
        table_markdown: the table to show beside the drawing (e.g. ``comparison.md`` of
            ``circuits compare``); default: the metrics and depth tables of ``compare_circuits``.

    Returns:
        The path written.
    """
    (a, name_a), (b, name_b) = _as_circuit(a_run_or_circuit), _as_circuit(b_run_or_circuit)
    if table_markdown is None:
        table_markdown = _default_table(a, b, (name_a, name_b))
    same = (a.n_layers, a.n_heads, a.n_kv_groups) == (b.n_layers, b.n_heads, b.n_kv_groups)
    data = {
        "kind": "compare",
        "title": f"A: {name_a} — B: {name_b}",
        "names": [name_a, name_b],
        "same_shape": same,
        "a": _circuit_part(a),
        "b": _circuit_part(b),
    }
    side = f'<section id="cf-table"><h2>Comparison</h2>{markdown_to_html(table_markdown)}</section>'
    return _write(out_path, _page(data, None, side))
