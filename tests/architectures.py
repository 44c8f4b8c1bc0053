"""One tiny random-weight model per decoder family that transformers builds offline and
TransformerLens 4's bridge wraps: the architecture matrix (tests/engine/test_architectures.py).

Every model has 3 layers, 4 query heads (2 key/value groups where the family has grouped-query
attention), d_model 16 and a 40-token vocabulary. Parallel-block families are built parallel
(GPT-NeoX both ways). Weights are randomised like the three block styles of ``tiny_models``.
"""

from __future__ import annotations

import copy

import torch
import transformers as tf
from tiny_models import VOCAB, _randomise

COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
LLAMA_LIKE = dict(
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=16,
    intermediate_size=32,
    max_position_embeddings=64,
    **COMMON,
)
SLIDING_FULL_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]

# name: (config class, config keywords)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "gpt2": (
        "GPT2Config",
        dict(n_layer=3, n_head=4, n_embd=16, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **COMMON),
    ),
    "gpt-neox-parallel": (
        "GPTNeoXConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=64,
            rotary_pct=0.5,
            use_parallel_residual=True,
            **COMMON,
        ),
    ),
    "gpt-neox-sequential": (
        "GPTNeoXConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=64,
            rotary_pct=0.5,
            use_parallel_residual=False,
            **COMMON,
        ),
    ),
    "gptj": (
        "GPTJConfig",
        dict(
            n_layer=3,
            n_head=4,
            n_embd=16,
            n_positions=64,
            rotary_dim=2,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
    ),
    "gpt-neo": (
        "GPTNeoConfig",
        dict(
            num_layers=3,
            num_heads=4,
            hidden_size=16,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            window_size=4,
            **COMMON,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            ffn_dim=32,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
            **COMMON,
        ),
    ),
    "bloom": ("BloomConfig", dict(n_layer=3, n_head=4, hidden_size=16, **COMMON)),
    "falcon": (
        "FalconConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            parallel_attn=True,
            new_decoder_architecture=False,
            multi_query=True,
            alibi=False,
            **COMMON,
        ),
    ),
    "falcon-sequential": (
        "FalconConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            parallel_attn=False,
            new_decoder_architecture=False,
            multi_query=True,
            alibi=False,
            **COMMON,
        ),
    ),
    "falcon-new": (
        "FalconConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            num_kv_heads=2,
            new_decoder_architecture=True,
            alibi=False,
            **COMMON,
        ),
    ),
    "phi": (
        "PhiConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=64,
            partial_rotary_factor=0.5,
            **COMMON,
        ),
    ),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, pad_token_id=0)),
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", dict(LLAMA_LIKE, sliding_window=None)),
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=4)),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=4)),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=4, query_pre_attn_scalar=4, sliding_window=4)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            LLAMA_LIKE,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "olmo2": ("Olmo2Config", LLAMA_LIKE),
    "stablelm": ("StableLmConfig", dict(LLAMA_LIKE, partial_rotary_factor=0.5)),
    "cohere": ("CohereConfig", LLAMA_LIKE),
    # Llama-like decoders (pre-norm, rotary, split q/k/v projections) and their variants.
    "olmo": ("OlmoConfig", LLAMA_LIKE),
    "olmo3": ("Olmo3Config", dict(LLAMA_LIKE, sliding_window=4, layer_types=SLIDING_FULL_SLIDING)),
    "granite": (
        "GraniteConfig",
        dict(
            LLAMA_LIKE, embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.25
        ),
    ),
    "starcoder2": (
        "Starcoder2Config",
        dict(LLAMA_LIKE, sliding_window=None, residual_dropout=0.0, embedding_dropout=0.0),
    ),
    "smollm3": ("SmolLM3Config", dict(LLAMA_LIKE, no_rope_layers=[1, 0, 1])),
    "nemotron": ("NemotronConfig", dict(LLAMA_LIKE, head_dim=4)),
    "glm": ("GlmConfig", dict(LLAMA_LIKE, head_dim=4)),
    "glm4": ("Glm4Config", dict(LLAMA_LIKE, head_dim=4)),
    "exaone4": ("Exaone4Config", dict(LLAMA_LIKE, sliding_window=4, layer_types=SLIDING_FULL_SLIDING)),
    "seed-oss": ("SeedOssConfig", dict(LLAMA_LIKE, head_dim=4, residual_dropout=0.0)),
    "apertus": ("ApertusConfig", LLAMA_LIKE),
    "arcee": ("ArceeConfig", LLAMA_LIKE),
    "ernie4_5": ("Ernie4_5Config", dict(LLAMA_LIKE, head_dim=4)),
    "hunyuan-dense": ("HunYuanDenseV1Config", dict(LLAMA_LIKE, head_dim=4)),
    "bitnet": ("BitNetConfig", LLAMA_LIKE),
    "jais2": ("Jais2Config", dict(LLAMA_LIKE, head_dim=4)),
    "ministral3": ("Ministral3Config", dict(LLAMA_LIKE, head_dim=4, sliding_window=None)),
    "nanochat": ("NanoChatConfig", LLAMA_LIKE),
    "cohere2": ("Cohere2Config", dict(LLAMA_LIKE, sliding_window=4, layer_types=SLIDING_FULL_SLIDING)),
    "vaultgemma": (
        "VaultGemmaConfig",
        dict(LLAMA_LIKE, head_dim=4, query_pre_attn_scalar=4, sliding_window=4, layer_types=SLIDING_FULL_SLIDING),
    ),
    "gemma4-text": (
        "Gemma4TextConfig",
        dict(
            LLAMA_LIKE,
            head_dim=8,
            sliding_window=4,
            layer_types=SLIDING_FULL_SLIDING,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=VOCAB,
        ),
    ),
    "modernbert-decoder": (
        "ModernBertDecoderConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=64,
            local_attention=4,
            embedding_dropout=0.0,
            mlp_dropout=0.0,
            attention_dropout=0.0,
            cls_token_id=0,
            sep_token_id=0,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            **COMMON,
        ),
    ),
    "hrm-text": (
        "HrmTextConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=64,
            head_dim=4,
            H_cycles=1,
            L_cycles=1,
            **COMMON,
        ),
    ),
    # GPT-style decoders: LayerNorm, learned or rotary positions, fused or split projections.
    "gpt-bigcode": (
        "GPTBigCodeConfig",
        dict(
            n_layer=3,
            n_head=4,
            n_embd=16,
            n_positions=64,
            multi_query=True,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
    ),
    "codegen": (
        "CodeGenConfig",
        dict(
            n_layer=3,
            n_head=4,
            n_embd=16,
            n_positions=64,
            n_ctx=64,
            rotary_dim=2,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
    ),
    "mpt": (
        "MptConfig",
        dict(
            n_layers=3,
            n_heads=4,
            d_model=16,
            max_seq_len=64,
            expansion_ratio=2,
            resid_pdrop=0.0,
            emb_pdrop=0.0,
            attn_config={"alibi": True, "attn_pdrop": 0},
            **COMMON,
        ),
    ),
    "openai-gpt": (
        "OpenAIGPTConfig",
        dict(n_layer=3, n_head=4, n_embd=16, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **COMMON),
    ),
    "xglm": (
        "XGLMConfig",
        dict(
            num_layers=3,
            attention_heads=4,
            d_model=16,
            ffn_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            **COMMON,
        ),
    ),
    # Mixture-of-experts decoders.
    "olmoe": ("OlmoeConfig", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    "flex-olmo": ("FlexOlmoConfig", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    "granite-moe": (
        "GraniteMoeConfig",
        dict(
            LLAMA_LIKE,
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=2.0,
            logits_scaling=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.25,
        ),
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(
            LLAMA_LIKE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
        ),
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(LLAMA_LIKE, head_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8),
    ),
    "phimoe": (
        "PhimoeConfig",
        dict(
            LLAMA_LIKE,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            router_jitter_noise=0.0,
            input_jitter_noise=0.0,
        ),
    ),
    "jetmoe": (
        "JetMoeConfig",
        dict(
            num_hidden_layers=3,
            hidden_size=16,
            num_key_value_heads=2,
            kv_channels=4,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            **COMMON,
        ),
    ),
    "minimax-m2": (
        "MiniMaxM2Config",
        dict(LLAMA_LIKE, head_dim=4, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0),
    ),
    "gpt-oss": (
        "GptOssConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=SLIDING_FULL_SLIDING,
        ),
    ),
    "ernie4_5-moe": (
        "Ernie4_5_MoeConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            moe_intermediate_size=8,
            moe_k=2,
            moe_num_experts=4,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_interval=1,
        ),
    ),
    "llama4-text": (
        "Llama4TextConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            intermediate_size_mlp=32,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            attention_chunk_size=4,
            no_rope_layers=[1, 1, 0],
            layer_types=["chunked_attention", "chunked_attention", "full_attention"],
        ),
    ),
    "afmoe": (
        "AfmoeConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            moe_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            num_shared_experts=1,
            num_dense_layers=1,
            sliding_window=4,
            layer_types=SLIDING_FULL_SLIDING,
        ),
    ),
    "laguna": (
        "LagunaConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            num_attention_heads_per_layer=[4, 4, 4],
            layer_types=SLIDING_FULL_SLIDING,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "glm4-moe": (
        "Glm4MoeConfig",
        dict(
            LLAMA_LIKE,
            moe_intermediate_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
        ),
    ),
    # Multi-head latent attention (DeepSeek-style): keys and values from a shared low-rank latent.
    "deepseek-v2": (
        "DeepseekV2Config",
        dict(
            LLAMA_LIKE,
            num_key_value_heads=4,
            kv_lora_rank=8,
            q_lora_rank=None,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=4,
            head_dim=4,
            moe_intermediate_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
        ),
    ),
    "deepseek-v3": (
        "DeepseekV3Config",
        dict(
            LLAMA_LIKE,
            num_key_value_heads=4,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=4,
            moe_intermediate_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
        ),
    ),
    "glm4-moe-lite": (
        "Glm4MoeLiteConfig",
        dict(
            LLAMA_LIKE,
            num_key_value_heads=4,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=4,
            moe_intermediate_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
    "youtu": (
        "YoutuConfig",
        dict(
            LLAMA_LIKE,
            num_key_value_heads=4,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=4,
        ),
    ),
    "glm-moe-dsa": (
        "GlmMoeDsaConfig",
        dict(
            LLAMA_LIKE,
            num_key_value_heads=4,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=4,
            head_dim=8,
            moe_intermediate_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            index_topk=4,
            index_head_dim=8,
            index_n_heads=2,
            first_k_dense_replace=1,
            mlp_layer_types=["dense", "sparse", "sparse"],
            layer_types=["indexed_attention"] * 3,
            indexer_types=["full"] * 3,
        ),
    ),
    "deepseek-v4": (
        "DeepseekV4Config",
        dict(
            LLAMA_LIKE,
            head_dim=8,
            q_lora_rank=8,
            moe_intermediate_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            sliding_window=4,
            o_groups=2,
            o_lora_rank=8,
            index_n_heads=2,
            index_head_dim=8,
            index_topk=4,
            num_nextn_predict_layers=0,
            hc_mult=2,
            layer_types=["compressed_sparse_attention"] * 3,
            mlp_layer_types=["moe"] * 3,
        ),
    ),
    # Blocks without attention heads, alone or in hybrid stacks: refused by name (circuitfinder.engine.families).
    "mamba": (
        "MambaConfig",
        dict(num_hidden_layers=3, hidden_size=16, state_size=4, expand=2, conv_kernel=2, **COMMON),
    ),
    "mamba2": (
        "Mamba2Config",
        dict(
            num_hidden_layers=3,
            hidden_size=16,
            state_size=4,
            num_heads=4,
            head_dim=8,
            n_groups=1,
            expand=2,
            conv_kernel=2,
            chunk_size=8,
            **COMMON,
        ),
    ),
    "falcon-mamba": (
        "FalconMambaConfig",
        dict(num_hidden_layers=3, hidden_size=16, state_size=4, expand=2, conv_kernel=2, **COMMON),
    ),
    "rwkv": (
        "RwkvConfig",
        dict(
            num_hidden_layers=3,
            hidden_size=16,
            attention_hidden_size=16,
            intermediate_size=32,
            context_length=64,
            **COMMON,
        ),
    ),
    "recurrent-gemma": (
        "RecurrentGemmaConfig",
        dict(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=16,
            intermediate_size=32,
            lru_width=16,
            attention_window_size=4,
            conv1d_width=2,
            block_types=["recurrent", "attention", "recurrent"],
            **COMMON,
        ),
    ),
    "jamba": (
        "JambaConfig",
        dict(
            LLAMA_LIKE,
            num_experts=2,
            num_experts_per_tok=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            use_mamba_kernels=False,
        ),
    ),
    "bamba": (
        "BambaConfig",
        dict(
            LLAMA_LIKE,
            attn_layer_indices=[1],
            mamba_n_heads=4,
            mamba_d_head=8,
            mamba_n_groups=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_chunk_size=8,
        ),
    ),
    "zamba2": (
        "Zamba2Config",
        dict(
            LLAMA_LIKE,
            layers_block_type=["mamba", "hybrid", "mamba"],
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_ngroups=1,
            n_mamba_heads=4,
            chunk_size=8,
            use_mamba_kernels=False,
            num_mem_blocks=1,
        ),
    ),
    "nemotron-h": (
        "NemotronHConfig",
        dict(
            COMMON,
            num_hidden_layers=3,
            hidden_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            intermediate_size=32,
            max_position_embeddings=64,
            layers_block_type=["mamba", "attention", "mlp"],
            ssm_state_size=4,
            mamba_num_heads=4,
            mamba_head_dim=8,
            n_groups=1,
            conv_kernel=2,
            expand=2,
            chunk_size=8,
            use_mamba_kernels=False,
        ),
    ),
    "falcon-h1": (
        "FalconH1Config",
        dict(
            LLAMA_LIKE,
            mamba_d_ssm=16,
            mamba_n_heads=4,
            mamba_d_head=4,
            mamba_n_groups=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_chunk_size=8,
        ),
    ),
    "lfm2": ("Lfm2Config", dict(LLAMA_LIKE, layer_types=["conv", "full_attention", "conv"], conv_L_cache=2)),
    "lfm2-moe": (
        "Lfm2MoeConfig",
        dict(
            LLAMA_LIKE,
            moe_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            num_dense_layers=1,
            layer_types=["conv", "full_attention", "conv"],
            conv_L_cache=2,
        ),
    ),
    "olmo-hybrid": (
        "OlmoHybridConfig",
        dict(
            LLAMA_LIKE,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=4,
            linear_value_head_dim=4,
            linear_conv_kernel_dim=2,
        ),
    ),
    "qwen3-next": (
        "Qwen3NextConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=4,
            linear_value_head_dim=4,
            linear_conv_kernel_dim=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
        ),
    ),
    "qwen3.5": (
        "Qwen3_5TextConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=4,
            linear_value_head_dim=4,
            linear_conv_kernel_dim=2,
        ),
    ),
    "qwen3.5-moe": (
        "Qwen3_5MoeTextConfig",
        dict(
            LLAMA_LIKE,
            head_dim=4,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=4,
            linear_value_head_dim=4,
            linear_conv_kernel_dim=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
        ),
    ),
    "granite-moe-hybrid": (
        "GraniteMoeHybridConfig",
        dict(
            LLAMA_LIKE,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=16,
            layer_types=["mamba", "attention", "mamba"],
            mamba_n_heads=4,
            mamba_d_head=8,
            mamba_n_groups=1,
            mamba_d_state=4,
            mamba_d_conv=2,
            mamba_expand=2,
            mamba_chunk_size=8,
        ),
    ),
}


# Decoder families TransformerLens 4.3's bridge registers that are not in the matrix:
# - remote code only, not in transformers (cannot be built offline): Baichuan, InternLM2, Qwen (v1), EXAONE 3
#   (transformers' "exaone" type loads as LlamaForCausalLM), OpenELM, Ouro, Raven, RWKV-7, MinGPT, NanoGPT,
#   NeelSoluOld, HyenaDNA (not a transformer), and the diffusion LMs Dream, LLaDA, LLaDA2-MoE, BD3LM, GIDD;
# - Gemma-3n: the bridge registers only the multimodal Gemma3nForConditionalGeneration, not transformers'
#   text-only Gemma3nForCausalLM (families.refusal names both: AltUp residual streams);
# - multimodal or encoder-decoder wrappers (Llama-4, Gemma-3/4, Mistral-3, Qwen2.5-VL/3-VL/3.5, LLaVA, Idefics3,
#   GLM-4V, Florence-2, T5/T5Gemma, BART, ...) and encoders (BERT, RoBERTa, ModernBERT encoder): not decoder-only
#   text models.

# Architectures refused, and a phrase their one-line refusal contains.
NO_QKV_SPLIT = "separate query/key/value inputs"
NO_HEADS = "no attention heads"
NOT_A_SUM = "is not the sum of the heads' and MLPs' outputs"
EXPECTED_REFUSAL = {
    # No per-head query/key/value the adapter can split (circuitfinder.engine.adapter says which and why): JetMoE's
    # attention experts routed per token, AFMoE's and Laguna's output gates, MLA's shared latent, GLM-MoE-DSA's index.
    **dict.fromkeys(
        ["jetmoe", "afmoe", "laguna", "deepseek-v2", "deepseek-v3", "glm4-moe-lite", "youtu", "glm-moe-dsa"],
        NO_QKV_SPLIT,
    ),
    "bloom": "query/key/value inputs do not act as the model's",
    "mpt": "(blocks.0.hook_q_input) never fires",  # the bridge's ALiBi attention takes the split flag and ignores it
    # refused by name before the bridge boots (circuitfinder.engine.families)
    **dict.fromkeys(
        [
            "mamba",
            "mamba2",
            "falcon-mamba",
            "rwkv",
            "recurrent-gemma",
            "jamba",
            "bamba",
            "zamba2",
            "nemotron-h",
            "falcon-h1",
            "lfm2",
            "lfm2-moe",
            "olmo-hybrid",
            "qwen3-next",
            "qwen3.5",
            "qwen3.5-moe",
            "granite-moe-hybrid",
        ],
        NO_HEADS,
    ),
    "openai-gpt": "post-norm",
    "gemma4-text": NOT_A_SUM,
    "deepseek-v4": NOT_A_SUM,
    "hrm-text": "applied repeatedly in one forward pass",
    "nanochat": "is read twice per forward pass",
    "codegen": "embed_positions",
    "falcon-new": "new decoder architecture",
}
# Mixture-of-experts: transformers' grouped expert matmul has no float64 kernel (float32 is exact to its rounding).
FLOAT32_ONLY = {
    "mixtral",
    "olmoe",
    "flex-olmo",
    "granite-moe",
    "qwen2-moe",
    "qwen3-moe",
    "phimoe",
    "minimax-m2",
    "gpt-oss",
    "ernie4_5-moe",
    "afmoe",
    "laguna",
    "glm4-moe",
    "deepseek-v2",
    "deepseek-v3",
    "glm4-moe-lite",
    "glm-moe-dsa",
    "deepseek-v4",
    "jamba",
    "lfm2-moe",
    "qwen3-next",
    "qwen3.5-moe",
    "granite-moe-hybrid",
    "xglm",
}  # XGLM's own attention clamps with a float32 constant that overflows in float64


def load_dtype(name: str) -> torch.dtype:
    """The dtype an architecture is tested in: float64, or float32 where it cannot run in float64."""
    return torch.float32 if name in FLOAT32_ONLY else torch.float64


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64, vocab: int = VOCAB):
    """The tiny Hugging Face model of one architecture, randomised, in ``dtype``, eval mode."""
    config_class, kwargs = ARCHITECTURES[name]
    # a copy: some configs edit their lists in place (Gemma-4 makes the last of layer_types full attention)
    config = getattr(tf, config_class)(**copy.deepcopy(kwargs | {"vocab_size": vocab}))
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomise(model, seed)
    model.config.architectures = [
        type(model).__name__
    ]  # as save_pretrained writes it (PhiMoE's bridge name: the adapter's)
    return model.to(dtype).eval()
