"""The circuit graph and its file formats: circuit.json, GraphML and the EAP-IG/MIB graph JSON round-trip exactly."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
from tiny_models import circuit_of

from circuitfinder.graphs.circuit import Circuit, CircuitFileError, from_networkx, summary_graph
from circuitfinder.graphs.formats import _split, from_mib, load_graphml, load_mib, save_graphml, save_mib, to_mib

# 3 layers, 4 heads in 2 key/value groups: k/v receivers name groups, so GQA mapping is exercised.
EDGES = [
    {"sender": "input", "receiver": "a0.h0<q>", "score": -0.3},
    {"sender": "input", "receiver": "a0.g0<k>", "score": 0.1 / 3, "necessity": 0.02},
    {"sender": "a0.h0", "receiver": "a1.h2<q>", "score": -0.2},
    {"sender": "a0.h0", "receiver": "a1.g1<v>", "score": -0.7},
    {"sender": "a0.h0", "receiver": "a1.g1<k>", "score": 0.05},
    {"sender": "a0.h1", "receiver": "m0", "score": 1e-17},
    {"sender": "m0", "receiver": "a2.g0<v>", "score": -0.11},
    {"sender": "a1.h2", "receiver": "m2", "score": -0.4, "necessity": -0.3},
    {"sender": "m2", "receiver": "logits", "score": -0.9},
    {"sender": "a2.h1", "receiver": "logits", "score": 0.25},
    {"sender": "a1.h3", "receiver": "logits", "score": -0.01},
]


@pytest.fixture
def record() -> Circuit:
    r = circuit_of(
        model="toy",
        task="ioi",
        method="eap-ig",
        n_layers=3,
        n_heads=4,
        n_kv_groups=2,
        edges=[dict(e) for e in EDGES],
        metadata={"faithfulness": 0.81, "d_model": 16},
    )
    return r.with_roles(
        [
            {
                "node": "a1.h2",
                "layer": 1,
                "head": 2,
                "role": "mover",
                "answer_attention": 0.5,
                "induction": float("nan"),
            },
            {"node": "a0.h0", "role": None, "previous_token": 0.2},
            {"node": "a2.h3", "role": "induction", "induction": 0.9},
        ]
    )  # a2.h3 is not in the circuit


def test_json_round_trip_is_exact(record, tmp_path):
    record.save(tmp_path / "c.json")
    back = Circuit.load(tmp_path / "c.json")
    assert back.to_json() == record.to_json()
    assert back.roles == {
        "a1.h2": {"role": "mover", "answer_attention": 0.5},
        "a0.h0": {"role": None, "previous_token": 0.2},
    }
    assert next(e for e in back.edges if e["receiver"] == "a0.g0<k>")["necessity"] == 0.02


def test_networkx_view_is_lossless_and_carries_attributes(record):
    g = record.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert g.nodes["a1.h2"] == {"kind": "attn", "layer": 1, "head": 2, "role": "mover", "answer_attention": 0.5}
    assert g.nodes["m2"]["kind"] == "mlp" and g.nodes["m2"]["head"] is None and g.nodes["logits"]["layer"] == 3
    # group 1 of layer 1 is heads 2 and 3; both are in the circuit, so the k/v edges reach both
    for head in ("a1.h2", "a1.h3"):
        d = g.edges["a0.h0", head]
        assert d["score_v"] == -0.7 and d["score_k"] == 0.05
    d = g.edges["a0.h0", "a1.h2"]
    assert (
        d["slot"] == "qkv"
        and d["count"] == 3
        and d["score"] == pytest.approx(-0.85)
        and d["abs_score"] == pytest.approx(0.95)
    )
    assert g.edges["a1.h2", "m2"]["slot"] is None and g.edges["a1.h2", "m2"]["necessity"] == -0.3
    assert from_networkx(g).to_json() == record.to_json()


def test_graphml_round_trip_is_exact_and_has_no_none(record, tmp_path):
    g = record.to_networkx()
    save_graphml(g, tmp_path / "c.graphml")
    text = (tmp_path / "c.graphml").read_text()
    assert "None" not in text
    ET.fromstring(text)
    back = load_graphml(tmp_path / "c.graphml")
    assert back.graph == g.graph
    assert dict(back.nodes(data=True)) == dict(g.nodes(data=True))
    assert sorted(back.edges(data=True)) == sorted(g.edges(data=True))
    assert from_networkx(back).to_json() == record.to_json()


def test_mib_round_trip_is_exact(record, tmp_path):
    save_mib(record, tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["cfg"] == {
        "n_layers": 3,
        "n_heads": 4,
        "parallel_attn_mlp": False,
        "n_key_value_heads": 2,
        "d_model": 16,
    }
    # EAP-IG names key/value inputs per query head: the group edge is written once per head of the group
    copies = [data["edges"][f"a0.h0->a1.h{h}<v>"] for h in (2, 3)]
    assert all(c["in_graph"] for c in copies) and copies[0]["score"] + copies[1]["score"] == -0.7
    assert (
        data["nodes"]["a1.h2"]["in_graph"]
        and not data["nodes"]["a2.h3"]["in_graph"]
        and data["nodes"]["logits"]["in_graph"]
    )
    back = load_mib(tmp_path / "g.json")
    record = record.replace(roles={})
    assert back.to_json() == record.to_json()


def test_mib_with_every_edge_score_keeps_the_circuit_in_graph(record):
    scores = {"input->a1.h0<q>": 0.001, "m1->logits": -0.002, "a0.h3->a2.g1<k>": 0.003}
    data = to_mib(record, scores=scores)
    assert sum(e["in_graph"] for e in data["edges"].values()) == len(data["edges"]) - 4  # 3 scores, the k one twice
    assert data["edges"]["a0.h3->a2.h2<k>"] == {"score": 0.0015, "in_graph": False}
    back = from_mib(json.loads(json.dumps(data)))
    record = record.replace(roles={})
    assert back.to_json() == record.to_json()


def test_mib_group_copies_sum_exactly():
    rng = random.Random(0)
    for _ in range(20000):
        score = rng.uniform(-3, 3) * 10 ** rng.randint(-8, 2)
        n = rng.randint(1, 9)
        total = 0.0
        for part in _split(score, n):
            total += part
        assert total == score


def test_mib_import_of_a_foreign_file_and_its_errors():
    cfg = {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}
    edges = {
        "input->a0.h1<q>": {"score": -1.0, "in_graph": True},
        "a0.h1->a1.h0<k>": {"score": 0.5, "in_graph": True},
        "a0.h1->logits": {"score": 2.0, "in_graph": False},
        "a1.h0->logits": {"score": -0.25, "in_graph": True},
    }
    r = from_mib({"cfg": cfg, "nodes": {}, "edges": edges}, model="gpt2-ish")
    assert (r.n_kv_groups, r.model) == (2, "gpt2-ish") and r.metadata == {"d_model": 8}
    assert {f"{e['sender']}->{e['receiver']}" for e in r.edges} == {
        "input->a0.h1<q>",
        "a0.h1->a1.g0<k>",
        "a1.h0->logits",
    }
    with pytest.raises(CircuitFileError, match="lacks edges"):
        from_mib({"cfg": cfg, "nodes": {}})
    with pytest.raises(CircuitFileError, match="not computed before"):
        from_mib({"cfg": cfg, "nodes": {}, "edges": {"a1.h0->a0.h1<q>": {"score": 1, "in_graph": True}}})
    with pytest.raises(CircuitFileError, match="head 5"):
        from_mib({"cfg": cfg, "nodes": {}, "edges": {"input->a1.h5<v>": {"score": 1, "in_graph": True}}})
    with pytest.raises(CircuitFileError, match="edge 'input->a1.x0': not a node name"):
        from_mib({"cfg": cfg, "nodes": {}, "edges": {"input->a1.x0": {"score": 1, "in_graph": True}}})
    with pytest.raises(CircuitFileError, match="in_graph"):
        from_mib({"cfg": cfg, "nodes": {}, "edges": {"input->a1.h0<v>": {"score": 1}}})


def _payload(**changes) -> str:
    data = json.loads(
        circuit_of("m", "t", "eap", 2, 2, 1, [{"sender": "input", "receiver": "logits", "score": 1.0}]).to_json()
    )
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema": "other"}, "not a circuit file"),
        ({"version": 2}, "schema version 2"),
        ({"n_heads": 0}, "'n_heads' must be a positive integer"),
        ({"n_heads": 3, "n_kv_groups": 2}, "not a multiple"),
        ({"edges": {}}, "must be a list"),
        ({"edges": [{"sender": "input", "receiver": "logits"}]}, "edge 0 needs sender, receiver and score"),
        (
            {"edges": [{"sender": "a1.h0", "receiver": "a0.h1<q>", "score": 1}]},
            "edge 0 (a1.h0->a0.h1<q>): 'a1.h0' is not computed before",
        ),
        ({"edges": [{"sender": "m0", "receiver": "m0", "score": 1}]}, "not computed before"),
        ({"edges": [{"sender": "input", "receiver": "a0.h7<q>", "score": 1}]}, "head 7 but the model has 2"),
        ({"edges": [{"sender": "input", "receiver": "a0.h1<k>", "score": 1}]}, "a key/value input its group"),
        ({"edges": [{"sender": "input", "receiver": "a5.g0<k>", "score": 1}]}, "layer 5 but the model has 2"),
        ({"edges": [{"sender": "input", "receiver": "a0.h1", "score": 1}]}, "not a receiver"),
        ({"edges": [{"sender": "a0.h1<q>", "receiver": "logits", "score": 1}]}, "not a sender"),
        ({"edges": [{"sender": "input", "receiver": "logits", "score": "big"}]}, "score must be a finite number"),
        ({"edges": [{"sender": "input", "receiver": "logits", "score": 1}] * 2}, "appears twice"),
        ({"roles": {"m0": {"role": "x"}}}, "'m0' is not a head"),
    ],
)
def test_loading_names_what_is_wrong(changes, message):
    with pytest.raises(CircuitFileError) as info:
        Circuit.from_json(_payload(**changes), source="c.json")
    assert message in str(info.value) and str(info.value).startswith("c.json")


def test_not_json_and_mib_files_are_told_apart():
    with pytest.raises(CircuitFileError, match="not valid JSON"):
        Circuit.from_json("{", source="c.json")
    with pytest.raises(CircuitFileError, match="circuits convert"):
        Circuit.from_json(json.dumps({"cfg": {}, "edges": {}}), source="c.json")


def test_pruning_drops_pieces_off_input_to_logits_paths(record):
    extra = Circuit.from_edges(
        record.graph,
        list(record.edges)
        + [
            {"sender": "a0.h3", "receiver": "m1", "score": -5.0},  # reaches nothing
            {"sender": "a1.h1", "receiver": "logits", "score": -5.0},
        ],  # reads nothing
        model=record.model,
        task=record.task,
        method=record.method,
        metadata=record.metadata,
        roles=record.roles,
    )
    assert extra.n_edges == record.n_edges + 2
    assert extra.prune().to_json() == record.to_json()


def test_summary_graph_keeps_the_heaviest_nodes(record):
    g = summary_graph(record, max_nodes=3)
    units = [n for n, k in g.nodes(data="kind") if k in ("attn", "mlp")]
    assert len(units) <= 3 and {"input", "logits", "m2"} <= set(g)
    assert nx.has_path(g, "input", "logits")


def test_a_parallel_circuit_round_trips_and_refuses_a_head_to_same_layer_mlp_edge():
    edges = [{"sender": "a0.h1", "receiver": "m1", "score": 0.5}, {"sender": "m0", "receiver": "logits", "score": -1.0}]
    record = circuit_of("m", "t", "eap", 2, 2, 1, edges, parallel=True)
    again = Circuit.from_json(record.to_json())
    assert again.parallel and again.edge_names() == record.edge_names()
    assert "parallel" not in json.loads(circuit_of("m", "t", "eap", 2, 2, 1, edges).to_json())
    bad = json.loads(record.to_json())
    bad["edges"].append({"sender": "a1.h0", "receiver": "m1", "score": 0.1})
    with pytest.raises(CircuitFileError, match="parallel"):
        Circuit.from_json(json.dumps(bad))
    bad["parallel"] = False
    assert len(Circuit.from_json(json.dumps(bad)).edges) == 3  # a sequential model has that edge
