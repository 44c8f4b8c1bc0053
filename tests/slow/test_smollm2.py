"""Slow tests on the bundled SmolLM2-135M: loading, the IOI baseline, exact patching, a short run."""

import json

import pytest
import torch

from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.adapter import ModelShape, load_unchecked
from circuitfinder.engine.faithfulness import CircuitEvaluator
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.runs.run import run_config
from circuitfinder.tasks import build_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_unchecked("smollm2-135m")


@pytest.fixture(scope="module")
def ioi(smollm2):
    return build_task("ioi", smollm2.tokenizer, n_pairs=32, seed=0)


def test_smollm2_loads_with_its_published_shape(smollm2):
    assert smollm2.shape == ModelShape(n_layers=30, n_heads=9, n_kv_groups=3, d_model=576)
    assert EdgeGraph(smollm2.shape).n_edges == 70_651
    ids = smollm2.tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]
    logits = smollm2.logits(torch.tensor([ids]))
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Mary"


def test_ioi_shows_a_clear_gap_between_clean_and_corrupted(smollm2, ioi):
    baseline = CircuitEvaluator(smollm2, EdgeGraph(smollm2.shape), ioi, "heldout").baseline
    assert baseline.clean > 2.0 and abs(baseline.corrupted) < 1.0 and baseline.accuracy > 0.8


def test_full_and_empty_circuits_reproduce_clean_and_corrupted_runs(smollm2, ioi):
    graph = EdgeGraph(smollm2.shape)
    batch = next(ioi.batches("heldout", 8))
    corrupted_senders, corrupted_logits = run_recording_senders(smollm2, graph, batch.corrupted)
    with torch.no_grad():
        clean_logits = smollm2.logits(batch.clean)
    full = patched_logits(smollm2, graph, batch.clean, corrupted_senders, torch.zeros(graph.allowed.shape))
    empty = patched_logits(smollm2, graph, batch.clean, corrupted_senders, torch.ones(graph.allowed.shape))
    assert (clean_logits - corrupted_logits).abs().max() > 1.0
    assert torch.allclose(full, clean_logits, atol=1e-3, rtol=0)
    assert torch.allclose(empty, corrupted_logits, atol=1e-3, rtol=0)


def test_short_discovery_run_on_smollm2(smollm2, tmp_path):
    config = DiscoverConfig.from_options(task="ioi", model="smollm2-135m", method="eap-ig", n_pairs=32, edges=2000)
    summary = run_config(config, out=tmp_path / "run", adapter=smollm2).summary
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["edges_total"] == 70_651 and 0 < saved["edges_kept"] <= 2000
    assert (
        0.3 < summary.faithfulness <= 1.2
    )  # 2,000 EAP edges carry a good part of IOI (0.61 at this size in the default run)


def test_tasks_show_prints_pairs_and_the_baseline():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-m", "circuitfinder.cli", "tasks", "show", "ioi", "--pairs", "16", "--examples", "1"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "clean:" in result.stdout and "corrupted:" in result.stdout
    assert "baseline on smollm2-135m (held-out): clean" in result.stdout


def test_the_gguf_conversion_is_quiet_and_gives_the_cached_weights(smollm2, tmp_path, monkeypatch, capfd):
    """Converting the bundled GGUF again, into an empty cache, prints our one line and no tqdm bar,
    and writes the same float32 weights as the cache the other tests load."""
    import safetensors.torch

    from circuitfinder.engine.models import cache_root, load_pretrained

    default = cache_root() / "smollm2-135m" / "model.safetensors"
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    lines = []
    load_pretrained("smollm2-135m", lines.append)
    assert lines == [
        f"converting smollm2-135m from GGUF to float32 safetensors (once; cached in {tmp_path / 'smollm2-135m'})"
    ]
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "%|" not in err, err[-500:]
    fresh = safetensors.torch.load_file(tmp_path / "smollm2-135m" / "model.safetensors")
    cached = safetensors.torch.load_file(default)
    assert fresh.keys() == cached.keys() and all(torch.equal(fresh[k], cached[k]) for k in fresh)


def test_smollm2_passes_the_check_at_load(smollm2):
    from circuitfinder.engine.checks import check_model

    assert smollm2.working_dtype == torch.float32
    assert check_model(smollm2) < 0.1  # every exactness comparison well inside the float32 tolerance
