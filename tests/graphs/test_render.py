"""Tests for circuitfinder.graphs.render: drawing a small circuit with Graphviz (no model needed)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
from tiny_models import circuit_of

from circuitfinder.graphs.render import render_circuit, to_dot

EDGES = [
    {"sender": "input", "receiver": "a0.h0<q>", "score": -0.30},
    {"sender": "input", "receiver": "a0.g0<k>", "score": 0.05},
    {"sender": "a0.h0", "receiver": "m0", "score": -0.20},
    {"sender": "a0.h1", "receiver": "a1.g0<v>", "score": 0.10},
    {"sender": "m0", "receiver": "logits", "score": -0.80},
    {"sender": "a1.h0", "receiver": "logits", "score": 0.02},
]
NODES = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "logits"]


@pytest.fixture
def graph() -> nx.DiGraph:
    record = circuit_of(model="toy", task="ioi", method="eap", n_layers=2, n_heads=2, n_kv_groups=1, edges=EDGES)
    g = record.to_networkx()
    g.nodes["m0"]["role"] = "name mover & co"  # exercises HTML escaping in labels
    return g


def _penwidths(source: str) -> dict[tuple[str, str], float]:
    """Penwidth of each drawn edge, keyed by (sender, receiver), from DOT source."""
    out = {}
    for line in source.splitlines():
        m = re.match(r'\s*"?([\w.]+)"?\s*->\s*"?([\w.]+)"?\s*\[.*penwidth="?([\d.]+)', line)
        if m and not m.group(1).startswith("_"):
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def test_svg_is_xml_and_names_every_node(graph, tmp_path):
    (svg,) = render_circuit(graph, tmp_path / "c", formats=("svg",))
    assert svg == tmp_path / "c.svg"
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    for name in NODES:
        assert name in text
    assert list(tmp_path.iterdir()) == [svg]  # no temp files left behind


def test_pdf_png_and_dot_formats(graph, tmp_path):
    paths = render_circuit(graph, tmp_path / "sub" / "c.json", formats=("pdf", "png", "dot"), style="paper")
    assert [p.name for p in paths] == ["c.pdf", "c.png", "c.dot"]
    assert paths[0].read_bytes().startswith(b"%PDF")
    assert paths[1].read_bytes().startswith(b"\x89PNG")
    assert "rank=same" in paths[2].read_text()


def test_layers_have_their_own_rank(graph):
    source = to_dot(graph).source
    assert "rankdir=BT" in source
    assert source.count("rank=same") >= 4  # input, layer 0, layer 1, logits (+ legend row)
    assert "cluster_legend" in source


def test_empty_circuit_raises(tmp_path):
    with pytest.raises(ValueError, match="circuit has no edges"):
        render_circuit(nx.DiGraph(), tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_unknown_format_and_style_raise(graph, tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        render_circuit(graph, tmp_path / "c", formats=("svg", "gif"))
    with pytest.raises(ValueError, match="unknown style"):
        to_dot(graph, style="neon")


def test_penwidth_follows_abs_score(graph):
    widths = _penwidths(to_dot(graph).source)
    assert len(widths) == graph.number_of_edges()
    assert widths[("m0", "logits")] == max(widths.values())  # |score| 0.8
    assert widths[("a1.h0", "logits")] == min(widths.values())  # |score| 0.02
    assert widths[("m0", "logits")] > widths[("a1.h0", "logits")]
    assert 0.5 <= min(widths.values()) and max(widths.values()) <= 4.0


def test_sign_colours_and_slot_labels(graph):
    source = to_dot(graph).source
    line = next(ln for ln in source.splitlines() if re.search(r"input\W*->\W*\"?a0\.h0", ln))
    assert "#2166ac" in line and 'label="q,k"' in line  # q and k merged into one edge, net support
    line = next(ln for ln in source.splitlines() if re.search(r"a0\.h1\W*->", ln))
    assert "#b2182b" in line and "label=v" in line


def test_paper_style_dashes_positive_edges(graph):
    source = to_dot(graph, style="paper").source
    lines = [ln for ln in source.splitlines() if "->" in ln and not ln.strip().lstrip('"').startswith("_")]
    positive = [ln for ln in lines if "a0.h1" in ln or "a1.h0" in ln]
    negative = [ln for ln in lines if "m0" in ln and "logits" in ln]
    assert positive and all("dashed" in ln for ln in positive)
    assert negative and all("dashed" not in ln for ln in negative)
    assert "fontname=Helvetica" in source
    assert "#" not in "".join(ln for ln in source.splitlines() if "fillcolor" in ln)  # no colour fills


def test_role_shown_under_name(graph):
    source = to_dot(graph).source
    assert "name mover &amp; co" in source


def test_node_level_merges_edges_and_labels_counts(graph):
    source = to_dot(graph, level="node").source
    line = next(ln for ln in source.splitlines() if re.search(r"input\W*->\W*\"?a0\.h0", ln))
    assert 'label="×2"' in line  # q and k merged
    assert "q,k" not in source and "merged" in source  # the legend explains the label
    with pytest.raises(ValueError, match="unknown level"):
        to_dot(graph, level="layer")


def test_circuit_draw_summary_style_and_paper_pdf(tmp_path):
    record = circuit_of(model="toy", task="ioi", method="eap", n_layers=2, n_heads=2, n_kv_groups=1, edges=EDGES)
    svg, pdf = record.draw(tmp_path / "s", formats=("svg", "pdf"), style="summary", max_nodes=2)
    text = svg.read_text()
    ET.fromstring(text)
    assert "node level, 2 of 4 heads and MLPs (the heaviest)" in text
    assert pdf.read_bytes().startswith(b"%PDF")
    (paper,) = record.draw(tmp_path / "p", formats=("pdf",), style="paper")
    assert paper.read_bytes().startswith(b"%PDF")


def test_diff_diagram_has_a_legend_and_status_styles():
    from circuitfinder.graphs.render import DIFF, diff_to_dot

    g = nx.DiGraph()
    g.add_node("input", kind="input", layer=-1, status="shared")
    g.add_node("a0.h0", kind="attn", layer=0, head=0, status="A", role="mover")
    g.add_node("logits", kind="logits", layer=1, status="shared")
    g.add_edge("input", "a0.h0", status="A", weight=1.0, label="q")
    g.add_edge("a0.h0", "logits", status="B", weight=0.5)
    source = diff_to_dot(g, ("eap", "eap-ig")).source
    assert "only in eap-ig" in source and "in both" in source and "cluster_legend" in source
    line = next(ln for ln in source.splitlines() if re.search(r"a0\.h0\W*->\W*logits", ln))
    assert DIFF["B"]["color"] in line and "dotted" in line
