"""Helpers shared by several test files (imported by bare name: ``tests/`` is on pytest's path).

The architecture matrix's lookups on the Hugging Face modules and its cached adapters, the rows
of a valid task file, and the tiny IOI model of the run tests. Fixtures here are imported into a
test module to be used there (``from helpers import tokenizer  # noqa: F401 (fixture)``).
"""

from __future__ import annotations

import pytest
from architectures import ARCHITECTURES, EXPECTED_REFUSAL, build, load_dtype
from tiny_models import tiny_hf_model, tiny_tokenizer

from circuitfinder.engine.adapter import ModelAdapter

# --------------------------------------------------------------------------------------------
# The architecture matrix (tests/engine/test_architectures.py, test_sparse_circuits.py, ...)
# --------------------------------------------------------------------------------------------

EXACT = [a for a in ARCHITECTURES if a not in EXPECTED_REFUSAL]

FINAL_NORM = {
    "gpt2": "transformer.ln_f",
    "gpt-neox-parallel": "gpt_neox.final_layer_norm",
    "gpt-neox-sequential": "gpt_neox.final_layer_norm",
    "phi": "model.final_layernorm",
    "falcon": "transformer.ln_f",
    "falcon-sequential": "transformer.ln_f",
    "bloom": "transformer.ln_f",
    "gpt-bigcode": "transformer.ln_f",
    "gptj": "transformer.ln_f",
    "gpt-neo": "transformer.ln_f",
    "opt": "model.decoder.final_layer_norm",
    "xglm": "model.layer_norm",
    "modernbert-decoder": "model.final_norm",
}


def submodule(model, path: str):
    """The module at a dotted ``path`` under ``model``."""
    for part in path.split("."):
        model = getattr(model, part)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny word-level tokenizer of the architecture matrix."""
    return tiny_tokenizer(tmp_path_factory.mktemp("arch-tok"))


_ADAPTERS: dict[str, ModelAdapter] = {}


def adapter_for(name: str, tokenizer) -> ModelAdapter:
    """The tiny model of family ``name``, wrapped once per session (in its load precision)."""
    if name not in _ADAPTERS:
        dtype = load_dtype(name)
        _ADAPTERS[name] = ModelAdapter.from_hf(
            build(name, dtype=dtype), tokenizer, name=f"tiny-{name}", hf_id=name, dtype=dtype
        )
    return _ADAPTERS[name]


# Where each head's query and each group's key and value are computed, on the Hugging Face modules:
# (decoder layers, pre-attention norm or None where the attention reads the residual stream, attention
# module, its projection(s), the fused projection's column layout).
QKV = {
    name: ("model.layers", "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), None)
    for name in (
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "stablelm",
        "cohere",
        "phi",
        "olmo",
        "granite",
        "starcoder2",
        "smollm3",
        "nemotron",
        "glm",
        "glm4",
        "seed-oss",
        "arcee",
        "ernie4_5",
        "hunyuan-dense",
        "bitnet",
        "jais2",
        "ministral3",
        "cohere2",
        "vaultgemma",
        "olmoe",
        "granite-moe",
        "qwen2-moe",
        "qwen3-moe",
        "minimax-m2",
        "gpt-oss",
        "ernie4_5-moe",
        "glm4-moe",
        "phimoe",
        "llama4-text",
    )
}
QKV["apertus"] = ("model.layers", "attention_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), None)
for _name in ("olmo2", "olmo3", "flex-olmo", "exaone4"):  # the attention reads the residual stream (norms after it)
    QKV[_name] = ("model.layers", None, "self_attn", ("q_proj", "k_proj", "v_proj"), None)
QKV["gpt-bigcode"] = ("transformer.h", "ln_1", "attn", "c_attn", "q|k|v")  # multi-query: G = 1
QKV["gptj"] = ("transformer.h", "ln_1", "attn", ("q_proj", "k_proj", "v_proj"), None)
QKV["gpt-neo"] = ("transformer.h", "ln_1", "attn.attention", ("q_proj", "k_proj", "v_proj"), None)
QKV["opt"] = ("model.decoder.layers", "self_attn_layer_norm", "self_attn", ("q_proj", "k_proj", "v_proj"), None)
QKV["xglm"] = ("model.layers", "self_attn_layer_norm", "self_attn", ("q_proj", "k_proj", "v_proj"), None)
QKV["modernbert-decoder"] = (
    "model.layers",
    "attn_norm",
    "attn",
    ("q_proj", "k_proj", "v_proj"),
    None,
)  # layer 0: Identity
QKV["gpt2"] = ("transformer.h", "ln_1", "attn", "c_attn", "q|k|v")
QKV["phi3"] = ("model.layers", "input_layernorm", "self_attn", "qkv_proj", "q|k|v")
QKV["gpt-neox-parallel"] = QKV["gpt-neox-sequential"] = (
    "gpt_neox.layers",
    "input_layernorm",
    "attention",
    "query_key_value",
    "per-head qkv",
)
QKV["bloom"] = ("transformer.h", "input_layernorm", "self_attention", "query_key_value", "per-head qkv")
QKV["falcon"] = QKV["falcon-sequential"] = (
    "transformer.h",
    "input_layernorm",
    "self_attention",
    "query_key_value",
    "q|k|v",
)  # multi-query: G = 1


def qkv_columns(layout: str | None, kind: str, index: int, H: int, G: int, out_features: int) -> slice:
    """The output columns of a projection that hold one head's query or one group's key or value."""
    if layout is None:  # separate q, k and v projections
        width = out_features // (H if kind == "q" else G)
        return slice(index * width, (index + 1) * width)
    if layout == "per-head qkv":  # GPT-NeoX and BLOOM: view(batch, pos, heads, 3, head_dim)
        dh = out_features // (3 * H)
        start = index * 3 * dh + "qkv".index(kind) * dh
    else:  # [q of every head | k of every group | v of every group]
        dh = out_features // (H + 2 * G)
        start = {"q": 0, "k": H * dh, "v": (H + G) * dh}[kind] + index * dh
    return slice(start, start + dh)


# --------------------------------------------------------------------------------------------
# Task files: rows in the IOI form (tests/runs/test_tasks_files.py, the matrix's saved folders)
# --------------------------------------------------------------------------------------------

CLEAN = "When Kate and John went to the store, John gave a drink to"
CORRUPTED = "When Kate and John went to the store, Tom gave a drink to"
ROW = {"clean": CLEAN, "corrupted": CORRUPTED, "answer": " Kate", "wrong": " John"}


def task_rows(n: int) -> list[dict]:
    """``n`` distinct valid rows."""
    names = ["Kate", "Amy", "Dan", "Anna", "Emma", "Julie", "Alice", "Grace", "Rachel", "Rose"]
    return [
        {
            "clean": CLEAN.replace("Kate", m),
            "corrupted": CORRUPTED.replace("Kate", m),
            "answer": " " + m,
            "wrong": " John",
        }
        for m in names[:n]
    ]


# --------------------------------------------------------------------------------------------
# The tiny IOI model of the run tests (tests/runs/test_run.py, tests/methods/test_reliability.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ioi_model(word_tokenizer):
    """A tiny random Llama (float32) whose vocabulary holds the IOI words."""
    model = tiny_hf_model("llama", seed=0, dtype=__import__("torch").float32, vocab=len(word_tokenizer))
    return ModelAdapter.from_hf(model, word_tokenizer, name="tiny-llama", hf_id="llama")
