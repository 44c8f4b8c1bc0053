"""Tiny random-weight models of three block styles, wrapped like the real ones.

GPT-2 style: LayerNorm, fused qkv, learned positions, biases. Llama style: RMSNorm, rotary
positions, grouped-query attention (4 query heads sharing 2 key/value groups). Gemma-3 style:
the Llama style plus post-attention and post-MLP norms, q/k norms, embeddings scaled by
sqrt(d_model), tied unembedding, and a sliding window (4 tokens) on two of the three layers.
Biases and norm weights are randomised too, so no term of the residual stream is trivially zero.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.tasks.base import Task, logit_difference

VOCAB = 40


def tiny_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 … w{VOCAB-1}`` (saved and reloaded, as the bridge needs)."""
    words = {f"w{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="w0", pad_token="w0", unk_token="w0")
    tok.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights; norm scales near 1, biases small but non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm = p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else noise * (0.3 if p.dim() > 1 else 0.1))


def tiny_hf_model(style: str, seed: int = 0, dtype: torch.dtype = torch.float64, vocab: int = VOCAB):
    if style == "gpt2":
        config = GPT2Config(
            n_layer=3,
            n_head=4,
            n_embd=16,
            vocab_size=vocab,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    elif style == "llama":
        config = LlamaConfig(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=16,
            intermediate_size=32,
            vocab_size=vocab,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    elif style == "gemma3":
        config = Gemma3TextConfig(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=16,
            head_dim=8,
            intermediate_size=32,
            vocab_size=vocab,
            max_position_embeddings=64,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(style)
    _randomise(model, seed)
    model.config.architectures = [type(model).__name__]
    return model.to(dtype).eval()


def tiny_adapter(style: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float64) -> ModelAdapter:
    model = tiny_hf_model(style, seed, dtype)
    return ModelAdapter.from_hf(model, tiny_tokenizer(folder), name=f"tiny-{style}", hf_id=style, dtype=dtype)


STYLES = ("gpt2", "llama", "gemma3")


@pytest.fixture(scope="session", params=STYLES)
def tiny(request, tmp_path_factory) -> ModelAdapter:
    """A tiny float64 model of each block style."""
    return tiny_adapter(request.param, tmp_path_factory.mktemp(f"tok-{request.param}"))


def random_pair(batch: int = 3, pos: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted token ids of equal shape."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, pos), generator=g), torch.randint(0, VOCAB, (batch, pos), generator=g)


def add_to_receiver_hook(adapter: ModelAdapter, graph, receiver: int, delta: torch.Tensor) -> tuple:
    """A hook adding ``delta`` ``[batch, pos, d]`` to one receiver's input (a test reference)."""
    from circuitfinder.engine.checks import receiver_delta_hook

    point = next(p for p in graph.receiver_points if p.start <= receiver < p.stop)
    return receiver_delta_hook(adapter, point, receiver, delta)


def load_tiny_gpt2() -> ModelAdapter:
    """The tiny GPT-2 model, built where it is called (Ray workers build their own replica)."""
    import tempfile

    return tiny_adapter("gpt2", Path(tempfile.mkdtemp(prefix="tiny-tok-")))


def skip_post_norm(adapter: ModelAdapter) -> None:
    """Skip on a shared post-attention norm (Gemma-3): mean/zero ablation, EAP-IG on activations
    and node-patching derivatives are not yet defined there, and runs refuse them."""
    if adapter.shape.post_norm:
        pytest.skip("not defined under a shared post-attention norm yet (runs refuse it)")


def assert_exact(adapter: ModelAdapter, got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` equals ``want`` to the model's exact tolerance (``circuitfinder.engine.precision``)."""
    from circuitfinder.engine.precision import tolerance_for

    tol = tolerance_for(adapter, want)
    diff = (got - want).abs().max().item()
    assert got.shape == want.shape and diff <= tol, (
        f"differs by {diff:.3g} > {tol:.3g} ({adapter.name}, working {adapter.working_dtype})"
    )


def circuit_of(
    model: str,
    task: str,
    method: str,
    n_layers: int,
    n_heads: int,
    n_kv_groups: int,
    edges: list[dict],
    metadata: dict | None = None,
    roles: dict | None = None,
    parallel: bool = False,
    post_norm: bool = False,
):
    """A ``Circuit`` of the named edges on the edge graph of a model of this shape (for tests of the
    circuit layer that need no model)."""
    from circuitfinder.engine.adapter import ModelShape
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.graphs.circuit import Circuit

    shape = ModelShape(n_layers, n_heads, n_kv_groups, d_model=0, post_norm=post_norm, parallel=parallel)
    return Circuit.from_edges(
        EdgeGraph(shape), edges, model=model, task=task, method=method, metadata=metadata or {}, roles=roles or {}
    )


def tiny_task(n: int = 4, pos: int = 6, seed: int = 0) -> Task:
    """``n`` random clean/corrupted pairs of ``pos`` tokens (unequal lengths) for the tiny models."""
    clean, corrupted = random_pair(n, pos, seed)
    lengths = torch.tensor([pos, pos - 1, pos, pos - 2][:n])
    return Task(
        name="tiny",
        clean=clean,
        corrupted=corrupted,
        lengths=lengths,
        answer=torch.tensor([1, 2, 3, 4][:n]),
        wrong=torch.tensor([5, 6, 7, 8][:n]),
        split=("discovery",) * n,
    )


def mean_metric(adapter, graph, task, removed) -> float:
    """Mean metric over the task with ``removed`` patch weights, by exact patching (one batch)."""
    (batch,) = task.batches("discovery", batch_size=len(task))
    corr_senders, _ = run_recording_senders(adapter, graph, batch.corrupted)
    logits = patched_logits(adapter, graph, batch.clean, corr_senders, removed)
    rows = torch.arange(batch.size)
    return float(logit_difference(logits[rows, batch.last], batch).mean())


def patching_derivative(adapter, graph, task, s: int, r: int, eps: float) -> float:
    """d/dα of the exactly patched mean metric with edge (s, r) patched by weight α, at 0 (central difference)."""
    removed = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    removed[s, r] = eps
    up = mean_metric(adapter, graph, task, removed)
    removed[s, r] = -eps
    return (up - mean_metric(adapter, graph, task, removed)) / (2 * eps)
