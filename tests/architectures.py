"""One tiny random-weight model per decoder family that transformers builds offline and
TransformerLens 4's bridge wraps: the architecture matrix (tests/test_architectures.py).

Every model has 3 layers, 4 query heads (2 key/value groups where the family has grouped-query
attention), d_model 16 and a 40-token vocabulary. Parallel-block families are built parallel
(GPT-NeoX both ways). Weights are randomised like the three block styles of ``tiny_models``.
"""

from __future__ import annotations

import torch
import transformers as tf

from tiny_models import VOCAB, _randomise

COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA_LIKE = dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                  intermediate_size=32, max_position_embeddings=64, **COMMON)

# name: (config class, config keywords)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_layer=3, n_head=4, n_embd=16, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
                                embd_pdrop=0.0, **COMMON)),
    "gpt-neox-parallel": ("GPTNeoXConfig", dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=16,
                                                intermediate_size=32, max_position_embeddings=64, rotary_pct=0.5,
                                                use_parallel_residual=True, **COMMON)),
    "gpt-neox-sequential": ("GPTNeoXConfig", dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=16,
                                                  intermediate_size=32, max_position_embeddings=64, rotary_pct=0.5,
                                                  use_parallel_residual=False, **COMMON)),
    "gptj": ("GPTJConfig", dict(n_layer=3, n_head=4, n_embd=16, n_positions=64, rotary_dim=2, attn_pdrop=0.0,
                                resid_pdrop=0.0, embd_pdrop=0.0, **COMMON)),
    "gpt-neo": ("GPTNeoConfig", dict(num_layers=3, num_heads=4, hidden_size=16, max_position_embeddings=64,
                                     attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=4,
                                     **COMMON)),
    "opt": ("OPTConfig", dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=16, ffn_dim=32,
                              word_embed_proj_dim=16, max_position_embeddings=64, **COMMON)),
    "bloom": ("BloomConfig", dict(n_layer=3, n_head=4, hidden_size=16, **COMMON)),
    "falcon": ("FalconConfig", dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=16, parallel_attn=True,
                                    new_decoder_architecture=False, multi_query=True, alibi=False, **COMMON)),
    "phi": ("PhiConfig", dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=16, intermediate_size=32,
                              max_position_embeddings=64, partial_rotary_factor=0.5, **COMMON)),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, pad_token_id=0)),
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", dict(LLAMA_LIKE, sliding_window=None)),
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=4)),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=4)),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=4, query_pre_attn_scalar=4, sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "olmo2": ("Olmo2Config", LLAMA_LIKE),
    "stablelm": ("StableLmConfig", dict(LLAMA_LIKE, partial_rotary_factor=0.5)),
    "cohere": ("CohereConfig", LLAMA_LIKE),
}


# Architectures refused, and a phrase their one-line refusal contains.
NO_QKV_SPLIT = "separate query/key/value inputs"
EXPECTED_REFUSAL = {"gptj": NO_QKV_SPLIT, "gpt-neo": NO_QKV_SPLIT, "opt": NO_QKV_SPLIT,
                    "bloom": "query/key/value inputs do not act as the model's"}
# Mixture-of-experts: transformers' grouped expert matmul has no float64 kernel (float32 is exact to its rounding).
FLOAT32_ONLY = {"mixtral"}


def load_dtype(name: str) -> torch.dtype:
    """The dtype an architecture is tested in: float64, or float32 where it cannot run in float64."""
    return torch.float32 if name in FLOAT32_ONLY else torch.float64


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64, vocab: int = VOCAB):
    """The tiny Hugging Face model of one architecture, randomised, in ``dtype``, eval mode."""
    config_class, kwargs = ARCHITECTURES[name]
    config = getattr(tf, config_class)(**(kwargs | {"vocab_size": vocab}))
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomise(model, seed)
    model.config.architectures = [type(model).__name__]
    return model.to(dtype).eval()
