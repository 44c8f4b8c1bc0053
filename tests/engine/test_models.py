"""Loading models by name: a local folder with a saved Hugging Face model, and the hub's error path."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import random_pair, tiny_hf_model, tiny_tokenizer

from circuitfinder.engine.adapter import load_unchecked
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.patching import patched_logits, run_recording_senders

ROOT = Path(__file__).resolve().parents[2]


def test_a_local_folder_with_a_saved_model_loads_and_patches_exactly(tmp_path):
    """save_pretrained of a random GPT-2 and its tokenizer, loaded through the public loader."""
    folder = tmp_path / "my-gpt2"
    original = tiny_hf_model("gpt2", dtype=torch.float32)
    original.save_pretrained(folder)
    tiny_tokenizer(folder)
    adapter = load_unchecked(str(folder))
    assert (adapter.shape.n_layers, adapter.shape.n_heads, adapter.shape.n_kv_groups) == (3, 4, 4)

    clean, corrupted = random_pair()
    with torch.no_grad():
        assert torch.allclose(adapter.logits(clean), original(clean).logits, atol=1e-5, rtol=0)
    graph = EdgeGraph(adapter.shape)
    corr_senders, corr_logits = run_recording_senders(adapter, graph, corrupted)
    clean_logits = adapter.logits(clean)
    full = patched_logits(adapter, graph, clean, corr_senders, torch.zeros(graph.allowed.shape))
    empty = patched_logits(adapter, graph, clean, corr_senders, torch.ones(graph.allowed.shape))
    assert (clean_logits - corr_logits).abs().max() > 1.0
    assert torch.allclose(full, clean_logits, atol=1e-5, rtol=0)
    assert torch.allclose(empty, corr_logits, atol=1e-5, rtol=0)


def test_an_unreachable_hub_is_one_line_naming_the_offline_choices():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "circuitfinder.cli", "discover", "--model", "nobody/no-such-model"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: cannot load 'nobody/no-such-model' from the Hugging Face hub")
    assert "smollm2-135m, gemma3-270m" in line and "local folder" in line and ".gguf" in line


def test_circuits_models_lists_bundled_models_with_their_edge_counts(capsys, monkeypatch, tmp_path):
    from circuitfinder.cli import models

    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    (tmp_path / "gemma3-270m").mkdir()
    (tmp_path / "gemma3-270m" / "model.safetensors").write_bytes(b"")
    models()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("smollm2-135m (default):") and "70,651 edges; not yet converted" in lines[0]
    assert lines[1].startswith("gemma3-270m:") and "1 kv group, 5,644 edges; cached" in lines[1]


FAULTS_ON_REWRITE = """
import ctypes, ctypes.util, resource, sys
from circuitfinder.engine.models import keep_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "kept":
    assert keep_freed_memory()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)  # 16,384 pages, written
    ctypes.memset(block, 1, 64 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
print(*faults)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_freed_buffer_is_reused_without_faulting_its_pages_in_again():
    """A 64 MB block written and freed three times: glibc's default maps it afresh each time (its
    pages faulted in again); after keep_freed_memory the later ones come from the heap, their pages
    already there. Each setting in a fresh process."""

    def faults(setting):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_ON_REWRITE, setting], capture_output=True, text=True, check=True
        )
        return [int(n) for n in out.stdout.split()]

    default, kept = faults("default"), faults("kept")
    assert min(default) > 8_000 and kept[0] > 8_000 and max(kept[1:]) < 1_000, (default, kept)
