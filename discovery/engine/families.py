"""Architectures refused by name, before TransformerLens's bridge boots: one line with the true cause.

The edge graph (``circuitfinder.engine.graph``) has one node per attention head and per MLP in
each layer, and every receiver reads the plain sum of its senders' outputs on the residual
stream. Some decoder families break that picture whatever the bridge does: their blocks have no
attention heads (state-space, recurrent, convolution or linear-attention layers, alone or in a
hybrid stack), their residual stream is not a plain sum (post-norm blocks, streams rescaled or
mixed by learned weights), or their layers run more than once per forward pass. The bridge boots
on most of them and fails later with an error that names a symptom (a missing ``attn``, a hook
that does not exist), so :func:`refusal` names the cause first, from the Hugging Face model alone.

No TransformerLens import here: only the model's class name and its config.
"""

from __future__ import annotations

# Every layer a state-space or recurrent mixer: no attention heads at all.
NO_ATTENTION = {
    "MambaForCausalLM": "state-space (Mamba)",
    "Mamba2ForCausalLM": "state-space (Mamba-2)",
    "FalconMambaForCausalLM": "state-space (Mamba)",
    "RwkvForCausalLM": "recurrent (RWKV time-mixing)",
    "RWKV7ForCausalLM": "recurrent (RWKV-7 time-mixing)",
    "xLSTMForCausalLM": "recurrent (xLSTM)",
}

# Hybrid stacks: attention in some layers, a mixer without heads in the others.
HYBRID = {
    "RecurrentGemmaForCausalLM": "recurrent (RG-LRU)",
    "JambaForCausalLM": "state-space (Mamba)",
    "BambaForCausalLM": "state-space (Mamba-2)",
    "NemotronHForCausalLM": "state-space (Mamba-2)",
    "GraniteMoeHybridForCausalLM": "state-space (Mamba-2)",
    "Lfm2ForCausalLM": "short-convolution",
    "Lfm2MoeForCausalLM": "short-convolution",
    "OlmoHybridForCausalLM": "linear-attention (gated DeltaNet)",
    "Qwen3NextForCausalLM": "linear-attention (gated DeltaNet)",
    "Qwen3_5ForCausalLM": "linear-attention (gated DeltaNet)",
    "Qwen3_5MoeForCausalLM": "linear-attention (gated DeltaNet)",
    "Qwen3_5ForConditionalGeneration": "linear-attention (gated DeltaNet)",
    "Qwen3_5MoeForConditionalGeneration": "linear-attention (gated DeltaNet)",
    "MiniMaxForCausalLM": "linear-attention (lightning)",
}

# A mixer without heads in every layer, attention beside it in some or all of them.
MIXED = {
    "FalconH1ForCausalLM": "every layer runs a state-space (Mamba-2) mixer with no attention heads beside its "
    "attention",
    "ZambaForCausalLM": "every layer is a state-space (Mamba) layer with no attention heads, some with a shared "
    "attention block added",
    "Zamba2ForCausalLM": "every layer is a state-space (Mamba-2) layer with no attention heads, some with a shared "
    "attention block added",
}

NOT_A_SUM = "so the residual stream is not the sum of the heads' and MLPs' outputs that the edge graph patches"
POST_NORM = (
    "its blocks are post-norm (a LayerNorm after each residual addition) and it has no final norm, so the "
    "residual stream is renormalised inside every block and is not the sum of the heads' and MLPs' outputs "
    "that the edge graph patches"
)

# Other causes, by class.
OTHER = {
    "OpenAIGPTLMHeadModel": POST_NORM,
    "Gemma4ForCausalLM": "each decoder layer multiplies the whole residual stream by a learned layer_scalar (and on "
    "E2B/E4B mixes in per-layer input embeddings), " + NOT_A_SUM,
    "Gemma4ForConditionalGeneration": "each decoder layer multiplies the whole residual stream by a learned "
    "layer_scalar (and on E2B/E4B mixes in per-layer input embeddings), " + NOT_A_SUM,
    "Gemma4UnifiedForConditionalGeneration": "each decoder layer multiplies the whole residual stream by a learned "
    "layer_scalar, " + NOT_A_SUM,
    "Gemma3nForCausalLM": "its residual stream is several AltUp streams combined by learned, input-dependent "
    "predictions (and per-layer input embeddings), " + NOT_A_SUM,
    "Gemma3nForConditionalGeneration": "its residual stream is several AltUp streams combined by learned, "
    "input-dependent predictions (and per-layer input embeddings), " + NOT_A_SUM,
    "DeepseekV4ForCausalLM": "its residual stream is hc_mult streams that hyper-connections (mHC) collapse, expand and "
    "mix with weights computed from the stream itself, " + NOT_A_SUM,
    "NanoChatForCausalLM": "one norm module (model.norm) normalises both the embeddings before the first layer and "
    "the residual stream before the unembedding, so the final norm's input, the logits' "
    "receiver, is read twice per forward pass",
    "HrmTextForCausalLM": "its two layer stacks are applied repeatedly in one forward pass (H_cycles x (L_cycles + 1) "
    "passes of the same layers), so a head is not one node of a feed-forward edge graph",
}

# Words that mark a layer kind (in ``layer_types``, ``layers_block_type`` or ``block_types``) whose
# mixer has no attention heads. transformers 5 writes "linear_attention" for Mamba, recurrent and
# linear-attention layers alike, and "hybrid" for layers that run one beside attention.
NON_ATTENTION_WORDS = ("linear", "mamba", "conv", "recurrent", "rwkv", "ssm", "delta", "hybrid")


def _mixers_without_heads(config) -> tuple[int, int] | None:
    """(layers whose mixer has no attention heads, all layers), from the config's list of layer kinds."""
    for key in ("layer_types", "layers_block_type", "block_types"):
        kinds = getattr(config, key, None)
        if isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, str) for k in kinds):
            without = [k for k in kinds if any(word in k.lower() for word in NON_ATTENTION_WORDS)]
            return (len(without), len(kinds)) if without else None
    return None


def refusal(hf_model) -> str | None:
    """One line naming the architecture and why the edge graph of heads and MLPs cannot be built
    on it, or None where nothing is known against it (the check at load still runs)."""
    cls = type(hf_model).__name__
    config = getattr(hf_model, "config", None)
    if cls in NO_ATTENTION:
        return (
            f"{cls}: its blocks are {NO_ATTENTION[cls]} layers with no attention heads, so the edge graph of "
            "heads and MLPs does not exist"
        )
    if cls in MIXED:
        return f"{cls}: {MIXED[cls]}, so the edge graph of heads and MLPs does not cover the model"
    counted = _mixers_without_heads(config) if config is not None else None
    if cls in HYBRID or counted:
        kind = HYBRID.get(cls, "non-attention")
        if not counted:
            which = f"its layers include {kind} layers"
        elif counted[0] == 1:
            which = f"1 of its {counted[1]} layers is a {kind} layer"
        else:
            which = f"{counted[0]} of its {counted[1]} layers are {kind} layers"
        return (
            f"{cls}: {which} with no attention heads (a hybrid stack), so the edge graph of heads and MLPs does not "
            "cover the model"
        )
    if cls in OTHER:
        return f"{cls}: {OTHER[cls]}"
    if config is not None and getattr(config, "do_layer_norm_before", True) is False:  # OPT-350m
        return f"{cls}: {POST_NORM}"
    if cls == "FalconForCausalLM" and getattr(config, "new_decoder_architecture", False):  # Falcon-40B/180B
        return (
            f"{cls}: its new decoder architecture interleaves each key/value group's queries, key and value in "
            "one fused projection, which TransformerLens 4.3's Falcon adapter splits as if there were one "
            "key/value head, so the bridge cannot run it"
        )
    if cls == "CodeGenForCausalLM" and _codegen_attention_lacks_rotary_table(hf_model):
        return (
            f"{cls}: TransformerLens 4.3's CodeGen attention reads the rotary table embed_positions from each "
            "attention module, which this transformers version no longer keeps there (it moved to the model's "
            "rotary embedding), so the bridge cannot run the model"
        )
    return None


def _codegen_attention_lacks_rotary_table(hf_model) -> bool:
    try:
        attention = hf_model.transformer.h[0].attn
    except (AttributeError, IndexError, TypeError):
        return False
    return not hasattr(attention, "embed_positions")
