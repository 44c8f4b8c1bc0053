"""Draw a circuit with Graphviz.

Diagram conventions (shown again in the legend drawn with every diagram):

* **Layout.** Data flows upwards (``rankdir=BT``): ``input`` at the bottom, ``logits`` at the
  top, and one horizontal rank per layer, in layer order, labelled ``L0``, ``L1``, … at the
  left. Layers with no node in the circuit get no rank. An attention head and the MLP of the
  same layer share a rank, so an ``a5.h1 -> m5`` edge runs sideways.
* **Nodes.** Attention heads are ellipses (``a5.h1``), MLPs boxes (``m5``), the input a house
  and the logits a double octagon. A node's optional ``role`` attribute is shown under its
  name in smaller type.
* **Edges.** Width grows with ``|score|`` (0.5 for the weakest possible to 4 for the largest
  ``|score|`` in the circuit). A negative score means patching the edge to the corrupted run
  lowers the metric: the edge *supports* the behaviour. In the default style supporting edges
  are blue (#2166ac) and opposing edges red (#b2182b), a colour-blind-safe pair; in the
  ``paper`` style supporting edges are solid black and opposing ones dashed grey. An edge into
  an attention head is labelled with the head input(s) it feeds: ``q``, ``k``, ``v``.
* **Levels.** ``level="edge"`` (the default) draws every circuit edge, labelled with its q/k/v
  slots. ``level="node"`` is the summary for large circuits: heads and MLPs are units, one arrow
  per pair of units whose width follows the summed ``|score|`` of the circuit edges it stands
  for, with their count as the label (``×3``) and the colour of their net sign; ``Circuit.draw``
  then keeps the heaviest ``max_nodes`` units and ``2 × max_nodes`` links among them
  (``circuitfinder.graphs.circuit.summary_graph``).
* **Roles.** A head's role label (``circuitfinder.graphs.roles``) is printed under its name in italics.
* **SVG.** Every edge carries a tooltip with its exact score.
"""

from __future__ import annotations

import html
import os
import tempfile
from pathlib import Path

import graphviz
import networkx as nx

FORMATS = ("svg", "pdf", "png", "dot")
LEVELS = ("edge", "node")

STYLES: dict[str, dict[str, str]] = {
    "default": {
        "font": "Helvetica",
        "support": "#2166ac",
        "oppose": "#b2182b",
        "support_style": "solid",
        "oppose_style": "solid",
        "attn_fill": "#fff2cc",
        "mlp_fill": "#d9ead3",
        "io_fill": "#eeeeee",
        "node_style": "filled",
    },
    "paper": {
        "font": "Helvetica",
        "support": "black",
        "oppose": "gray45",
        "support_style": "solid",
        "oppose_style": "dashed",
        "attn_fill": "white",
        "mlp_fill": "white",
        "io_fill": "white",
        "node_style": "filled",  # white, hides edges behind nodes
    },
}

_SHAPES = {"input": "house", "attn": "ellipse", "mlp": "box", "logits": "doubleoctagon"}


def _label(name: str, role: str | None) -> str:
    """A node label: the name, and the role in smaller type under it (an HTML-like label)."""
    if not role:
        return name
    return f'<{html.escape(name)}<BR/><FONT POINT-SIZE="9"><I>{html.escape(str(role))}</I></FONT>>'


def _node_order(item: tuple[str, dict]) -> tuple:
    """Sort key within a rank: heads by index, then the MLP."""
    name, data = item
    return (data.get("kind") == "mlp", data.get("head") if data.get("head") is not None else -1, name)


def _add_legend(dot: graphviz.Digraph, s: dict[str, str], level: str = "edge") -> None:
    """A one-row cluster explaining node shapes, edge colours/styles and the edge labels."""
    fill = {"style": s["node_style"], "fontsize": "9"}
    line = {"solid": "———", "dashed": "– – –"}
    key = "".join(
        f'<TR><TD ALIGN="LEFT"><FONT COLOR="{s[k]}"><B>{line[s[k + "_style"]]}</B></FONT> {text}</TD></TR>'
        for k, text in (("support", "supports the behaviour (score &lt; 0)"), ("oppose", "opposes it (score &gt; 0)"))
    )
    if level == "node":
        key += (
            '<TR><TD ALIGN="LEFT">line width grows with the summed |score| of the edges it stands for</TD></TR>'
            '<TR><TD ALIGN="LEFT">edge label ×n: n circuit edges (q/k/v inputs, MLP input) merged</TD></TR>'
        )
    else:
        key += (
            '<TR><TD ALIGN="LEFT">line width grows with |score|</TD></TR>'
            '<TR><TD ALIGN="LEFT">edge label q / k / v: query / key / value input of the receiving head</TD></TR>'
        )
    key += '<TR><TD ALIGN="LEFT"><I>italic</I> under a head: its role on the task\'s prompts</TD></TR>'
    with dot.subgraph(name="cluster_legend") as leg:
        leg.attr(label="legend", fontsize="10", style="rounded", color="gray60", fontname=s["font"])
        leg.attr(rank="same")
        leg.node("_lg_in", "input", shape=_SHAPES["input"], fillcolor=s["io_fill"], **fill)
        leg.node("_lg_attn", "attention head\naL.hH", shape="ellipse", fillcolor=s["attn_fill"], **fill)
        leg.node("_lg_mlp", "MLP\nmL", shape="box", fillcolor=s["mlp_fill"], **fill)
        leg.node("_lg_out", "logits", shape=_SHAPES["logits"], fillcolor=s["io_fill"], **fill)
        leg.node(
            "_lg_key",
            f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1">{key}</TABLE>>',
            shape="plaintext",
            fontsize="9",
        )


def _new_dot(font: str, title: str | None) -> graphviz.Digraph:
    dot = graphviz.Digraph("circuit")
    dot.attr(
        rankdir="BT",
        splines="true",
        concentrate="false",
        newrank="true",
        nodesep="0.3",
        ranksep="0.55",
        outputorder="edgesfirst",
        fontname=font,
        fontsize="12",
    )
    if title:
        dot.attr(label=title, labelloc="t", labeljust="c", fontsize="14")
    dot.attr("node", fontname=font, fontsize="11", margin="0.08,0.03", height="0.35")
    dot.attr("edge", fontname=font, fontsize="9", arrowsize="0.6")
    return dot


def _add_ranks(dot: graphviz.Digraph, graph: nx.DiGraph, node_attrs, tick_label=lambda layer: f"L{layer}") -> None:
    """One rank per layer; a column of layer labels chained by invisible edges fixes their order.

    ``node_attrs(name, data)`` gives each node's Graphviz attributes (label included).
    """
    by_layer: dict[int, list[tuple[str, dict]]] = {}
    for name, data in graph.nodes(data=True):
        layer = data.get("layer")
        by_layer.setdefault(-1 if layer is None else int(layer), []).append((name, data))
    previous = None
    for layer in sorted(by_layer):
        kinds = {d.get("kind") for _, d in by_layer[layer]}
        tick = f"_layer_{layer}"
        with dot.subgraph() as rank:
            rank.attr(rank="same")
            if kinds <= {"input", "logits"}:
                rank.node(tick, "", shape="point", style="invis", width="0")
            else:
                rank.node(tick, tick_label(layer), shape="plaintext", fontsize="10", fontcolor="gray40")
            for name, data in sorted(by_layer[layer], key=_node_order):
                rank.node(name, **node_attrs(name, data))
        if previous is not None:
            dot.edge(previous, tick, style="invis", weight="10")
        previous = tick


def to_dot(
    graph: nx.DiGraph, style: str = "default", title: str | None = None, level: str = "edge"
) -> graphviz.Digraph:
    """Build the Graphviz diagram of a circuit.

    Args:
        graph: A node-level circuit graph, as made by ``Circuit.to_networkx()``.
        style: ``"default"`` (colour) or ``"paper"`` (greyscale-friendly: black and grey lines, white nodes).
        title: Caption at the top. ``None`` builds one from the graph's ``task``, ``model``
            and ``method`` attributes when they are present.
        level: ``"edge"`` (q/k/v labels, width by |score|) or ``"node"`` (merged edges: width by
            summed |score|, label ×count); see the module docstring.

    Returns:
        The diagram; ``.source`` is its DOT text.

    Raises:
        ValueError: ``style`` or ``level`` is unknown.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    s = STYLES[style]
    if title is None and graph.graph.get("task"):
        g = graph.graph
        title = (
            f"{g['task']} circuit · {g.get('model', '?')} · {g.get('method', '?')} · {graph.number_of_edges()} edges"
        )
    dot = _new_dot(s["font"], title)
    fills = {"input": s["io_fill"], "logits": s["io_fill"], "attn": s["attn_fill"], "mlp": s["mlp_fill"]}

    def node_attrs(name: str, data: dict) -> dict:
        kind = data.get("kind", "attn")
        return {
            "label": _label(name, data.get("role")),
            "shape": _SHAPES.get(kind, "ellipse"),
            "style": s["node_style"],
            "fillcolor": fills.get(kind, "white"),
        }

    _add_ranks(dot, graph, node_attrs)

    def weight(d: dict) -> float:
        return abs(float(d.get("abs_score", d.get("score", 0.0)) if level == "node" else d.get("score", 0.0)))

    top = max((weight(d) for *_, d in graph.edges(data=True)), default=0.0) or 1.0
    # Weakest first, so the strongest edges are drawn on top.
    for u, v, data in sorted(graph.edges(data=True), key=lambda e: (weight(e[2]), e[0], e[1])):
        score = float(data.get("score", 0.0))
        sign = "support" if score < 0 else "oppose"
        if level == "node":
            count = int(data.get("count", 1))
            label = f"×{count}" if count > 1 else ""
            tip = f"{u} -> {v}: {count} edge(s), net score {score:+.4g}, sum |score| {weight(data):.4g}"
        else:
            label = ",".join(x for x in "qkv" if x in (data.get("slot") or ""))
            tip = f"{u} -> {v}: score {score:+.4g}"
        dot.edge(
            u,
            v,
            label=label,
            color=s[sign],
            fontcolor=s[sign],
            style=s[f"{sign}_style"],
            penwidth=f"{0.5 + 3.5 * weight(data) / top:.2f}",
            tooltip=tip,
        )

    _add_legend(dot, s, level)
    return dot


# Diff diagrams (circuitfinder.graphs.compare): Okabe-Ito colours, told apart in greyscale by line style too.
DIFF = {
    "shared": {"color": "black", "fill": "#f0f0f0", "style": "solid"},
    "A": {"color": "#0072b2", "fill": "#cfe3f2", "style": "dashed"},
    "B": {"color": "#d55e00", "fill": "#f7d9c4", "style": "dotted"},
}


def diff_to_dot(
    graph: nx.DiGraph, names: tuple[str, str], title: str | None = None, tick_label=lambda layer: f"L{layer}"
) -> graphviz.Digraph:
    """The diagram of a comparison: nodes and edges carry ``status`` ``shared``, ``A`` or ``B``.

    Nodes may carry a ``label`` (shown instead of their name) and ``role``; edges a ``weight``
    (width) and ``label``. Shared parts are black and solid, parts only in A blue and dashed,
    parts only in B vermillion and dotted (Okabe-Ito colours, distinguishable in greyscale by
    their line style).
    """
    dot = _new_dot("Helvetica", title)

    def node_attrs(name: str, data: dict) -> dict:
        d = DIFF[data.get("status", "shared")]
        kind = data.get("kind", "attn")
        return {
            "label": _label(data.get("label", name), data.get("role")),
            "shape": _SHAPES.get(kind, "ellipse"),
            "style": f"filled,{d['style']}",
            "color": d["color"],
            "fillcolor": d["fill"],
            "penwidth": "1.3",
        }

    _add_ranks(dot, graph, node_attrs, tick_label)
    top = max((float(d.get("weight", 1.0)) for *_, d in graph.edges(data=True)), default=1.0) or 1.0
    for u, v, data in sorted(graph.edges(data=True), key=lambda e: (float(e[2].get("weight", 1.0)), e[0], e[1])):
        d = DIFF[data.get("status", "shared")]
        dot.edge(
            u,
            v,
            label=str(data.get("label", "")),
            color=d["color"],
            fontcolor=d["color"],
            style=d["style"],
            penwidth=f"{0.6 + 3.0 * float(data.get('weight', 1.0)) / top:.2f}",
        )
    text = {"shared": "in both", "A": f"only in {html.escape(names[0])}", "B": f"only in {html.escape(names[1])}"}
    with dot.subgraph(name="cluster_legend") as leg:
        leg.attr(label="legend", fontsize="10", style="rounded", color="gray60", fontname="Helvetica", rank="same")
        for status, d in reversed(DIFF.items()):
            leg.node(
                f"_lg_{status}",
                f"<{text[status]}>",
                shape="box",
                style=f"filled,rounded,{d['style']}",
                color=d["color"],
                fillcolor=d["fill"],
                fontsize="9",
                penwidth="1.3",
            )
        leg.node(
            "_lg_key",
            "<ellipse: attention head(s) · box: MLP(s)<BR/>line width: |score| · label: see title>",
            shape="plaintext",
            fontsize="9",
        )
    return dot


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes files private; a diagram is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_diagram(dot: graphviz.Digraph, out_path: Path, formats: tuple[str, ...] | list[str] = ("svg",)) -> list[Path]:
    """Write a Graphviz diagram once per format (the suffix of ``out_path`` is replaced).

    Raises:
        ValueError: a format is unknown.
        RuntimeError: The Graphviz ``dot`` program is not installed.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(map(repr, unknown))}; choose from {', '.join(FORMATS)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = out_path.with_suffix("." + fmt)
        if fmt == "dot":
            data = dot.source.encode()
        else:
            try:
                data = dot.pipe(format=fmt, quiet=True)
            except graphviz.ExecutableNotFound:
                raise RuntimeError(
                    "the Graphviz 'dot' program is not on PATH; install Graphviz "
                    "(e.g. apt-get install graphviz) to draw circuits"
                ) from None
        _write_atomic(target, data)
        written.append(target)
    return written


def render_circuit(
    graph: nx.DiGraph,
    out_path: Path,
    formats: tuple[str, ...] | list[str] = ("svg",),
    style: str = "default",
    title: str | None = None,
    level: str = "edge",
) -> list[Path]:
    """Draw a circuit to one file per format.

    Args:
        graph: A node-level circuit graph, as made by ``Circuit.to_networkx()``.
        out_path: Where to write; each format replaces the suffix (``out.svg``, ``out.pdf``).
        formats: Any of ``svg``, ``pdf``, ``png`` and ``dot`` (the DOT source text).
        style: ``"default"`` or ``"paper"``; see ``to_dot``.
        title: Caption; see ``to_dot``.
        level: ``"edge"`` or ``"node"``; see ``to_dot``.

    Returns:
        The paths written, in the order of ``formats``.

    Raises:
        ValueError: The circuit has no edges, or a format, style or level is unknown.
        RuntimeError: The Graphviz ``dot`` program is not installed.
    """
    if graph.number_of_edges() == 0:
        raise ValueError("cannot draw: the circuit has no edges (was every edge pruned? check the threshold or top-k)")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(map(repr, unknown))}; choose from {', '.join(FORMATS)}")
    return write_diagram(to_dot(graph, style=style, title=title, level=level), out_path, formats)


def circuit_dot(
    circuit, style: str = "default", level: str = "edge", max_edges: int = 200, max_nodes: int = 30
) -> graphviz.Digraph:
    """The diagram of a circuit (``Circuit.draw`` writes it); large circuits by their strongest parts.

    At edge level, circuits of more than ``max_edges`` edges are drawn by their ``max_edges``
    largest-|score| edges; at node level, by their ``max_nodes`` heaviest heads and MLPs
    (``circuitfinder.graphs.circuit.summary_graph``). Either is pruned to input → logits paths,
    and the title says so; the circuit keeps everything. ``style="summary"`` means the default
    style at node level.

    Raises:
        ValueError: nothing is left to draw, or an unknown style or level.
    """
    from circuitfinder.graphs.circuit import summary_graph

    if style == "summary":
        style, level = "default", "node"
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    title = f"{circuit.task} circuit of {circuit.model} ({circuit.method}, {circuit.n_edges:,} edges)"
    if level == "node":
        graph = summary_graph(circuit, max_nodes)
        units = len(circuit.nodes() - {"input", "logits"})
        shown = sum(1 for _, k in graph.nodes(data="kind") if k in ("attn", "mlp"))
        title += (
            f": node level, {shown} of {units} heads and MLPs"
            + (" (the heaviest)" if shown < units else "")
            + f", {graph.number_of_edges()} links"
        )
    else:
        shown = circuit if circuit.n_edges <= max_edges else circuit.strongest(max_edges)
        graph = shown.prune().to_networkx()
        if shown is not circuit:
            title += f": the {max_edges} strongest, {graph.number_of_edges()} node links on input-to-logits paths"
    if graph.number_of_edges() == 0:
        raise ValueError("cannot draw: the circuit has no edges (was every edge pruned? check the threshold or top-k)")
    return to_dot(graph, style=style, title=title, level=level)
