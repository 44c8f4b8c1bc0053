"""Every tensor of a run is made on the model's device.

A CPU machine has one device, so the test makes a second: the default device is set to ``meta``
for the whole run (model loaded before, on the CPU). A tensor made without naming a device then
lands on ``meta``; the first operation that mixes it with the model's tensors fails, and its
values cannot be read. On a GPU the same tensor would land on the CPU. A run that passes gives
exactly the circuit and the figures of a run without the trap.
"""

import pytest
import torch
from tiny_models import tiny_hf_model

from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.runs.run import run_config


@pytest.fixture(scope="module")
def tiny_ioi_model(word_tokenizer):
    model = tiny_hf_model("llama", seed=0, dtype=torch.float64, vocab=len(word_tokenizer))
    return ModelAdapter.from_hf(model, word_tokenizer, name="tiny-llama", hf_id="llama", dtype=torch.float64)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "acdc-groups", "acdc"])
def test_a_run_makes_every_tensor_on_the_models_device(tiny_ioi_model, method, tmp_path):
    config = DiscoverConfig.from_options(
        task="ioi",
        model="tiny-llama",
        method=method,
        n_pairs=16,
        batch_size=8,
        force=True,
        dtype="float64",
        search_prompts=8,
        curve=True,
    )
    from circuitfinder.runs.pipeline import build_run_task

    task = build_run_task(config, tiny_ioi_model.tokenizer)  # host-side data, moved to the device by its batches
    plain = run_config(config, adapter=tiny_ioi_model, task=task).summary
    torch.set_default_device("meta")
    try:
        trapped = run_config(config, adapter=tiny_ioi_model, task=task).summary
    finally:
        torch.set_default_device(None)
    for key in ("edges_kept", "nodes_kept", "faithfulness", "metric_clean", "metric_corrupted", "cpr"):
        assert getattr(trapped, key) == getattr(plain, key), key
