"""The library's front door: one Circuit object, runs as objects, one method registry."""

from __future__ import annotations

import json
import math
import re

import networkx as nx
import pytest
import torch
from tiny_models import tiny_hf_model

import circuitfinder as cf
from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.adapter import ModelAdapter, ModelShape
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import circuit_nodes, prune
from circuitfinder.graphs.circuit import Circuit, CircuitFileError, from_networkx
from circuitfinder.methods.registry import METHODS
from circuitfinder.runs.pipeline import check_config

GRAPH = EdgeGraph(ModelShape(3, 4, 2, d_model=8))  # 4 heads in 2 key/value groups


def _scores(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GRAPH.n_senders, GRAPH.n_receivers, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def tiny_ioi_model(word_tokenizer):
    model = tiny_hf_model("llama", seed=0, dtype=torch.float32, vocab=len(word_tokenizer))
    return ModelAdapter.from_hf(model, word_tokenizer, name="tiny-llama", hf_id="llama")


# ---------------------------------------------------------------------------------------------
# Circuit
# ---------------------------------------------------------------------------------------------


def test_top_above_and_strongest_select_by_absolute_score():
    scores = _scores()
    everything = Circuit.from_scores(GRAPH, scores, model="m", task="t", method="x")
    assert everything.n_edges == 0 and not everything.scores.isnan()[GRAPH.allowed].any()
    top = everything.top(25)
    flat = scores.abs()[GRAPH.allowed]
    assert top.n_edges == 25 and scores.abs()[top.mask].min() >= flat.sort(descending=True).values[24]
    threshold = float(flat.sort(descending=True).values[9])
    assert torch.equal(everything.above(threshold).mask, GRAPH.allowed & (scores.abs() >= threshold))
    strongest = top.strongest(5)  # the circuit's own 5 strongest are the graph's 5 strongest
    assert torch.equal(strongest.mask, everything.top(5).mask)
    assert top.strongest(100).n_edges == 25  # never more than the circuit has


def test_prune_is_the_mask_rule_and_nodes_follow_one_rule():
    top = Circuit.from_scores(GRAPH, _scores(1)).top(60)
    assert torch.equal(top.prune().mask, prune(GRAPH, top.mask))
    assert top.nodes() == circuit_nodes(GRAPH, top.mask)


def test_a_key_value_edge_leads_only_to_the_heads_of_its_group_in_the_circuit():
    # a1.g0 feeds heads a1.h0 and a1.h1; only a1.h1 is otherwise in the circuit (it sends to the logits)
    edges = [
        {"sender": "input", "receiver": "a1.g0<k>", "score": 1.0},
        {"sender": "a1.h1", "receiver": "logits", "score": 2.0},
    ]
    circuit = Circuit.from_edges(GRAPH, edges)
    assert circuit.nodes() == {"input", "a1.h1", "logits"}
    assert set(circuit.to_networkx().edges) == {("input", "a1.h1"), ("a1.h1", "logits")}
    alone = Circuit.from_edges(GRAPH, edges[:1])  # no head of the group in the circuit: its first head stands for it
    assert alone.nodes() == {"input", "a1.h0"}


def test_json_and_networkx_round_trips_are_exact(tmp_path):
    circuit = Circuit.from_scores(GRAPH, _scores(2), model="m", task="t", method="eap").top(40).prune()
    circuit = circuit.replace(metadata={"faithfulness": 0.5})
    circuit.save(tmp_path / "c.json")
    back = Circuit.load(tmp_path / "c.json")
    assert torch.equal(back.mask, circuit.mask) and back.to_json() == circuit.to_json()
    assert json.loads(circuit.to_json())["d_model"] == 8 and back.shape == GRAPH.shape
    assert torch.equal(torch.where(back.mask, back.scores, 0), torch.where(circuit.mask, circuit.scores, 0))
    assert back.scores[~back.mask & GRAPH.allowed].isnan().all()  # a file knows only its own edges' scores
    assert "faithfulness" not in circuit.top(10).metadata and circuit.prune().metadata == {"faithfulness": 0.5}
    rebuilt = from_networkx(circuit.to_networkx(), like=circuit)
    assert torch.equal(rebuilt.mask, circuit.mask) and rebuilt.to_json() == circuit.to_json()


def test_a_circuit_refuses_what_is_not_an_edge_and_a_mask_of_the_wrong_shape():
    with pytest.raises(CircuitFileError, match="is not computed before"):
        Circuit.from_edges(GRAPH, [{"sender": "a2.h0", "receiver": "a1.h0<q>", "score": 1.0}])
    with pytest.raises(ValueError, match=r"mask must have shape \(16, 28\)"):
        Circuit(GRAPH, torch.zeros(3, 3, dtype=torch.bool))


def test_repr_is_one_short_line_and_a_notebook_gets_svg():
    circuit = Circuit.from_scores(GRAPH, _scores(3), model="tiny", task="ioi", method="eap").top(30).prune()
    text = repr(circuit.replace(metadata={"faithfulness": 0.812}))
    assert text.startswith("Circuit(ioi · tiny · eap: ") and "faithfulness 0.812" in text and len(text) < 120
    svg = circuit._repr_svg_()
    assert svg is None or svg.lstrip().startswith(("<?xml", "<svg"))
    assert isinstance(circuit.draw(), object) and circuit.to_networkx().number_of_edges() > 0
    assert nx.is_directed_acyclic_graph(circuit.to_networkx())


# ---------------------------------------------------------------------------------------------
# Runs as objects
# ---------------------------------------------------------------------------------------------


def test_discover_returns_a_run_writes_nothing_and_saves_and_loads_whole(tiny_ioi_model, tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.chdir(tmp_path)
    backend = matplotlib.get_backend()
    run = cf.discover(tiny_ioi_model, "ioi", method="eap", n_pairs=8, batch_size=8, edges=30, force=True)
    assert list(tmp_path.iterdir()) == []  # nothing written without out=
    assert matplotlib.get_backend() == backend  # a notebook's inline plots keep working
    assert (
        isinstance(run, cf.Run) and run.faithfulness == run.summary.faithfulness == run.circuit.metadata["faithfulness"]
    )
    assert repr(run).startswith("Run(ioi · tiny-llama · eap: ") and run.config.method == "eap"
    assert torch.equal(run.circuit.mask, prune(run.circuit.graph, run.circuit.top(30).mask))
    assert not run.scores.isnan()[run.circuit.graph.allowed].any()
    # the reported faithfulness is the evaluator's on the held-out prompts, for the circuit returned
    evaluator = cf.CircuitEvaluator(tiny_ioi_model, run.circuit.graph, run.task, "heldout", 8)
    assert math.isclose(evaluator.faithfulness(run.circuit.mask), run.faithfulness, rel_tol=1e-12)

    run.save(tmp_path / "run")
    back = cf.Run.load(tmp_path / "run")
    assert torch.equal(back.circuit.mask, run.circuit.mask)
    assert torch.equal(back.scores[run.circuit.graph.allowed], run.scores[run.circuit.graph.allowed])
    assert back.summary == run.summary and back.config == run.config and back.curve == run.curve
    assert back.prompts == run.prompts and back.task is None and back.out == tmp_path / "run"
    with pytest.raises(cf.UserError, match="already holds results"):
        run.save(tmp_path / "run")


def test_discover_takes_a_built_task(tiny_ioi_model):
    task = cf.build_task("ioi", tiny_ioi_model, n_pairs=8, seed=1)  # the loaded model stands for its tokenizer
    assert repr(task).startswith("Task(ioi: 8 prompt pairs (") and len(repr(task)) < 300
    run = cf.discover(tiny_ioi_model, task, method="eap", batch_size=8, edges=20, force=True, curve=False)
    assert run.task is task and run.prompts[0]["clean"] == task.texts[0]["clean"]


# ---------------------------------------------------------------------------------------------
# One registry
# ---------------------------------------------------------------------------------------------


def test_every_method_is_one_registry_entry_that_declares_support_and_cost():
    assert set(METHODS) == {"eap", "eap-ig", "eap-ig-activations", "acdc", "acdc-groups", "minimize"}
    for name, method in METHODS.items():
        assert method.description and method.cost and method.ablations
        assert (method.score is None) == method.seeded  # attribution scores; a search is seeded by one
    assert METHODS["acdc"].refusal("acdc", "mean", post_norm=False).endswith("use `ablation='counterfactual'`")
    assert "post-attention norm" in METHODS["eap-ig-activations"].refusal(
        "eap-ig-activations", "counterfactual", post_norm=True
    )
    assert METHODS["eap-ig"].refusal("eap-ig", "zero", post_norm=True) is None


def test_minimize_is_a_method_and_an_unknown_option_is_refused_by_name():
    config = DiscoverConfig.from_options(method="minimize", seed_method="eap")
    assert (config.method, config.search.seed_method) == ("minimize", "eap")
    with pytest.raises(cf.UserError, match="unknown option 'minimize'") as unknown:
        DiscoverConfig.from_options(method="eap", minimize=True)
    assert unknown.value.argument == "minimize"
    with pytest.raises(cf.UserError, match="unknown method 'nope'") as info:
        check_config(DiscoverConfig.from_options(method="nope"))
    assert info.value.argument == "method"
    with pytest.raises(cf.UserError, match="patches from the counterfactual run only"):
        check_config(DiscoverConfig.from_options(method="minimize", ablation="zero"))


def test_library_errors_name_arguments_and_the_command_line_shows_flags():
    from circuitfinder.cli import as_flags

    with pytest.raises(cf.UserError) as info:
        check_config(DiscoverConfig.from_options(n_pairs=2))
    assert str(info.value) == "`n_pairs` must be at least 4, got 2" and info.value.argument == "n_pairs"
    assert as_flags(info.value) == "--pairs must be at least 4, got 2"
    message = cf.UserError(
        "`tau` must be ≥ 0; pass `overwrite=True`; use `ablation='counterfactual'`; see `circuits convert`"
    )
    assert (
        as_flags(message)
        == "--tau must be ≥ 0; pass --overwrite; use --ablation counterfactual; see `circuits convert`"
    )


def test_a_run_measures_roles_and_is_graded_in_memory(tiny_ioi_model):
    run = cf.discover(tiny_ioi_model, "ioi", method="eap", n_pairs=8, batch_size=8, edges=30, force=True, curve=False)
    table = run.roles(tiny_ioi_model, max_prompts=8)
    assert len(table) == tiny_ioi_model.shape.n_layers * tiny_ioi_model.shape.n_heads
    assert set(run.circuit.roles) <= set(run.circuit.heads()) and run.circuit.roles
    with pytest.raises(cf.UserError, match="reference gpt2-ioi is for gpt2"):
        run.grade("gpt2-ioi")  # a reference is for one model shape


def test_a_run_lists_its_circuits_heads_by_role_and_saves_the_roles(tiny_ioi_model, tmp_path):
    run = cf.discover(
        tiny_ioi_model,
        "ioi",
        method="eap",
        n_pairs=8,
        batch_size=8,
        edges=40,
        force=True,
        curve=False,
        out=tmp_path / "run",
    )
    roles = run.tables["roles"]
    assert len(roles) == tiny_ioi_model.shape.n_layers * tiny_ioi_model.shape.n_heads
    want = {}
    for head in run.circuit.heads():
        for label in filter(None, (roles.set_index("node").role.get(head) or "").split(", ")):
            want.setdefault(label, []).append(head)
    assert run.summary.heads_by_role == dict(sorted(want.items()))
    assert (tmp_path / "run" / "roles.csv").is_file()
    assert json.loads((tmp_path / "run" / "circuit.json").read_text())["roles"].keys() <= set(run.circuit.heads())
    # the explorer shows the attention of every head of the circuit, saved beside it and read back
    attention = json.loads((tmp_path / "run" / "attention.json").read_text())
    assert sorted(attention) == sorted(run.circuit.heads()) and attention
    assert cf.Run.load(tmp_path / "run").tables["attention"] == attention
    page = (tmp_path / "run" / "circuit.html").read_text()
    embedded = json.loads(
        re.search(r'<script type="application/json" id="cf-data">(.*?)</script>', page, re.S).group(1)
    )
    assert sorted(embedded["attention"]) == sorted(attention)
    assert (
        cf.discover(
            tiny_ioi_model, "ioi", method="eap", n_pairs=8, batch_size=8, edges=40, force=True, curve=False, roles=False
        ).summary.heads_by_role
        is None
    )


def test_loading_what_is_not_a_run_folder_is_one_clear_error(tmp_path):
    with pytest.raises(cf.UserError, match="is not a run folder"):
        cf.Run.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"task": "ioi"}))
    with pytest.raises(cf.UserError, match="no readable summary.json"):
        cf.Run.load(tmp_path)


def test_every_user_facing_error_is_a_user_error():
    """The command line prints any UserError in one line and exits 2: task, circuit-file and metric
    errors are UserErrors too (and stay ValueErrors for code that caught them as such)."""
    from circuitfinder.engine.faithfulness import MetricError
    from circuitfinder.errors import UserError
    from circuitfinder.graphs.circuit import CircuitFileError
    from circuitfinder.tasks.base import TaskError

    for error in (TaskError, CircuitFileError, MetricError):
        assert issubclass(error, UserError) and issubclass(error, ValueError)
