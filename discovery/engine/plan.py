"""The memory plan: the bytes a run will hold, from the model's shape, the prompts and the batch.

Computed before any heavy work (no weights loaded), so that a run that cannot fit says so first
and a batch size can be chosen to fit. The terms, for ``b`` prompts of ``p`` positions in a batch,
``S`` senders and ``R`` receivers of the edge graph (DESIGN.md), ``e`` bytes per value of the dtype:

* **weights**: the parameter count (a model built from the config on PyTorch's ``meta`` device,
  which allocates nothing) times ``e``; a tied unembedding is the embedding's own tensor.
* **tokenizer** (host memory): a fast tokenizer holds about :data:`TOKENIZER_BYTES` per vocabulary
  entry (measured 2.13 kB on SmolLM2's 49,152, 2.24 kB on Gemma-3's 262,144: 0.56 GB there, more
  than Gemma-3-270M's bfloat16 weights).
* **sender buffers**: attribution keeps the ablated run's senders and their difference from the
  clean run, ``2 · S · b · p · d_model · e`` (``circuitfinder.methods.attribution``).
* **backward activations**: what autograd keeps for the backward pass, per layer and token:
  the per-head q/k/v receiver inputs ``(H + 2G) · d_model`` and the heads' outputs
  ``H · d_model`` (the edge graph's hook points); inside attention the projections
  ``(H + 2G) · d_head``, four rotary copies of q and k ``4 (H + G) · d_head`` and the heads'
  mixed values ``H · d_head``; the probabilities ``H · p`` twice (scores and softmax); the
  MLP's hidden ``3 · d_mlp``; ``8 · d_model`` of residual stream and norms. The norms, the
  rotary copies and the probabilities are float32 islands (Hugging Face's RMSNorm and the
  bridge's rotary attention and softmax compute in float32 and cast back), so in half precision
  they take 4 bytes a value, not ``e``: without this the plan of a bfloat16 run fell 20–32 %
  short on the bundled models (docs/measurements/memory.md). Their sum is multiplied by
  :data:`ACTIVATION_MARGIN`, the one fitted number (what the count leaves out: allocator slack,
  temporaries), fitted on both bundled models by ``scripts/measure_memory.py``.
* **scores**: the ``[S, R]`` score matrix and its gradient staging, in float32, twice.
* **logits**: one row of ``d_vocab`` per prompt (only the read position is unembedded) and its
  gradient, in float32.
* **libraries** (host memory): the code itself, :data:`LIBRARIES`, resident once torch,
  transformers, TransformerLens's bridge and this package are imported.

Memory a load frees (a half-precision load casting a float32 file, the bridge's boot) stays in
the allocator's heap (``circuitfinder.engine.models.keep_freed_memory``; the CUDA caching allocator
does the same) and attribution reuses it, so it is not a term; the float32 file a cast load maps
is file-backed and released as the load ends. On a GPU (``device`` not the CPU) the tokenizer and
the libraries live in host memory and leave the plan; the CUDA context (about half a gigabyte) is
not counted. ``scripts/measure_memory.py`` compares the total with the process's real peak on both
bundled models (``outputs/benchmarks/memory-*.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from circuitfinder.engine.graph import expected_edge_count
from circuitfinder.errors import UserError

# config.json values of models a researcher plans for without the hub (published configurations).
KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
    "google/gemma-2-2b": dict(
        model_type="gemma2",
        architectures=["Gemma2ForCausalLM"],
        hidden_size=2304,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        intermediate_size=9216,
        vocab_size=256000,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        query_pre_attn_scalar=256,
        sliding_window=4096,
    ),
    "gpt2": dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_positions=1024,
        vocab_size=50257,
    ),
}
# The bundled models' own configs, for planning before their first conversion.
KNOWN_CONFIGS["smollm2-135m"] = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
)
KNOWN_CONFIGS["gemma3-270m"] = dict(
    model_type="gemma3_text",
    architectures=["Gemma3ForCausalLM"],
    hidden_size=640,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    intermediate_size=2048,
    vocab_size=262144,
    tie_word_embeddings=True,
    query_pre_attn_scalar=256,
    sliding_window=512,
)
ALIASES = {"llama-3-8b": "meta-llama/Meta-Llama-3-8B", "gemma-2-2b": "google/gemma-2-2b", "gpt2-small": "gpt2"}
# Families whose attention and MLP read the same residual stream (no head -> same-layer MLP edge).
PARALLEL_TYPES = {"gptj", "phi", "cohere", "cohere2", "gpt_neox", "falcon"}
BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}
ACTIVATION_MARGIN = (
    1.2  # planned/measured working memory 0.99-1.14, both bundled models, batches 8-32 (docs/measurements/memory.md)
)
# resident after importing torch, transformers, TransformerLens's bridge, circuitfinder (0.458 GB measured)
LIBRARIES = 460_000_000
TOKENIZER_BYTES = 2_250  # a fast tokenizer's resident bytes per vocabulary entry (2,133 and 2,244 measured)


@dataclass(frozen=True)
class PlanShape:
    """What the plan needs of a model: its sizes and parameter count."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_groups: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_params: int
    parallel: bool = False
    d_head: int = 0  # 0: d_model / n_heads

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (self.n_heads + 2 * self.n_kv_groups + 1) + 1

    @property
    def n_edges(self) -> int:
        return expected_edge_count(self.n_layers, self.n_heads, self.n_kv_groups, self.parallel)


def shape_from_config(name: str, config: dict) -> PlanShape:
    """The plan's shape from a Hugging Face ``config.json`` (as a dict); the parameters are counted
    on a model built on the ``meta`` device, so nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in config.items() if not k.startswith("_")}
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise UserError(f"{name}: its config has no model_type; give the shape by hand (`circuits plan --help`)")
    try:
        cfg = AutoConfig.for_model(model_type, **values)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{name}: transformers cannot build a {model_type} model from its config ({exc})") from None
    from circuitfinder.engine.families import refusal

    if (why := refusal(model)) is not None:  # no edge graph to plan for
        raise UserError(f"{name}: {why}")
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(text.num_attention_heads)
    groups = int(getattr(text, "num_key_value_heads", None) or heads)
    if model_type == "falcon":  # its own rule (FalconAttention): kv heads only in the new architecture
        groups = int(text.num_kv_heads) if text.new_decoder_architecture else 1 if text.multi_query else heads
    d_mlp = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * int(text.hidden_size)
    d_head = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    parallel = model_type in PARALLEL_TYPES and getattr(text, "use_parallel_residual", True) is not False
    if model_type == "falcon":
        parallel = bool(getattr(text, "parallel_attn", False) or getattr(text, "new_decoder_architecture", False))
    return PlanShape(
        name,
        int(text.num_hidden_layers),
        heads,
        groups,
        int(text.hidden_size),
        int(d_mlp),
        int(text.vocab_size),
        n_params,
        parallel,
        int(d_head),
    )


def plan_shape(model: str) -> PlanShape:
    """The shape of ``model`` without its weights: a shape by hand (``layers=…,heads=…``), a
    bundled name, a local folder's ``config.json``, a known configuration (:data:`KNOWN_CONFIGS`,
    :data:`ALIASES`), or a Hugging Face id's config from the hub (or its local cache)."""
    import json
    from pathlib import Path

    from circuitfinder.engine.models import BUNDLED, cache_root

    if "=" in model:
        return parse_shape(model)
    name = ALIASES.get(model.lower(), model)
    cached = cache_root() / name / "config.json"
    folder = Path(name).expanduser() / "config.json"
    for path in ((cached,) if name in BUNDLED else ()) + ((folder,) if Path(name).expanduser().is_dir() else ()):
        if path.is_file():
            return shape_from_config(name, json.loads(path.read_text()))
    if name in KNOWN_CONFIGS:
        return shape_from_config(name, KNOWN_CONFIGS[name])
    choices = (
        f"use a local folder with a config.json, one of {', '.join([*ALIASES, *KNOWN_CONFIGS])}, or a shape by "
        f"hand (layers=32,heads=32,groups=8,d_model=4096,d_mlp=14336,vocab=128256)"
    )
    if "/" not in name:
        raise UserError(f"unknown model {model!r}: {choices}")
    try:
        from huggingface_hub.utils import logging as hub_logging
        from transformers import AutoConfig

        hub_logging.set_verbosity_error()  # no retry lines: the one error line below says what happened
        config = AutoConfig.from_pretrained(name).to_dict()
    except (OSError, ValueError) as exc:
        raise UserError(
            f"no config for {model!r} (the hub is unreachable or has no such model: {type(exc).__name__}): {choices}"
        ) from None
    return shape_from_config(name, config)


def parse_shape(text: str) -> PlanShape:
    """A shape given by hand: ``layers=32,heads=32,groups=8,d_model=4096,d_mlp=14336,vocab=128256``
    (``params=`` optional: otherwise counted for a Llama-style block with untied embeddings)."""
    keys = {"layers", "heads", "groups", "d_model", "d_mlp", "vocab", "params", "parallel"}
    try:
        values = {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        values = None
    if not values or not {"layers", "heads", "d_model"} <= set(values) or set(values) - keys:
        raise UserError(
            f"{text!r} is not a shape: give layers=,heads=,d_model= (and groups=, d_mlp=, vocab=, params=, "
            f"parallel=0|1) separated by commas"
        )
    L, H, d = values["layers"], values["heads"], values["d_model"]
    G, d_mlp, vocab = values.get("groups", H), values.get("d_mlp", 4 * d), values.get("vocab", 50257)
    d_head = d // H
    llama_params = 2 * vocab * d + L * (2 * d * H * d_head + 2 * d * G * d_head + 3 * d * d_mlp + 2 * d) + d
    return PlanShape(
        text, L, H, G, d, d_mlp, vocab, values.get("params", llama_params), bool(values.get("parallel", 0)), d_head
    )


@dataclass(frozen=True)
class MemoryPlan:
    """The bytes of one run, term by term (see the module docstring)."""

    shape: PlanShape
    dtype: torch.dtype
    batch: int
    positions: int
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def loaded(self) -> int:
        """The model as loaded: its weights and its tokenizer."""
        return self.terms["weights"] + self.terms["tokenizer"]

    @property
    def working(self) -> int:
        """Everything but the loaded model and the libraries: what grows with the batch."""
        return self.total - self.loaded - self.terms["libraries"]

    def rows(self) -> list[tuple[str, int]]:
        return [*self.terms.items(), ("total", self.total)]


def memory_plan(
    shape: PlanShape,
    dtype: torch.dtype = torch.float32,
    batch: int = 16,
    positions: int = 24,
    device: torch.device | str = "cpu",
) -> MemoryPlan:
    """The memory plan of attribution (the heaviest stage: a forward and a backward with every
    sender kept) on batches of ``batch`` prompts of ``positions`` tokens, on ``device``."""
    e = BYTES[dtype]
    host = torch.device(device).type == "cpu"  # the tokenizer and the libraries share the device's memory
    L, H, G, d = shape.n_layers, shape.n_heads, shape.n_kv_groups, shape.d_model
    dh = shape.d_head or d // H
    tokens = batch * positions
    island = max(e, 4)  # float32 islands: norms, rotary and softmax compute in float32 in any dtype
    per_layer_token = ((H + 2 * G) * d + H * d + (H + 2 * G) * dh + H * dh + 3 * shape.d_mlp) * e + (
        4 * (H + G) * dh + 2 * H * positions + 8 * d
    ) * island
    terms = {
        "weights": shape.n_params * e,
        "tokenizer": TOKENIZER_BYTES * shape.d_vocab if host else 0,
        "sender buffers": 2 * shape.n_senders * tokens * d * e,
        "backward activations": math.ceil(ACTIVATION_MARGIN * L * tokens * per_layer_token),
        "scores": 2 * shape.n_senders * shape.n_receivers * 4,
        "logits": 2 * batch * shape.d_vocab * 4,
        "libraries": LIBRARIES if host else 0,
    }
    return MemoryPlan(shape, dtype, batch, positions, terms)


def refereed_total(
    shape: PlanShape, half: torch.dtype, batch: int = 16, positions: int = 24, device: torch.device | str = "cpu"
) -> int:
    """The bytes of a half-precision search refereed in float32 (``circuitfinder.methods.search``):
    the float32 run's plan, and the half-precision copy of the weights its passes run on."""
    return memory_plan(shape, torch.float32, batch, positions, device).total + shape.n_params * BYTES[half]


def largest_batch(
    shape: PlanShape,
    free_bytes: int,
    dtype: torch.dtype = torch.float32,
    positions: int = 24,
    most: int = 1024,
    device: torch.device | str = "cpu",
) -> int:
    """The largest batch whose plan on ``device`` fits in ``free_bytes`` (0 if not even one prompt does)."""

    def fits_in(b: int) -> bool:
        return memory_plan(shape, dtype, b, positions, device).total <= free_bytes

    fits = [b for b in (2**k for k in range(int(math.log2(most)) + 1)) if fits_in(b)]
    if not fits:
        return 0
    low, high = fits[-1], min(2 * fits[-1], most + 1)
    while high - low > 1:  # the largest fitting batch between two powers of two
        mid = (low + high) // 2
        low, high = (mid, high) if fits_in(mid) else (low, mid)
    return low


def free_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free on ``device``: the GPU's free memory, or the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"
