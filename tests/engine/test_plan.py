"""The memory plan: shapes from configs without weights, the plan's terms, and ``circuits plan``."""

from __future__ import annotations

import re

import pytest
import torch
from architectures import ARCHITECTURES, EXPECTED_REFUSAL, build
from cli_runner import run_in_process
from helpers import adapter_for, tokenizer  # noqa: F401 (fixture)
from tiny_models import random_pair

from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import run_recording_senders
from circuitfinder.engine.plan import (
    KNOWN_CONFIGS,
    LIBRARIES,
    TOKENIZER_BYTES,
    largest_batch,
    memory_plan,
    parse_shape,
    plan_shape,
    shape_from_config,
)
from circuitfinder.engine.precision import parse_dtype
from circuitfinder.errors import UserError

# Parameter counts published with the models (model cards / the original papers' configs).
PUBLISHED_PARAMS = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "google/gemma-2-2b": 2_614_341_888,
    "gpt2": 124_439_808,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_known_configs_have_their_published_parameter_counts(name):
    assert shape_from_config(name, KNOWN_CONFIGS[name]).n_params == PUBLISHED_PARAMS[name]


def test_llama_3_8b_has_805681_edges_with_its_groups_kept():
    shape = plan_shape("llama-3-8b")
    assert shape.n_edges == 805_681
    assert (shape.n_senders, shape.n_receivers) == (1 + 32 * 33, 32 * (32 + 16 + 1) + 1)
    # a Llama-style shape by hand counts the same parameters as transformers' model
    by_hand = parse_shape("layers=32,heads=32,groups=8,d_model=4096,d_mlp=14336,vocab=128256")
    assert (by_hand.n_params, by_hand.n_edges) == (shape.n_params, shape.n_edges)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_config_alone_gives_the_adapters_edge_graph_and_the_models_parameters(name, tokenizer):  # noqa: F811
    from circuitfinder.engine.families import refusal

    model = build(name)
    if (why := refusal(model)) is not None:  # refused by name: no graph to plan, and the plan says why in one line
        with pytest.raises(UserError, match="^" + re.escape(f"{name}: {why}") + "$"):
            shape_from_config(name, model.config.to_dict())
        return
    shape = shape_from_config(name, model.config.to_dict())
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    if name in EXPECTED_REFUSAL:  # refused at load: no bridge view to compare with
        return
    graph = EdgeGraph(adapter_for(name, tokenizer).shape)  # the bridge's own view of the model
    assert (shape.n_edges, shape.n_senders, shape.n_receivers) == (graph.n_edges, graph.n_senders, graph.n_receivers)


def test_the_sender_term_is_the_engines_own_buffer(tokenizer):  # noqa: F811
    adapter = adapter_for("llama", tokenizer)
    clean, _ = random_pair(batch=3, pos=6)
    buffer, _ = run_recording_senders(adapter, EdgeGraph(adapter.shape), clean)
    shape = shape_from_config("llama", build("llama").config.to_dict())
    plan = memory_plan(shape, torch.float64, batch=3, positions=6)
    assert plan.terms["sender buffers"] == 2 * buffer.numel() * buffer.element_size()  # ablated and its difference
    assert plan.terms["weights"] == shape.n_params * 8
    assert plan.terms["tokenizer"] == TOKENIZER_BYTES * shape.d_vocab and plan.terms["libraries"] == LIBRARIES
    assert plan.total == sum(plan.terms.values())
    assert plan.working == plan.total - plan.terms["weights"] - plan.terms["tokenizer"] - plan.terms["libraries"]
    on_gpu = memory_plan(shape, torch.float64, batch=3, positions=6, device="cuda")  # host memory leaves the plan
    assert on_gpu.terms["tokenizer"] == on_gpu.terms["libraries"] == 0 and on_gpu.working == plan.working


def test_largest_batch_is_the_largest_that_fits():
    shape = plan_shape("gpt2")
    for budget in (10**9, 4 * 10**9, 16 * 10**9):
        b = largest_batch(shape, budget, torch.bfloat16, 20)
        assert (
            memory_plan(shape, torch.bfloat16, b, 20).total
            <= budget
            < memory_plan(shape, torch.bfloat16, b + 1, 20).total
        )
    assert largest_batch(shape, 10**6) == 0  # not even the weights


def test_bad_shapes_and_dtypes_are_one_line_user_errors():
    for text in ("layers=2", "layers=2,heads=x,d_model=8", "depth=3,heads=2,d_model=8"):
        with pytest.raises(UserError, match="is not a shape"):
            parse_shape(text)
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(UserError, match="unknown model 'nosuch'"):
        plan_shape("nosuch")


def test_circuits_plan_prints_the_plan_and_the_batch_that_fits(capsys):
    code, out, _ = run_in_process(
        capsys,
        "plan",
        "--model",
        "meta-llama/Meta-Llama-3-8B",
        "--dtype",
        "bfloat16",
        "--memory",
        "80GB",
        "--device",
        "cuda",
    )
    assert code == 0
    assert "805,681 edges" in out and "8,030,261,248 parameters" in out and "weights                   16.1 GB" in out
    assert "tokenizer" not in out and "libraries" not in out  # host memory, not the GPU's
    want = largest_batch(plan_shape("llama-3-8b"), 80 * 10**9, torch.bfloat16, 24, device="cuda")
    assert f"largest batch that fits 80GB: {want}" in out and want > 0
    assert want > largest_batch(plan_shape("llama-3-8b"), 80 * 10**9, torch.bfloat16, 24)  # on a CPU the host shares it
    # a refereed search holds the float32 model (its own plan) and the bfloat16 copy of the weights
    f32 = memory_plan(plan_shape("llama-3-8b"), torch.float32, 16, 24, "cuda").total
    assert f32 + 2 * 8_030_261_248 > 80 * 10**9  # 87.2 GB: batches of 16 leave no room for the referee
    assert (
        f"refereed in float32 (the default; `--no-referee` runs it in bfloat16 alone): the float32 model's plan "
        f"and this copy of the weights, {(f32 + 2 * 8_030_261_248) / 1e9:,.1f} GB, more than 80GB" in out
    )
    code, _, err = run_in_process(capsys, "plan", "--memory", "lots")
    assert code == 2 and err.strip() == "error: --memory 'lots' is not a size: write e.g. 80GB or 512MB"
    code, _, err = run_in_process(capsys, "plan", "--device", "tpu", "--memory", "80GB")
    assert code == 2 and err.strip() == "error: unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "int8"], "error: unknown dtype 'int8': use auto, float32, bfloat16, float16 or float64"),
        (["--device", "tpu"], "error: unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_discover_refuses_a_bad_dtype_or_device_in_one_line(capsys, args, message):
    code, _, err = run_in_process(capsys, "discover", *args)
    assert code == 2 and err.strip() == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_where_there_is_none_is_one_line(capsys):
    code, _, err = run_in_process(capsys, "discover", "--device", "cuda")
    assert code == 2 and err.strip() == "error: device 'cuda': this machine has 0 CUDA GPU(s); use --device cpu or auto"
