"""The one module that talks to TransformerLens: a model wrapped in a TransformerBridge.

TransformerLens 4's ``TransformerBridge`` wraps the raw Hugging Face weights (its logits equal the
Hugging Face model's exactly) and exposes the hook points that edge patching needs once three
flags are on:

* ``use_split_qkv_input``: every head's query input, and every key/value group's key and value
  input, is its own copy of the residual stream (``hook_q_input`` ``[batch, pos, heads, d_model]``,
  ``hook_k_input``/``hook_v_input`` ``[batch, pos, groups, d_model]``), normalised per copy;
* ``use_attn_result``: each head's output written to the residual stream
  (``attn.hook_result`` ``[batch, pos, heads, d_model]``, summing to the attention output);
* ``use_hook_mlp_in``: the MLP's input as its own copy (``hook_mlp_in``).

Senders read: ``blocks.0.hook_resid_pre`` (the embedding, plus positions where learned; Gemma's
``sqrt(d_model)`` scale included), ``blocks.{l}.attn.hook_result`` and ``blocks.{l}.hook_mlp_out``.
Receivers written: the q/k/v inputs, ``blocks.{l}.hook_mlp_in`` and ``ln_final.hook_in`` (the
logits' input). Hooks are attached only inside :meth:`ModelAdapter.hooks`, which removes them on
exit, error or not.

Attention the bridge cannot split (GPT-J, GPT-Neo, OPT, XGLM, Llama-4, PhiMoE, the ModernBERT decoder: a plain
``AttentionBridge``, on which ``use_split_qkv_input`` and ``use_attn_result`` are not implemented)
is split by the adapter at the Hugging Face projections (``ModelAdapter.own_attention``), under
the same hook names. Receivers: ``hook_q_input`` (``hook_k_input``, ``hook_v_input``) is a copy per
head (group) of the residual stream entering the block, captured at ``blocks.{l}.hook_resid_pre``;
each copy, after the hooks, is normalised by the block's own pre-attention norm module and
projected by its head's (group's) rows of ``q_proj`` (``k_proj``, ``v_proj``), weight and bias,
and the concatenation replaces the projection's output. Senders: ``attn.hook_result`` is
``z_h W_O,hᵀ`` per head, from the output projection's input ``z`` (its bias belongs to no head;
the engine uses only differences between runs, in which a constant cancels); a hook that returns
a different tensor sets the projection's output to ``Σ_h result_h + bias``. Unchanged copies give
the model's own values up to the order of the float sums; layers without such hooks are left
alone. Needed, and checked at load on a probe prompt: separate ``nn.Linear`` projections whose
inputs are the block's pre-attention norm of ``resid_pre``, and no other path from the block's
input into the heads' outputs (with the q/k/v outputs held fixed and the input moved, the output
projection's input must not move). Otherwise the model is refused with one line: JetMoE (a
mixture of attention heads), AFMoE and Laguna (an output gate computed from the layer's input),
multi-head latent attention (no separate q/k/v projections).

Post-norm blocks (Gemma 2/3: ``ln1_post``, ``ln2_post``). The attention block adds
``ln1_post(Σ_h result_h) = g ⊙ Σ_h result_h / rms(Σ_h result_h)`` to the residual stream, with
``g = 1 + w`` (Gemma's RMSNorm) and ``rms(x) = sqrt(mean(x²) + eps)``. The heads' results sum to
the norm's *input*, not to the residual term, so we state a rule for a head's share:

    sender value of head h = g ⊙ result_h / rms(Σ_h' result_h')

with the RMS of the same run (the clean, corrupted or patched run being recorded). The shares sum
to ``hook_attn_out``, the block's residual term, in every run; the norm's own float rounding
(Hugging Face computes it in float32) is spread equally over the heads so that the sum is exact.
So a receiver's input is still exactly the sum of its senders' values, and full circuit = clean
run, empty circuit = corrupted run hold. Patching an edge swaps that head's share for its
corrupted-run share (its result over its own run's RMS). A change to one head moves the common
RMS and so every share of that layer in the patched run; those moves travel along the kept edges,
as the norm makes them. So each head's value depends on the inputs of every head of its layer
(``ModelShape.post_norm``; pruning treats the layer's q/k/v inputs as feeding all its heads).
The MLP's sender is its post-normed output (``hook_mlp_out`` is ``ln2_post.hook_out`` on these
blocks): one sender, no rule needed.

Query/key norms over all heads together (OLMo-2, OLMoE: ``q_norm`` on the whole ``[H · d_head]``
projection, ``ModelShape.shared_qk_norm``). With split inputs, head h's query is the h-th slice of
``q_norm(concat_j W_Q,j · x_j)``, each head's projection taken from its own input copy ``x_j``: the
norm's RMS is shared by the layer's heads, as the unsplit model's is. So a change at one head's
query (key) input moves every query (key) of its layer through that RMS, and pruning treats each
q and k input as feeding all the layer's heads; the value inputs stay per group.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Callable, Iterator

import torch
from jaxtyping import Float, Int

from circuitfinder.engine.models import keep_freed_memory, load_pretrained
from circuitfinder.errors import UserError

Hook = tuple[str, Callable]
# Hugging Face class names that TransformerLens's bridge registers under another spelling.
BRIDGE_NAMES = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}
PROBE_POSITIONS = 8  # tokens of the probe prompts the load checks run (fewer where the context is shorter)


def probe_tokens(vocab: int, positions: int, seed: int = 0) -> torch.Tensor:
    """One random prompt ``[1, positions]`` of ordinary token ids (special ones can be unstable)."""
    return torch.randint(0, max(vocab, 1), (1, positions), generator=torch.Generator().manual_seed(seed), device="cpu")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that fix a model's edge graph."""

    n_layers: int
    n_heads: int
    n_kv_groups: int
    d_model: int
    post_norm: bool = False  # heads share a post-attention norm: each head's value depends on its whole layer
    parallel: bool = (
        False  # attention and MLP of a layer read the same residual stream (no head -> same-layer MLP edge)
    )
    shared_qk_norm: bool = False  # queries (keys) normalised over all heads together: each q/k input reaches every head


@dataclass(frozen=True)
class OwnAttention:
    """One layer's Hugging Face modules from which the adapter splits its attention (``ModelAdapter.own_attention``)."""

    norm: torch.nn.Module | None  # the pre-attention norm (None: the projections read the residual stream itself)
    q: torch.nn.Linear  # [heads · d_head, d_model], head-major columns
    k: torch.nn.Linear  # [groups · d_head, d_model]
    v: torch.nn.Linear
    o: torch.nn.Linear  # [d_model, heads · d_head]
    d_head: int


def _far(got: torch.Tensor | None, want: torch.Tensor | None) -> bool:
    """Whether a probed value is missing or differs from ``want`` by more than rounding."""
    return (
        got is None
        or want is None
        or got.shape != want.shape
        or (got - want).abs().max().item() > 1e3 * torch.finfo(want.dtype).eps * max(want.abs().max().item(), 1.0)
    )


class ModelAdapter:
    """A pretrained causal LM behind a TransformerBridge, with the hook names of its edge graph.

    Args:
        bridge: a booted ``TransformerBridge``.
        tokenizer: its Hugging Face tokenizer.
        name: how the model is named in outputs.
    """

    SENDER_INPUT = "blocks.0.hook_resid_pre"
    RECEIVER_LOGITS = "ln_final.hook_in"

    def __init__(self, bridge, tokenizer, name: str, hf_reference: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.hf_reference = hf_reference  # (tokens, logits) of the Hugging Face model's own forward, before booting
        cfg = bridge.cfg
        blocks = list(bridge.blocks)
        self.post_norm = hasattr(blocks[0], "ln1_post")  # Gemma 2/3: head shares, see the module docstring
        if self.post_norm and not all(
            b.ln1_post.uses_rms_norm and getattr(b.attn.o.original_component, "bias", None) is None for b in blocks
        ):
            raise UserError(
                f"{name}: a post-attention norm is supported only as RMSNorm without an output bias (Gemma 2/3)"
            )
        self.architecture = type(getattr(bridge, "original_model", None)).__name__
        self.shape = ModelShape(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_groups=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
            d_model=cfg.d_model,
            # heads normalised together: after the attention (Gemma 2/3) or before its output projection (BitNet)
            post_norm=self.post_norm or hasattr(blocks[0].attn.original_component, "attn_sub_norm"),
            parallel=type(blocks[0]).__name__ == "ParallelBlockBridge",  # checked by circuitfinder.engine.checks
            shared_qk_norm=getattr(blocks[0].attn, "_qk_norm_phase", None)
            == "pre_reshape",  # OLMo-2: see the module docstring
        )
        # Where the bridge cannot split the attention's inputs and outputs itself, the adapter does,
        # at the Hugging Face projections (``own_attention``; module docstring).
        self.own_attention: list[OwnAttention] | None = None
        try:
            bridge.set_use_split_qkv_input(True)
        except NotImplementedError:
            self.own_attention = []  # filled below, once a forward pass is known to run
        if self.own_attention is None:
            bridge.set_use_attn_result(True)
        bridge.set_use_hook_mlp_in(True)
        # Where the bridge's hook_mlp_in never fires, the adapter supplies the MLP's receiver itself
        # (``_own_mlp_input_hooks``): on parallel blocks with one shared norm (Phi-1/2, Falcon,
        # Cohere) as a copy of the block's input, elsewhere (BLOOM) at the pre-MLP norm's input.
        self.own_mlp_input = None
        try:
            mlp_in_fires = self._fires("blocks.0.hook_mlp_in")
        except RuntimeError as e:  # e.g. a mixture-of-experts matmul with no float64 kernel
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"{name} ({self.architecture}): a forward pass fails in {self.dtype} ({reason}); load it in float32"
            ) from None
        if not mlp_in_fires:
            subs = blocks[0].submodules or {}
            self.own_mlp_input = (
                "ln2" if "ln2" in subs else "shared-norm" if self.shape.parallel and "ln1" in subs else None
            )
        if self.own_attention is not None:
            self.own_attention = self._own_attention_plan()
        for p in bridge.parameters():
            p.requires_grad_(False)
        bridge.eval()

    @classmethod
    def from_hf(
        cls, hf_model, tokenizer, name: str, hf_id: str | None = None, dtype: torch.dtype = torch.float32
    ) -> "ModelAdapter":
        """Wrap an in-memory Hugging Face causal LM (no download).

        The model's own logits on one short probe prompt are taken first, before the bridge wraps
        its modules, so that the check at load can compare the bridge with the model it wraps.
        """
        from transformer_lens.model_bridge import TransformerBridge

        from circuitfinder.engine.families import refusal

        if (why := refusal(hf_model)) is not None:
            raise UserError(f"{name}: {why}")
        config = hf_model.config
        architecture = (getattr(config, "architectures", None) or [type(hf_model).__name__])[0]
        config.architectures = [BRIDGE_NAMES.get(architecture, architecture)]  # the name the bridge boots from
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        context = next(
            (int(v) for k in ("n_positions", "max_position_embeddings", "n_ctx") if (v := getattr(config, k, None))),
            PROBE_POSITIONS,
        )
        reference = None
        if vocab > 0:
            tokens = probe_tokens(vocab, min(PROBE_POSITIONS, context)).to(next(hf_model.parameters()).device)
            try:
                with torch.no_grad():
                    reference = (tokens, hf_model(tokens).logits.detach().clone())
            except RuntimeError:  # e.g. no float64 kernel: the adapter reports it below
                reference = None
        try:
            bridge = TransformerBridge.boot_transformers(
                hf_id or name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype
            )
            return cls(bridge, tokenizer, name, reference)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - an architecture the bridge or the adapter cannot wrap: one line, not a traceback
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            raise UserError(
                f"{name}: {type(hf_model).__name__} is not supported: wrapping it in TransformerLens's bridge "
                f"failed ({type(e).__name__}: {reason})"
            ) from None

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    @property
    def hf_config(self) -> dict:
        """The wrapped Hugging Face model's configuration, as a dict (what ``config.json`` holds)."""
        return self.bridge.original_model.config.to_dict()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    def __repr__(self) -> str:
        s = self.shape
        return (
            f"ModelAdapter({self.name}: {self.architecture}, {s.n_layers} layers, {s.n_heads} heads, "
            f"{s.n_kv_groups} key/value groups, d_model {s.d_model}"
            + (", parallel blocks" if s.parallel else "")
            + (", post-attention norm" if s.post_norm else "")
            + ")"
        )

    @property
    def probe_positions(self) -> int:
        """The length of the probe prompts of the load checks: 8 tokens, or the model's context if shorter."""
        return min(PROBE_POSITIONS, int(getattr(self.bridge.cfg, "n_ctx", PROBE_POSITIONS) or PROBE_POSITIONS))

    @cached_property
    def working_dtype(self) -> torch.dtype:
        """The lowest precision the forward pass rounds to (``circuitfinder.engine.precision`` says why it matters).

        The model's dtype, or float32 for a float64 model with a float32 island somewhere. Probed on
        one short prompt whose residual stream entering the first block is nudged by a relative 1e-9
        (far below float32's resolution, far above float64's), then by twice that. Two signs of an
        island, either enough: the logits do not respond linearly (a float32 cast absorbs the nudge
        or jumps by an ulp; Llama-style norms, which cast and then scale by a float64 weight), or
        some hook point's non-integer values all lie on the float32 grid and move with the nudge
        (a softmax taken in float32 on a path the linear test cannot see past a float64 LayerNorm).
        """
        if self.dtype != torch.float64:
            return self.dtype
        n = self.probe_positions
        tokens = torch.arange(n, device=self.device).unsqueeze(0) % max(int(self.bridge.cfg.d_vocab), 1)
        noise = torch.randn(
            (1, n, self.shape.d_model), generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu"
        )

        on_grid: list[dict[str, torch.Tensor]] = []

        def logits_nudged(size: float) -> torch.Tensor:
            grid: dict[str, torch.Tensor] = {}

            def nudge(x, hook=None):
                return x * (1 + size * noise.to(x.device))

            def look(name):
                def observe(module, args, x):
                    if torch.is_tensor(x) and x.dtype == torch.float64:
                        values = x[torch.isfinite(x)]
                        values = values[values != values.round()]
                        if values.numel() >= 4 and torch.equal(values, values.float().double()):
                            grid[name] = x.detach().clone()

                return observe

            handles = [point.register_forward_hook(look(n)) for n, point in self.bridge.hook_dict.items()]
            try:
                with torch.no_grad(), self.hooks([(self.SENDER_INPUT, nudge)]):
                    logits = self.bridge(tokens, return_type="logits")
            finally:
                for handle in handles:
                    handle.remove()
            on_grid.append(grid)
            return logits

        base, once, twice = logits_nudged(0.0), logits_nudged(1e-9), logits_nudged(2e-9)
        first, second = once - base, twice - base
        linear = first.abs().max() > 0 and (second - 2 * first).abs().max() <= 1e-3 * first.abs().max()
        nudged_once, nudged_twice = on_grid[1], on_grid[2]  # the un-nudged run reads float32-exact weights
        moving_grid = any(
            name in nudged_twice
            and values.shape == nudged_twice[name].shape
            and not torch.equal(values, nudged_twice[name])
            for name, values in nudged_once.items()
        )
        return torch.float64 if linear and not moving_grid else torch.float32

    @cached_property
    def rounding_noise(self) -> float:
        """How far the logits move, relative to their size, when the residual stream entering every
        block is rounded off once more: each value times ``1 + ½ eps · n`` (``n`` standard normal,
        ``eps`` the working dtype's) on the probe prompt (:func:`probe_tokens`), three draws, the largest change
        over the largest logit. Two
        exact computations of the same pass differ by roundings like these, so half precision's
        tolerance is a multiple of it (``circuitfinder.engine.precision``)."""
        eps = torch.finfo(self.working_dtype).eps
        tokens = probe_tokens(int(self.bridge.cfg.d_vocab), self.probe_positions).to(self.device)
        with torch.no_grad():
            base = self.bridge(tokens, return_type="logits").float()
        worst = 0.0
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)

            def round_off(x, hook=None, g=g):
                noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device)
                return (x.float() * (1 + 0.5 * eps * noise)).to(x.dtype)

            hooks = [(f"blocks.{l}.hook_resid_pre", round_off) for l in range(self.shape.n_layers)]
            with torch.no_grad(), self.hooks(hooks):
                worst = max(worst, (self.bridge(tokens, return_type="logits").float() - base).abs().max().item())
        return worst / max(base.abs().max().item(), 1e-30)

    # Hook names of the edge graph's senders and receivers, by kind and layer.
    def sender_hook(self, kind: str, layer: int) -> str:
        """Where a sender point fires (raw head results on post-norm blocks: record values with ``sender_hooks``)."""
        return {
            "input": self.SENDER_INPUT,
            "attn": f"blocks.{layer}.attn.hook_result",
            "mlp": f"blocks.{layer}.hook_mlp_out",
        }[kind]

    def sender_hooks(self, kind: str, layer: int, record: Callable[[torch.Tensor], None]) -> list[Hook]:
        """Hooks that pass a sender point's values to ``record`` once per forward, changing nothing.

        The values are ``[batch, pos, heads, d_model]`` for attention, ``[batch, pos, d_model]``
        otherwise. On post-norm blocks a head's value is its share of the normalised output (module
        docstring): the results are kept at ``attn.hook_result`` and shared out at ``ln1_post.hook_out``.
        """

        def observe(act, hook=None):
            record(act)
            return act

        if kind != "attn" or not self.post_norm:
            return [(self.sender_hook(kind, layer), observe)]
        kept = {}

        def keep(result, hook=None):
            kept["result"] = result
            return result

        def share(out, hook=None):
            record(self.head_shares(layer, kept.pop("result"), out))
            return out

        return [(self.sender_hook(kind, layer), keep), (f"blocks.{layer}.ln1_post.hook_out", share)]

    def head_shares(
        self,
        layer: int,
        result: Float[torch.Tensor, "batch pos heads d_model"],
        out: Float[torch.Tensor, "batch pos d_model"],
    ) -> Float[torch.Tensor, "batch pos heads d_model"]:
        """Each head's share ``g ⊙ result_h / rms(Σ_h result_h)`` of the post-norm output ``out``.

        Computed in at least float32, in the autograd graph (callers that record detach); the difference
        between ``out`` and the shares' sum is the norm's own rounding, added to the heads in equal parts
        so that the shares sum to ``out``.
        """
        norm = self.bridge.blocks[layer].ln1_post
        module = norm.original_component
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
        dtype = torch.promote_types(result.dtype, torch.float32)
        gain = (1.0 + norm.weight if norm.uses_weight_offset else norm.weight).to(dtype)  # [d_model]
        total = result.to(dtype).sum(2)  # [b, p, d]: the norm's input (no output bias)
        scale = gain * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)  # [b, p, d]
        shares = (result.to(dtype) * scale.unsqueeze(2)).to(result.dtype)  # [b, p, heads, d]
        return shares + ((out - shares.sum(2)) / result.shape[2]).unsqueeze(2)

    def receiver_hook(self, kind: str, layer: int) -> str:
        return {
            "q": f"blocks.{layer}.hook_q_input",
            "k": f"blocks.{layer}.hook_k_input",
            "v": f"blocks.{layer}.hook_v_input",
            "mlp": f"blocks.{layer}.hook_mlp_in",
            "logits": self.RECEIVER_LOGITS,
        }[kind]

    def reader_hook(self, kind: str, layer: int) -> str | None:
        """The first value computed linearly from a receiver: attention scores (q, k), ``z`` (v), the MLP's
        pre-activation."""
        return {
            "q": f"blocks.{layer}.attn.hook_attn_scores",
            "k": f"blocks.{layer}.attn.hook_attn_scores",
            "v": f"blocks.{layer}.attn.hook_z",
            "mlp": f"blocks.{layer}.mlp.hook_pre",
        }.get(kind)

    @contextmanager
    def batch_repeated_from(self, layer: int, k: int) -> Iterator[Hook]:
        """A hook that repeats the batch k times as the residual stream enters block ``layer``
        (``n_layers``: the final norm's input), so the layers before it run once for k copies.

        Attach the yielded hook with :meth:`hooks`. Inside the block, an attention mask or
        rotary embedding that still has the original batch is repeated to match the grown batch
        (the model builds them once from the input; every copy's are the same).
        """

        def repeat(x, hook=None):
            return x.repeat(k, *[1] * (x.dim() - 1))

        def grow(value, batch: int):
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == batch // k and value.shape[0] > 1:
                return repeat(value)
            if isinstance(value, tuple):
                return tuple(grow(v, batch) for v in value)
            return value

        def match(module, args, kwargs, block=None):
            hidden = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
            # OPT's block bridge stamps the batch it was called with onto the hooks inside its
            # flattened MLP; the batch grew after that, at the block's first hook point
            for conversion in getattr(block, "_unflatten_conversions", lambda: ())():
                conversion.batch_seq = tuple(hidden.shape[:2])
            names = ("attention_mask", "position_embeddings")
            return args, {n: grow(v, hidden.shape[0]) if n in names else v for n, v in kwargs.items()}

        handles = [
            block.attn.register_forward_pre_hook(partial(match, block=block), with_kwargs=True)
            for block in list(self.bridge.blocks)[layer:]
        ]
        try:
            yield (self.layer_entry(layer), repeat)
        finally:
            for handle in handles:
                handle.remove()

    @cached_property
    def grows_mid_pass(self) -> bool:
        """Whether the batch may grow inside a forward pass (:meth:`batch_repeated_from`): False where
        the model reshapes to the input's batch after the blocks (GPT-BigCode views the final norm's
        output as the input's shape), so stacked circuits run as copies of the prompts instead."""
        tokens = torch.zeros((2, 4), dtype=torch.long, device=self.device)
        try:
            with torch.no_grad(), self.batch_repeated_from(self.shape.n_layers, 2) as hook, self.hooks([hook]):
                return self.bridge(tokens, return_type="logits").shape[0] == 4
        except RuntimeError:
            return False

    def layer_entry(self, layer: int) -> str:
        """The hook point of the residual stream entering block ``layer`` (``n_layers``: the final norm)."""
        return self.RECEIVER_LOGITS if layer == self.shape.n_layers else f"blocks.{layer}.hook_resid_pre"

    @contextmanager
    def blocks_recorded(self, outputs: list) -> Iterator[None]:
        """Store what each block returns in a forward pass in ``outputs[layer]`` (for :meth:`blocks_replayed`)."""
        outputs[:] = [None] * self.shape.n_layers

        def keep(layer):
            return lambda _module, _args, out: outputs.__setitem__(layer, out)

        handles = [block.register_forward_hook(keep(l)) for l, block in enumerate(self.bridge.blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def blocks_replayed(self, outputs: list, below: int) -> Iterator[None]:
        """Blocks before ``below`` compute nothing and return ``outputs[layer]``, what they returned
        in an earlier pass (:meth:`blocks_recorded`); the embedding and later blocks run as usual.

        Exact when the earlier pass's first ``below`` blocks saw the same inputs and hooks: they
        would compute the same values again. Their hook points do not fire.
        """
        blocks = list(self.bridge.blocks)[:below]

        def replay(out, last: bool):
            if not last:  # ignored by the next block, which replays too
                return lambda *_args, **_kwargs: out

            def fresh():  # block L may write into its input
                return (
                    out.clone() if torch.is_tensor(out) else tuple(v.clone() if torch.is_tensor(v) else v for v in out)
                )

            return lambda *_args, **_kwargs: fresh()

        # on the instance itself: a bridge component passes attribute assignments on to the wrapped module
        for l, block in enumerate(blocks):
            object.__setattr__(block, "forward", replay(outputs[l], l == below - 1))
        try:
            yield
        finally:
            for block in blocks:
                object.__delattr__(block, "forward")

    @contextmanager
    def hooks(self, fwd_hooks: list[Hook]) -> Iterator["ModelAdapter"]:
        """Attach forward hooks ``(hook name, fn(tensor, hook))`` for the body of the block only."""
        L = self.shape.n_layers
        own = {}
        if self.own_mlp_input:
            names = {f"blocks.{l}.hook_mlp_in": l for l in range(L)}
            for name, fn in fwd_hooks:
                if name in names:
                    own.setdefault(names[name], []).append(fn)
            fwd_hooks = [(n, fn) for n, fn in fwd_hooks if n not in names]
        inputs: dict[int, dict[str, list[Callable]]] = {}  # layer -> q/k/v -> hooks
        results: dict[int, list[Callable]] = {}
        if self.own_attention is not None:
            names = {f"blocks.{l}.hook_{s}_input": (l, s) for l in range(L) for s in "qkv"}
            names |= {f"blocks.{l}.attn.hook_result": (l, "result") for l in range(L)}
            for name, fn in fwd_hooks:
                if name in names:
                    layer, kind = names[name]
                    if kind == "result":
                        results.setdefault(layer, []).append(fn)
                    else:
                        inputs.setdefault(layer, {}).setdefault(kind, []).append(fn)
            fwd_hooks = [(n, fn) for n, fn in fwd_hooks if n not in names]
        extra, handles = [], []
        try:
            self._own_mlp_input_hooks(own, extra, handles)
            self._own_attention_hooks(inputs, results, extra, handles)
            # the residual is captured last at its hook point, after any hook that grows the batch there
            with self.bridge.hooks(fwd_hooks=fwd_hooks + extra, reset_hooks_end=True):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def _fires(self, name: str) -> bool:
        """Whether a hook point fires in a forward pass (one short prompt)."""
        fired = []
        with (
            torch.no_grad(),
            self.bridge.hooks(fwd_hooks=[(name, lambda x, hook=None: fired.append(1))], reset_hooks_end=True),
        ):
            self.bridge(torch.zeros((1, 4), dtype=torch.long, device=self.device), return_type="logits")
        return bool(fired)

    def _own_mlp_input_hooks(self, own: dict[int, list[Callable]], extra: list[Hook], handles: list) -> None:
        """The MLP receivers the bridge does not expose: ``own`` maps a layer to its receiver hooks.

        ``ln2`` (BLOOM): the hooks act on a copy of the pre-MLP norm's input (the residual stream
        after attention), as the bridge's own ``hook_mlp_in`` does elsewhere. ``shared-norm``
        (parallel blocks whose attention and MLP share one norm: Phi-1/2, Falcon, Cohere): the MLP
        reads ``ln1(resid_pre)``, the attention's very input, so its receiver is a copy of
        ``resid_pre`` of its own, captured at ``blocks.{l}.hook_resid_pre``, passed through the
        hooks, normalised by the block's norm module and given to the MLP in place of the shared
        input. Unchanged, either copy gives the MLP what it read before; its gradient is the MLP
        branch's alone. Bridge hooks are appended to ``extra``, module hook handles to ``handles``.
        """
        for layer, fns in own.items():
            block = self.bridge.blocks[layer]

            def apply(x, fns=fns):
                x = x.clone()  # [batch, pos, d_model]: the MLP's own copy
                for fn in fns:
                    x = fn(x)
                return x

            if self.own_mlp_input == "ln2":
                handles.append(
                    block.ln2.register_forward_pre_hook(lambda _m, args, apply=apply: (apply(args[0]), *args[1:]))
                )
                continue
            kept: dict[str, torch.Tensor] = {}

            def capture(x, hook=None, kept=kept):
                kept["resid"] = x
                return x

            def replace(module, args, kwargs, kept=kept, apply=apply, norm=block.ln1.original_component):
                x = norm(apply(kept.pop("resid")))
                return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

            extra.append((f"blocks.{layer}.hook_resid_pre", capture))
            handles.append(block.mlp.register_forward_pre_hook(replace, with_kwargs=True))

    def _own_attention_plan(self) -> list[OwnAttention]:
        """The modules from which the adapter splits each layer's attention, where the bridge cannot.

        Needs separate query, key, value and output projections (``nn.Linear``, heads in
        consecutive column blocks) and, checked on one probe prompt, query/key/value projections
        that read the block's pre-attention norm of the residual stream entering the block (or
        that stream itself); otherwise the model is refused with one line.
        """
        H, G = self.shape.n_heads, self.shape.n_kv_groups
        blocks = list(self.bridge.blocks)
        attn = blocks[0].attn
        unsupported = (
            f"{self.name}: {self.architecture} is not supported: TransformerLens's bridge cannot give its "
            f"attention ({type(attn).__name__}) separate query/key/value inputs and per-head outputs, which "
            "edge patching needs, "
        )
        subs = getattr(attn, "submodules", None) or {}
        if "experts" in subs or hasattr(getattr(attn, "original_component", None), "experts"):
            raise UserError(
                unsupported + "and the adapter cannot supply them: its queries and outputs come from experts "
                "routed per token (a mixture of attention heads), so a head has no fixed query projection"
            )
        plan = []
        for layer, block in enumerate(blocks):
            parts = {k: getattr(getattr(block.attn, k, None), "original_component", None) for k in "qkvo"}
            if not all(isinstance(m, torch.nn.Linear) for m in parts.values()):
                raise UserError(
                    unsupported + "and the adapter supplies them only from separate query, key, value and "
                    "output projections (Linear layers), which its attention does not have"
                )
            q, k, v, o = parts.values()
            d_head = q.out_features // H
            if (
                q.out_features != H * d_head
                or k.out_features != G * d_head
                or v.out_features != G * d_head
                or o.in_features != H * d_head
            ):
                raise UserError(
                    unsupported + f"and its projections' sizes ({q.out_features}, {k.out_features}, "
                    f"{v.out_features}) do not split into {H} heads and {G} key/value groups of one width"
                )
            ln1 = getattr(block, "ln1", None) if "ln1" in (block.submodules or {}) else None
            plan.append(OwnAttention(getattr(ln1, "original_component", None), q, k, v, o, d_head))
        self._probe_own_attention(plan, unsupported)
        return plan

    def _probe_own_attention(self, plan: list[OwnAttention], unsupported: str) -> None:
        """Refuse (``unsupported`` + why) unless the split of ``plan`` computes the model's attention."""
        # Two passes on one probe prompt. First: the projections read norm(resid_pre). Second, with
        # every block's input moved and the q/k/v projections' outputs held at the first pass's:
        # the output projection's input must not move (no other path from the input, e.g. a gate).
        seen: dict[tuple[int, str], torch.Tensor] = {}
        moved: dict[int, torch.Tensor] = {}
        replay = [False]

        def keep_in(key):
            def hook(_module, args):
                (moved if replay[0] and key[1] == "o" else seen).__setitem__(
                    key[0] if replay[0] else key, args[0].detach()
                )

            return hook

        def keep_out(key):
            def hook(_module, _args, out):
                if replay[0]:
                    return seen[key]
                seen[key] = out.detach()

            return hook

        def resid(layer):
            def hook(x, hook=None):
                if replay[0]:
                    g = torch.Generator().manual_seed(layer)
                    return x + 0.5 * x.std() * torch.randn(x.shape, generator=g, dtype=torch.float32).to(
                        x.device, x.dtype
                    )
                seen[(layer, "resid")] = x.detach()
                return x

            return hook

        handles = []
        for layer, p in enumerate(plan):
            for kind in "qkv":
                handles.append(getattr(p, kind).register_forward_pre_hook(keep_in((layer, kind))))
                handles.append(getattr(p, kind).register_forward_hook(keep_out((layer, kind + "_out"))))
            handles.append(p.o.register_forward_pre_hook(keep_in((layer, "o"))))
        tokens = probe_tokens(int(self.bridge.cfg.d_vocab), self.probe_positions).to(self.device)
        try:
            with (
                torch.no_grad(),
                self.bridge.hooks(
                    fwd_hooks=[(f"blocks.{l}.hook_resid_pre", resid(l)) for l in range(len(plan))], reset_hooks_end=True
                ),
            ):
                self.bridge(tokens, return_type="logits")
                for layer, p in enumerate(plan):
                    x = seen.get((layer, "resid"))
                    want = None if x is None else (p.norm(x) if p.norm is not None else x)
                    for kind in "qkv":
                        if _far(seen.get((layer, kind)), want):
                            raise UserError(
                                unsupported + f"and the adapter cannot supply them: layer {layer}'s {kind} "
                                "projection does not read the block's pre-attention norm of its input"
                            )
                replay[0] = True
                self.bridge(tokens, return_type="logits")
                for layer in range(len(plan)):
                    if _far(moved.get(layer), seen.get((layer, "o"))):
                        raise UserError(
                            unsupported + f"and the adapter cannot supply them: layer {layer}'s attention "
                            "reads its input outside the query/key/value projections (an output gate, say), "
                            "a path no receiver would carry"
                        )
        finally:
            for handle in handles:
                handle.remove()

    def _own_attention_hooks(
        self,
        inputs: dict[int, dict[str, list[Callable]]],
        results: dict[int, list[Callable]],
        extra: list[Hook],
        handles: list,
    ) -> None:
        """The q/k/v receivers and head senders the bridge does not expose (``own_attention``).

        ``inputs`` maps a layer to its hooks on ``hook_q_input``/``hook_k_input``/``hook_v_input``:
        the residual stream entering the block is captured at ``blocks.{l}.hook_resid_pre``,
        copied once per head (q) or key/value group (k, v), ``[batch, pos, heads, d_model]``,
        passed through the hooks, normalised copy by copy by the block's pre-attention norm, and
        each copy projected by its own head's (group's) rows of the projection's weight and bias;
        the concatenation replaces the projection's output. ``results`` maps a layer to its hooks
        on ``attn.hook_result``: each head's output ``z_h W_O,hᵀ`` ``[batch, pos, heads, d_model]``
        (the output bias in no head), computed from the output projection's input; a hook that
        returns a different tensor makes the projection's output ``Σ_h result_h + bias``. Layers
        and kinds with no hooks are left alone.
        """
        for layer, kinds in inputs.items():
            p = self.own_attention[layer]
            kept: dict[str, torch.Tensor] = {}

            def capture(x, hook=None, kept=kept):
                kept["resid"] = x
                return x

            extra.append((f"blocks.{layer}.hook_resid_pre", capture))
            for kind, fns in kinds.items():
                module = getattr(p, kind)

                def project(_module, _args, out, kept=kept, fns=fns, module=module, norm=p.norm, d_head=p.d_head):
                    resid = kept["resid"]  # [b, p, d]
                    n = module.out_features // d_head
                    x = resid.unsqueeze(2).expand(*resid.shape[:2], n, resid.shape[-1]).clone()  # one copy per head
                    for fn in fns:
                        x = fn(x)
                    x = norm(x) if norm is not None else x
                    w = module.weight.view(n, d_head, -1)
                    y = torch.einsum("bpnd,ned->bpne", x.to(w.dtype), w)
                    if module.bias is not None:
                        y = y + module.bias.view(n, d_head)
                    return y.reshape(out.shape).to(out.dtype)

                handles.append(module.register_forward_hook(project))
        for layer, fns in results.items():
            p = self.own_attention[layer]

            def split(_module, args, out, fns=fns, o=p.o, d_head=p.d_head):
                z = args[0]  # [b, p, heads · d_head]
                n = o.in_features // d_head
                w = o.weight.view(o.out_features, n, d_head)
                result = torch.einsum("bpne,dne->bpnd", z.reshape(*z.shape[:-1], n, d_head), w)
                given = result
                for fn in fns:
                    result = fn(result)
                if result is given:
                    return None  # recorded only: the model's own output stands
                total = result.sum(2)
                return (total if o.bias is None else total + o.bias).to(out.dtype)

            handles.append(p.o.register_forward_hook(split))

    def hook_count(self) -> int:
        """Forward and backward hooks attached right now (for tests that none are left)."""
        return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in self.bridge.hook_dict.values())

    def logits(
        self, tokens: Int[torch.Tensor, "batch pos"], positions: Int[torch.Tensor, " batch"] | None = None
    ) -> Float[torch.Tensor, "batch pos vocab"] | Float[torch.Tensor, "batch vocab"]:
        """Run the model on token ids (no special tokens added) and return its logits.

        With ``positions``, only each prompt's logits at its position are computed (``[batch,
        vocab]``): the unembedding sees one residual vector per prompt, which saves most of a
        forward pass for a large vocabulary (Gemma-3's 262k tokens).
        """
        tokens = tokens.to(self.device)
        if positions is None:
            return self.bridge(tokens, return_type="logits")
        positions = positions.to(self.device)
        rows = torch.arange(len(positions), device=self.device)  # the batch may grow inside the pass

        def gather(x, hook=None):
            return x[rows, positions].unsqueeze(1)

        with self.bridge.hooks(fwd_hooks=[("unembed.hook_in", gather)], reset_hooks_end=True):
            return self.bridge(tokens, return_type="logits")[:, 0]

    def cache(self, tokens: Int[torch.Tensor, "batch pos"], names: list[str]) -> dict[str, torch.Tensor]:
        """Activations at the named hook points."""
        _, cache = self.bridge.run_with_cache(tokens.to(self.device), names_filter=lambda n: n in names)
        return {n: cache[n] for n in names}

    @cached_property
    def unembedding_is_linear(self) -> bool:
        """Whether the logits are the final norm and the unembedding of the logits' input, as
        :meth:`final_logits` computes them (False where a head sits between them: the ModernBERT
        decoder's dense, GELU and norm). Checked on the probe prompt, to 1e-4 of the largest logit."""
        tokens = probe_tokens(int(self.bridge.cfg.d_vocab), self.probe_positions).to(self.device)
        seen = {}

        def keep(x, hook=None):
            seen["resid"] = x.detach()
            return x

        with torch.no_grad(), self.hooks([(self.RECEIVER_LOGITS, keep)]):
            logits = self.bridge(tokens, return_type="logits")[0]  # [pos, vocab]
        ids = torch.arange(min(logits.shape[-1], 16), device=self.device).expand(logits.shape[0], -1)  # [pos, t]
        got = self.final_logits(seen["resid"][0][:, None], ids)[:, 0]  # [pos, t]
        want = logits[:, : ids.shape[1]]
        return bool((got.double() - want.double()).abs().max() <= 1e-4 * max(want.abs().max().item(), 1.0))

    def final_logits(
        self, resid: Float[torch.Tensor, "batch n d_model"], token_ids: Int[torch.Tensor, "batch t"]
    ) -> Float[torch.Tensor, "batch n t"]:
        """Logits of some tokens for residual-stream vectors at the logits' input (``RECEIVER_LOGITS``).

        Applies the final norm and the unembedding to each of ``n`` vectors per prompt, reading only
        the columns of that prompt's ``token_ids`` (direct effects of heads: ``circuitfinder.graphs.roles``).
        """
        with torch.no_grad():
            x = self.bridge.ln_final(resid.to(self.device, self.dtype))  # [batch, n, d_model]
            ids = token_ids.to(self.device)
            w = self.bridge.W_U[:, ids].permute(1, 0, 2)  # [batch, d_model, t]
            out = torch.einsum("bnd,bdt->bnt", x, w)
            b_u = getattr(self.bridge, "b_U", None)
            return out if b_u is None else out + b_u[ids][:, None, :]


def load_unchecked(
    name: str,
    log: Callable[[str], None] = lambda _msg: None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ModelAdapter:
    """Load a bundled model, Hugging Face id or local folder and wrap it for patching, without the
    check at load (``circuitfinder.engine.checks.load_model``, ``cf.load_model``, runs it)."""
    if device is None or torch.device(device).type == "cpu":
        keep_freed_memory()
    model, tokenizer, hf_id = load_pretrained(name, log, dtype, device)
    return ModelAdapter.from_hf(model, tokenizer, name, hf_id, dtype=dtype)
