"""tracr programs compiled to GPT-2 (scripts/tracr_compile.py): the converted models compute
tracr's function through the bridge, and their true circuits load as references."""

import json

import pytest
import torch

from circuitfinder.engine.adapter import load_unchecked
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.models import COMPILED
from circuitfinder.graphs.reference import load_reference, reference_mask

TRUE_EDGES = {"tracr-frac_prevs": 3, "tracr-reverse": 2, "tracr-pair_balance": 6}


def test_every_compiled_program_is_shipped():
    assert set(COMPILED) == set(TRUE_EDGES)


@pytest.mark.parametrize("name", sorted(TRUE_EDGES))
def test_converted_model_equals_tracr_on_every_input(name):
    """tracr's own float64 outputs (stored by the compile script, from tracr's model.apply) at
    every position of every input of lengths 1-4: the converted model through the bridge."""
    adapter = load_unchecked(name, dtype=torch.float64)
    program = json.loads((COMPILED[name] / "program.json").read_text())
    tok = adapter.tokenizer
    assert len(program["tracr"]) == sum(len(program["vocabulary"]) ** n for n in range(1, 5))
    worst = 0.0
    with torch.no_grad():
        for row in program["tracr"]:
            logits = adapter.bridge(torch.tensor([tok.convert_tokens_to_ids(["BOS", *row["input"]])]))[0]
            for token, values in row["outputs"].items():
                got = logits[:, tok.convert_tokens_to_ids(token)]
                worst = max(worst, float((got - torch.tensor(values, dtype=torch.float64)).abs().max()))
    assert worst < 1e-9  # measured: 6.1e-13 at most


@pytest.mark.parametrize("name", sorted(TRUE_EDGES))
def test_true_circuit_is_a_reference_over_the_models_graph(name):
    reference = load_reference(name)
    graph = EdgeGraph(load_unchecked(name, dtype=torch.float64).shape)
    assert int(reference_mask(reference, graph).sum()) == TRUE_EDGES[name]
    assert reference.published["weights_only_edges"] > TRUE_EDGES[name]  # the position-only q/k edges left out


@pytest.mark.parametrize("method", ["eap", "eap-ig", "acdc-whole-graph", "minimize", "acdc-groups"])
@pytest.mark.parametrize("name", sorted(TRUE_EDGES))
def test_methods_recover_the_compiled_circuit(name, method, tmp_path):
    """A regression check on the methods' science: each finds exactly the true circuit and ranks
    its edges first (edge and node ROC-AUC 1; ACDC over the whole graph has no scores, so its
    one-point ROC ranks its circuit's edges first). The run goes through the check at load and the
    behaviour check as any other: compiled models' all-zero components and saturated attention
    pass the first, and numerical outputs are not graded by accuracy in the second."""
    from circuitfinder.config import DiscoverConfig
    from circuitfinder.graphs.grading import grade_circuit
    from circuitfinder.runs.run import run_config

    settings = {"method": "acdc", "seed_method": "none"} if method == "acdc-whole-graph" else {"method": method}
    config = DiscoverConfig.from_options(
        task=name, model=name, n_pairs=32, batch_size=16, dtype="float64", roles=False, search_prompts=16, **settings
    )
    run = run_config(config, out=tmp_path / "run")
    graded = grade_circuit(run.circuit, name)
    assert run.summary.faithfulness == pytest.approx(1.0, abs=1e-6)
    for level in ("edges", "nodes"):
        assert graded[level]["precision"] == graded[level]["recall"] == graded[level]["roc_auc"] == 1.0


def test_a_tracr_task_refuses_another_model(tmp_path):
    from tiny_models import tiny_tokenizer

    from circuitfinder.tasks import TaskError, build_task

    with pytest.raises(TaskError, match="use --model tracr-reverse"):
        build_task("tracr-reverse", tiny_tokenizer(tmp_path))
