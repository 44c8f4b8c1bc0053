"""Comparing circuits (metrics, depth alignment, diff diagram), the tables, and the commands that write them."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from cli_runner import run_in_process as _run
from tiny_models import circuit_of

from circuitfinder.errors import OutputExists
from circuitfinder.graphs.circuit import Circuit
from circuitfinder.graphs.compare import compare, depth_bin, depth_table, diff_graph, role_table, same_model_metrics
from circuitfinder.graphs.tables import layer_table, to_markdown, top_edges_table

ROOT = Path(__file__).resolve().parents[2]


def _record(edges, n_layers=4, n_heads=2, roles=None, model="m") -> Circuit:
    return circuit_of(
        model=model,
        task="ioi",
        method="eap",
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_groups=n_heads,
        edges=[{"sender": s, "receiver": r, "score": x} for s, r, x in edges],
        roles=roles or {},
    )


A = _record(
    [
        ("input", "a0.h0<q>", -1.0),
        ("a0.h0", "a2.h1<q>", -2.0),
        ("a2.h1", "logits", -3.0),
        ("input", "m1", 0.5),
        ("m1", "logits", -1.0),
    ],
    roles={"a0.h0": {"role": "prev-token"}, "a2.h1": {"role": "mover", "answer_attention": 0.6}},
)
B = _record(
    [
        ("input", "a0.h0<q>", -1.0),
        ("a0.h0", "a2.h1<q>", -1.0),
        ("a2.h1", "logits", -2.0),
        ("input", "a3.h0<q>", -1.0),
        ("a3.h0", "logits", -1.0),
    ],
    roles={"a2.h1": {"role": "mover"}, "a3.h0": {"role": "neg. mover"}},
)


def test_a_circuit_compared_with_itself_scores_one():
    m = same_model_metrics(A, A)
    for key in ("node_jaccard", "edge_jaccard", "overlap_at_equal_size", "weighted_overlap"):
        assert m[key] == 1.0


def test_metrics_of_two_circuits_by_hand():
    m = same_model_metrics(A, B)
    assert m["node_jaccard"] == 2 / 4  # {a0.h0, a2.h1} shared of {a0.h0, a2.h1, m1, a3.h0}
    assert m["edge_jaccard"] == 3 / 7
    # k = 5; top 5 of each is all of it: 3 shared
    assert m["overlap_at_equal_size"] == 3 / 5 and m["equal_size_k"] == 5
    wa = {"i0": 1 / 7.5, "0-2": 2 / 7.5, "2-l": 3 / 7.5, "i-m": 0.5 / 7.5, "m-l": 1 / 7.5}
    wb = {"i0": 1 / 6, "0-2": 1 / 6, "2-l": 2 / 6, "i-3": 1 / 6, "3-l": 1 / 6}
    keys = set(wa) | set(wb)
    expected = sum(min(wa.get(k, 0), wb.get(k, 0)) for k in keys) / sum(max(wa.get(k, 0), wb.get(k, 0)) for k in keys)
    assert m["weighted_overlap"] == pytest.approx(expected)


def test_depth_alignment_of_models_of_different_depth():
    deep = _record(
        [("input", "a2.h0<q>", -1.0), ("a2.h0", "a9.h1<q>", -1.0), ("a9.h1", "logits", -2.0)],
        n_layers=10,
        n_heads=3,
        roles={"a9.h1": {"role": "mover"}, "a2.h0": {"role": "duplicate"}},
        model="deep",
    )
    assert [depth_bin(layer, 10, 5) for layer in (0, 1, 2, 9)] == [0, 0, 1, 4]
    assert [depth_bin(layer, 4, 5) for layer in (0, 1, 2, 3)] == [0, 1, 2, 3]
    table = depth_table(A, deep, bins=5)
    assert list(table.depth) == ["0–20%", "20–40%", "40–60%", "60–80%", "80–100%"]
    row = table.set_index("depth").loc["40–60%"]  # A's a2.h1 (layer 2 of 4)
    assert (row.A_heads, row.B_heads, row.A_roles, row.only_A_roles) == (1, 0, "mover", "mover")
    last = table.set_index("depth").loc["80–100%"]
    assert (last.B_heads, last.B_roles, last.only_B_roles) == (1, "mover", "mover")
    assert table.A_score_share.sum() == pytest.approx(1.0) and table.B_score_share.sum() == pytest.approx(1.0)
    roles = role_table(A, deep).set_index("role")
    assert roles.loc["mover"].A_heads == "a2.h1 (0.50)" and roles.loc["mover"].B_heads == "a9.h1 (0.90)"


def test_diff_graph_marks_shared_and_missing_parts():
    g = diff_graph(A, B)
    assert (
        g.nodes["a2.h1"]["status"] == "shared" and g.nodes["m1"]["status"] == "A" and g.nodes["a3.h0"]["status"] == "B"
    )
    assert g.edges["a3.h0", "logits"]["status"] == "B" and g.edges["a0.h0", "a2.h1"]["status"] == "shared"
    assert g.nodes["a0.h0"]["role"] == "A: prev-token" and g.nodes["a2.h1"]["role"] == "mover"


def _save(record: Circuit, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record.save(folder / "circuit.json")
    return folder


def test_compare_writes_tables_and_diagram(tmp_path):
    a, b = _save(A, tmp_path / "a"), _save(B, tmp_path / "b")
    m = compare(a, b, out=tmp_path / "out", formats=("svg", "pdf"))
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {
        "comparison.json",
        "metrics.csv",
        "depth.csv",
        "roles.csv",
        "comparison.md",
        "diff.svg",
        "diff.pdf",
        "compare.html",
    }
    assert "Circuit comparison" in (tmp_path / "out" / "compare.html").read_text()  # the table beside the drawing
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["edge_jaccard"] == m["edge_jaccard"] == 3 / 7
    ET.parse(tmp_path / "out" / "diff.svg")
    assert (tmp_path / "out" / "diff.pdf").read_bytes().startswith(b"%PDF")
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| node_jaccard | 0.5 |" in md and "## By relative depth" in md
    with pytest.raises(OutputExists):
        compare(a, b, out=tmp_path / "out")
    compare(a, a, out=tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["weighted_overlap"] == 1.0


def test_compare_of_different_models_draws_depth_units(tmp_path):
    deep = _record([("input", "a2.h0<q>", -1.0), ("a2.h0", "m8", -1.0), ("m8", "logits", -2.0)], n_layers=10, n_heads=3)
    m = compare(_save(A, tmp_path / "a"), _save(deep, tmp_path / "d"), out=tmp_path / "out", formats=("svg",))
    assert m["same_model_shape"] is False and m["edge_jaccard"] is None
    text = (tmp_path / "out" / "diff.svg").read_text()
    assert "80–100%" in text and "only in B" in text
    assert "run `circuits roles" in (tmp_path / "out" / "comparison.md").read_text()


def test_roles_csv_beside_a_circuit_is_used(tmp_path):
    folder = _save(_record([("input", "a0.h0<q>", -1.0), ("a0.h0", "logits", -1.0)]), tmp_path / "r")
    pd.DataFrame(
        [
            {"node": "a0.h0", "layer": 0, "head": 0, "previous_token": 0.9, "role": "prev-token"},
            {"node": "a1.h1", "layer": 1, "head": 1, "previous_token": 0.1, "role": None},
        ]
    ).to_csv(folder / "roles.csv", index=False)
    from circuitfinder.graphs.circuit import load_circuit

    assert load_circuit(folder).roles == {"a0.h0": {"role": "prev-token", "previous_token": 0.9}}


def test_tables():
    layers = layer_table(A)
    assert list(layers.layer) == [0, 1, 2, 3]
    row = layers.set_index("layer").loc[2]
    assert (row.heads, row.head_names, row.edges_in, row.edges_out) == (1, "a2.h1 (mover)", 1, 1)
    assert layers.set_index("layer").loc[1].mlp
    top = top_edges_table(A, 2)
    assert list(top.edge) == ["a2.h1->logits", "a0.h0->a2.h1<q>"]
    assert list(top.receiver_role) == ["", "mover"] and list(top.sender_role) == ["mover", "prev-token"]
    md = to_markdown(top)
    assert md.splitlines()[1] == "|---:|:---|---:|:---|:---|" and "| 1 | a2.h1->logits | -3 | mover |  |" in md


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "circuitfinder.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_compare_end_to_end(tmp_path):
    a, b = _save(A, tmp_path / "a"), _save(B, tmp_path / "b")
    result = _cli("compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--format", "svg")
    assert result.returncode == 0, result.stderr
    assert "edge Jaccard 0.429" in result.stdout and (tmp_path / "cmp" / "depth.csv").is_file()
    result = _cli("compare", str(a), str(b), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 2 and "already holds results" in result.stderr and "Traceback" not in result.stderr
    env_without_display = _cli("view", str(tmp_path / "cmp"))  # tests run with no display: the page's path
    assert env_without_display.returncode == 0 and env_without_display.stdout.strip().endswith("compare.html")
    result = _cli("view", str(a))
    assert result.returncode == 2 and "has no circuit.html or compare.html" in result.stderr


def test_cli_tables_convert_and_render(tmp_path, capsys):
    a = _save(A, tmp_path / "a")
    assert _run(capsys, "tables", str(a), "--top", "3")[0] == 0
    assert {"layers.csv", "layers.md", "top_edges.csv", "top_edges.md"} <= {p.name for p in a.iterdir()}
    assert (
        _run(capsys, "convert", str(a), "--to", "mib", "--out", str(tmp_path / "a.mib.json"), "--d-model", "8")[0] == 0
    )
    assert (
        _run(capsys, "convert", str(tmp_path / "a.mib.json"), "--to", "circuit", "--out", str(tmp_path / "back.json"))[
            0
        ]
        == 0
    )
    assert Circuit.load(tmp_path / "back.json").edges == Circuit.load(a / "circuit.json").edges
    assert _run(capsys, "convert", str(a), "--to", "graphml", "--out", str(tmp_path / "a.graphml"))[0] == 0
    ET.parse(tmp_path / "a.graphml")
    assert (
        _run(capsys, "convert", str(tmp_path / "a.graphml"), "--to", "circuit", "--out", str(tmp_path / "g.json"))[0]
        == 0
    )
    assert (tmp_path / "g.json").read_text() == (a / "circuit.json").read_text()
    code, _, err = _run(
        capsys,
        "render",
        str(a),
        "--level",
        "node",
        "--style",
        "paper",
        "--format",
        "svg,pdf",
        "--out",
        str(tmp_path / "n"),
    )
    assert code == 0, err
    ET.parse(tmp_path / "n.svg")
    assert (tmp_path / "n.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "nowhere", "nowhere2"], "no circuit file at nowhere"),
        (["compare", "{a}", "{bad}"], "is not a circuit file"),
        (["compare", "{a}", "{a}", "--bins", "0"], "--bins must be at least 1"),
        (["compare", "{a}", "{a}", "--out", "{a}"], "already holds results"),
        (["compare", "{a}", "{a}", "--format", "gif"], "unknown format"),
        (["compare", "{a}", "{empty}"], "holds an empty circuit"),
        (["render", "{a}", "--level", "huge"], "unknown level"),
        (["convert", "{a}", "--to", "xml", "--out", "x"], "unknown --to"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    a = _save(A, tmp_path / "a")
    (tmp_path / "bad.json").write_text('{"x": 1}')
    _save(A.replace(mask=A.mask & False), tmp_path / "empty")
    paths = {"a": str(a), "bad": str(tmp_path / "bad.json"), "empty": str(tmp_path / "empty")}
    code, _, err = _run(capsys, *[x.format(**paths) for x in args])
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
