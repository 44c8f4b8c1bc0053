"""The check at load: a model is used only where the engine is exact on it.

The tests hold the engine exact on a matrix of architectures (``tests/test_architectures.py``);
this check protects the models they do not cover. A few forward passes on one random prompt
pair (8 tokens, or the model's context if shorter), every comparison within
``circuitfinder.engine.precision``'s tolerance:

0. **The bridge computes the model it wraps.** Its logits on the probe prompt equal the Hugging
   Face model's own, taken before the bridge wrapped its modules (``ModelAdapter.hf_reference``).
   Checks 1–4 compare the engine with the bridge, so without this one a bridge that runs a model
   differently would pass them all.
1. **Every receiver is wired.** A random vector added at each receiver hook (q, k, v, MLP input
   of the first, middle and last layers; the logits' input) moves the logits. A hook that does
   not sit on what the model reads moves nothing: the bridge's MLP input on BLOOM, Falcon,
   Phi-1/2 and Cohere is such a hook, and edges into those MLPs would silently do nothing.
2. **The block rule of the graph holds.** A change to layer l's heads moves layer l's MLP output
   exactly when the graph has head → same-layer-MLP edges (``ModelShape.parallel``).
3. **Full circuit = clean run, empty circuit = corrupted run.**
4. **Single edges of every kind** (from the input, a head and an MLP; into q, k, v, an MLP and
   the logits), patched by the engine, equal the clean run with that edge's corrupted − clean
   difference added at its receiver by one plain hook.
5. **A random sparse circuit** (about 10 % of the edges kept; half the receivers keep most of
   theirs, so both of the engine's ways of summing a receiver's removed edges run), patched by
   the engine, equals :func:`direct_patched_logits`, which adds every removed edge's term at its
   receiver directly, with no running total. Single edges and the full and empty circuits are
   not enough: a shortcut can be exact on all three and wrong on everything between them.

Any failure refuses the model with one line (:class:`ModelRefused`); ``check=False`` (the command
line's ``--no-check-model``) skips the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from circuitfinder.engine.adapter import ModelAdapter, load_unchecked
from circuitfinder.engine.graph import EdgeGraph, ReceiverPoint
from circuitfinder.engine.patching import patched_logits, run_recording_senders
from circuitfinder.engine.precision import HALF, exact_tolerance, noise_floor_for, tolerance_for
from circuitfinder.errors import UserError


class ModelRefused(UserError):
    """A model on which the engine would not be exact."""


# Architectures the generic check cannot see through, refused on the test matrix's evidence
# (tests/test_architectures.py measures each against the Hugging Face model's own modules).
KNOWN_INEXACT = {
    "BloomForCausalLM": "the bridge's query/key/value inputs do not act as the model's (an edge into q, k or v "
    "moves the logits by up to 0.3 against Hugging Face's own modules)",
}


def load_model(
    name: str,
    log: Callable[[str], None] = lambda _msg: None,
    check: bool = True,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = "auto",
) -> ModelAdapter:
    """:func:`circuitfinder.engine.adapter.load_unchecked` in ``dtype`` (``auto``, ``float32``, ``bfloat16``, ...)
    on ``device`` (``auto``, ``cpu``, ``cuda``, ...), then :func:`check_model` unless ``check`` is False."""
    from circuitfinder.engine.models import resolve_device
    from circuitfinder.engine.precision import dtype_name, resolve_dtype

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device, name) if isinstance(dtype, str) else dtype
    adapter = load_unchecked(name, log, dtype, device)
    if check:
        worst = check_model(adapter)
        log(
            f"checked {adapter.name}: patching exact (largest difference {worst:.2%} of the "
            f"{dtype_name(adapter.working_dtype)} tolerance)"
        )
    return adapter


def _refuse(adapter: ModelAdapter, what: str) -> ModelRefused:
    return ModelRefused(
        f"{adapter.name} ({adapter.architecture}): {what}; the engine would not be exact on it "
        "(`check_model=False` runs it anyway)"
    )


def _random_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype) * x.detach().std().clamp_min(
        1e-3
    )


def check_model(adapter: ModelAdapter, seed: int = 0) -> float:
    """Raise :class:`ModelRefused` unless the engine is exact on this model (module docstring).

    Returns the largest difference of the exactness comparisons (3 to 5) as a fraction of the tolerance.
    An error inside the check (a hook point the architecture lacks, say) refuses the model in one line too.
    """
    try:
        return _check_model(adapter, seed)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - never a traceback for a model the engine cannot handle
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise _refuse(adapter, f"the check at load failed ({type(e).__name__}: {reason})") from None


def _check_model(adapter: ModelAdapter, seed: int) -> float:
    """The steps of the module docstring, in order; the exactness steps (3 to 5) return their worst ratio."""
    if adapter.architecture in KNOWN_INEXACT:
        raise _refuse(adapter, KNOWN_INEXACT[adapter.architecture])
    probe = _Probe.of(adapter, seed)
    _check_bridge(probe)
    _check_receivers_wired(probe)
    _check_block_rule(probe)
    return max(_check_full_and_empty(probe), _check_single_edges(probe), _check_sparse_circuit(probe))


@dataclass(frozen=True)
class _Probe:
    """One random prompt pair ``[1, positions]`` and both runs' senders and logits: what every step reads."""

    adapter: ModelAdapter
    graph: EdgeGraph
    seed: int
    clean: torch.Tensor
    corr_senders: torch.Tensor  # [senders, 1, pos, d_model]
    corr_logits: torch.Tensor
    clean_senders: torch.Tensor
    clean_logits: torch.Tensor
    tol: float  # the exact tolerance of these logits

    @classmethod
    def of(cls, adapter: ModelAdapter, seed: int) -> "_Probe":
        graph = EdgeGraph(adapter.shape)
        g = torch.Generator().manual_seed(seed)
        vocab = int(adapter.bridge.cfg.d_vocab)
        clean, corrupted = (
            torch.randint(0, vocab, (1, adapter.probe_positions), generator=g, device="cpu") for _ in range(2)
        )
        try:
            corr_senders, corr_logits = run_recording_senders(adapter, graph, corrupted)
            clean_senders, clean_logits = run_recording_senders(adapter, graph, clean)
        except RuntimeError as e:  # e.g. a mixture-of-experts matmul with no float64 kernel
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _refuse(adapter, f"a forward pass fails in {adapter.dtype} ({reason})") from None
        return cls(
            adapter,
            graph,
            seed,
            clean,
            corr_senders,
            corr_logits,
            clean_senders,
            clean_logits,
            tolerance_for(adapter, clean_logits),
        )

    def compare(self, got: torch.Tensor, want: torch.Tensor, what: str) -> float:
        """``|got − want|`` as a fraction of the tolerance; refuses the model above 1 (``what`` says what differs)."""
        diff = (got - want).abs().max().item()
        if diff > self.tol:
            raise _refuse(self.adapter, f"{what} by {diff:.2g} (tolerance {self.tol:.2g})")
        return diff / self.tol


def _check_bridge(probe: _Probe) -> None:
    """0. The bridge's logits are the wrapped model's own."""
    adapter = probe.adapter
    if adapter.hf_reference is None:
        return
    tokens, want = adapter.hf_reference
    with torch.no_grad():
        got = adapter.bridge(tokens.to(adapter.device), return_type="logits")
    diff = (got.double() - want.to(got.device).double()).abs().max().item()
    if diff > _bridge_tolerance(adapter, want):
        raise _refuse(adapter, f"the bridge's logits differ from the Hugging Face model's own by {diff:.2g}")


def _check_receivers_wired(probe: _Probe) -> None:
    """1. Every receiver kind, in the first, middle and last layer, moves the logits."""
    adapter, L = probe.adapter, probe.adapter.shape.n_layers
    layers = sorted({0, L // 2, L - 1})
    for point in probe.graph.receiver_points:
        if point.layer not in layers and point.kind != "logits" or reads_nothing(adapter, point.kind, point.layer):
            continue
        hook_name = adapter.receiver_hook(point.kind, point.layer)
        fired = []

        def nudge(x, hook=None, fired=fired):
            fired.append(True)
            return x + _random_like(x, probe.seed + 1)

        with torch.no_grad(), adapter.hooks([(hook_name, nudge)]):
            moved = (adapter.logits(probe.clean) - probe.clean_logits).abs().max().item() > noise_floor_for(
                adapter, probe.clean_logits
            )
        if fired and not moved:  # a saturated softmax or ReLU downstream (tracr's hard attention): ask the reader
            moved = _reader_moves(adapter, point, probe.clean, hook_name, nudge)
        if not fired or not moved:
            where = "never fires" if not fired else "changes nothing"
            raise _refuse(adapter, f"the {point.kind} input of layer {point.layer} ({hook_name}) {where}")


def _check_block_rule(probe: _Probe) -> None:
    """2. Heads reach their own layer's MLP exactly when the graph says so, in the first and the last
    layer whose MLP reads anything."""
    adapter, L = probe.adapter, probe.adapter.shape.n_layers
    first = next((l for l in range(L) if not reads_nothing(adapter, "mlp", l)), None)
    last = next(l for l in reversed(range(L)) if not reads_nothing(adapter, "mlp", l)) if first is not None else None
    for layer in sorted({first, last} - {None}):
        mlp_out = {}

        def keep(x, hook=None):
            mlp_out["value"] = x.detach().clone()
            return x

        def bump(x, hook=None):
            return x + _random_like(x, probe.seed + 2)

        mlp_hook = adapter.sender_hook("mlp", layer)
        with torch.no_grad(), adapter.hooks([(mlp_hook, keep)]):
            adapter.logits(probe.clean)
        before = mlp_out.pop("value")
        with torch.no_grad(), adapter.hooks([(adapter.sender_hook("attn", layer), bump), (mlp_hook, keep)]):
            adapter.logits(probe.clean)
        change = (mlp_out["value"] - before).abs().max().item()
        # an MLP that does not read its layer's heads cannot change at all; in half precision any change counts
        reads_heads = change > (0.0 if adapter.working_dtype in HALF else tolerance_for(adapter, before))
        if reads_heads == adapter.shape.parallel:
            says = "parallel" if adapter.shape.parallel else "sequential"
            raise _refuse(
                adapter,
                f"layer {layer}'s MLP {'reads' if reads_heads else 'does not read'} its own "
                f"layer's heads, but the block was taken as {says}",
            )


def _check_full_and_empty(probe: _Probe) -> float:
    """3. The full circuit gives the clean run, the empty circuit the corrupted run."""
    graph, patch = probe.graph, partial(patched_logits, probe.adapter, probe.graph, probe.clean, probe.corr_senders)
    none = torch.zeros(graph.n_senders, graph.n_receivers, device="cpu")
    return max(
        probe.compare(patch(none), probe.clean_logits, "the full circuit differs from the clean run"),
        probe.compare(
            patch(graph.allowed.double()), probe.corr_logits, "the empty circuit differs from the corrupted run"
        ),
    )


def _check_single_edges(probe: _Probe) -> float:
    """4. One edge of every kind, patched by the engine, against a single plain hook at its receiver."""
    adapter, graph, worst = probe.adapter, probe.graph, 0.0
    for edge in sample_edges(graph):
        s, r = graph.edge_index(edge)
        removed = torch.zeros(graph.n_senders, graph.n_receivers, device="cpu")
        removed[s, r] = 1
        got = patched_logits(adapter, graph, probe.clean, probe.corr_senders, removed)
        point = next(p for p in graph.receiver_points if p.start <= r < p.stop)
        delta = probe.corr_senders[s] - probe.clean_senders[s]
        with torch.no_grad(), adapter.hooks([receiver_delta_hook(adapter, point, r, delta)]):
            want = adapter.logits(probe.clean)
        worst = max(worst, probe.compare(got, want, f"patching {edge} differs from a plain hook"))
    return worst


def _check_sparse_circuit(probe: _Probe) -> float:
    """5. A random sparse circuit against the direct sum of its removed edges."""
    removed = random_circuit(probe.graph, kept=0.1, seed=probe.seed)
    args = (probe.adapter, probe.graph, probe.clean, probe.corr_senders, removed)
    return probe.compare(
        patched_logits(*args),
        direct_patched_logits(*args),
        "a random sparse circuit differs from the direct sum of its removed edges",
    )


def random_circuit(graph: EdgeGraph, kept: float, seed: int = 0) -> torch.Tensor:
    """Patch weights ``[senders, receivers]`` (1 = removed) keeping about ``kept`` of each receiver's
    edges, or ``1 − kept`` for a random half of the receivers."""
    g = torch.Generator().manual_seed(seed)
    density = torch.where(torch.rand(graph.n_receivers, generator=g) < 0.5, kept, 1 - kept)
    keep = torch.rand(graph.allowed.shape, generator=g) < density
    return ((~keep) & graph.allowed).double()


def direct_patched_logits(
    adapter: ModelAdapter, graph: EdgeGraph, clean: torch.Tensor, corrupted_senders: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """The plain definition of a patched run, for checking the engine: each receiver reads its input
    plus ``Σ_{s removed} (corrupted_s − current_s)`` over its removed edges, with ``current_s`` the
    sender's value in this run, recorded as it fires. No running total, stacking or resumed blocks."""
    current: dict[int, torch.Tensor] = {}  # sender index -> [b, p, d]

    def recorder(point):
        def record(values):
            rows = values.permute(2, 0, 1, 3) if values.dim() == 4 else values.unsqueeze(0)
            current.update({point.start + i: row.detach().clone() for i, row in enumerate(rows)})

        return record

    def patcher(point: ReceiverPoint):
        def patch(x, hook=None):
            x = x.clone()
            for j in range(point.stop - point.start):
                senders = torch.nonzero(removed[: point.n_senders, point.start + j]).flatten().tolist()
                if not senders:
                    continue
                term = torch.stack([corrupted_senders[s] - current[s] for s in senders]).sum(0).to(x.dtype)
                if point.per_head:
                    x[:, :, j] += term
                else:
                    x += term
            return x

        return patch

    hooks = [h for p in graph.sender_points for h in adapter.sender_hooks(p.kind, p.layer, recorder(p))]
    hooks += [(adapter.receiver_hook(p.kind, p.layer), patcher(p)) for p in graph.receiver_points]
    with torch.no_grad(), adapter.hooks(hooks):
        return adapter.logits(clean)


def _bridge_tolerance(adapter: ModelAdapter, reference: torch.Tensor) -> float:
    """Two implementations of one model: Hugging Face's own modules compute norms, rotary tables and
    softmax in float32 even in a float64 model, so float64 is held to float32's tolerance."""
    if adapter.working_dtype in HALF:
        return tolerance_for(adapter, reference)
    working = torch.float32 if adapter.dtype == torch.float64 else adapter.working_dtype
    return exact_tolerance(working, adapter.shape.n_layers, reference.abs().max().item())


def _reader_moves(
    adapter: ModelAdapter, point: ReceiverPoint, tokens: torch.Tensor, hook_name: str, nudge: Callable
) -> bool:
    """Whether ``nudge`` at a receiver moves the first value computed linearly from it (the
    attention scores for q and k, ``z`` for v, the MLP's pre-activation), which no saturation hides."""
    reader = adapter.reader_hook(point.kind, point.layer)
    if reader is None:
        return False
    seen: list[torch.Tensor] = []

    def keep(x, hook=None):
        seen.append(x.detach().clone())
        return x

    with torch.no_grad():
        with adapter.hooks([(reader, keep)]):
            adapter.logits(tokens)
        with adapter.hooks([(hook_name, nudge), (reader, keep)]):
            adapter.logits(tokens)
    if len(seen) != 2:  # the reader's hook does not fire on this architecture
        return False
    before, after = seen
    lowest = torch.finfo(before.dtype).min / 2  # masked attention scores are -inf or the dtype's lowest value
    finite = torch.isfinite(before) & torch.isfinite(after) & (before > lowest) & (after > lowest)
    return bool(finite.any()) and (after - before)[finite].abs().max().item() > noise_floor_for(adapter, before[finite])


def reads_nothing(adapter: ModelAdapter, kind: str, layer: int) -> bool:
    """Whether a receiver's reader has all-zero weights (``W_Q``/``W_K``/``W_V`` for q/k/v, every
    parameter of the MLP), so that nothing added at it can move the model. False where unknown."""
    try:
        block = adapter.bridge.blocks[layer]
        if kind in ("q", "k", "v"):
            weights = [getattr(block.attn, f"W_{kind.upper()}")]
        elif kind == "mlp":
            weights = list(block.mlp.original_component.parameters())
        else:
            return False
    except (AttributeError, IndexError, NotImplementedError, RuntimeError):
        return False
    return bool(weights) and not any(bool(w.any()) for w in weights)


def sample_edges(graph: EdgeGraph) -> list[str]:
    """One edge of every sender kind into every receiver kind, in the last layer (and the first where it must)."""
    L, H, G = graph.shape.n_layers, graph.shape.n_heads, graph.shape.n_kv_groups
    last, prev = L - 1, max(L - 2, 0)
    head_into_mlp = f"a{last}.h0->m{last}" if not graph.shape.parallel else f"a{prev}.h{H - 1}->m{last}"
    wanted = [
        "input->a0.h0<q>",
        f"input->a{last}.g0<k>",
        f"input->a{last}.g{G - 1}<v>",
        f"input->m{last}",
        f"a{prev}.h0->a{last}.h{H - 1}<q>",
        f"m{prev}->a{last}.g0<k>",
        f"a{prev}.h{H - 1}->a{last}.g{G - 1}<v>",
        head_into_mlp,
        f"m{prev}->m{last}",
        f"a{last}.h0->logits",
        f"m{last}->logits",
        "input->logits",
    ]
    allowed = graph.allowed
    keep = []
    for name in wanted:
        try:
            s, r = graph.edge_index(name)
        except KeyError:
            continue
        if allowed[s, r] and name not in keep:
            keep.append(name)
    return keep


def receiver_delta_hook(adapter: ModelAdapter, point: ReceiverPoint, receiver: int, delta: torch.Tensor) -> tuple:
    """A hook adding ``delta`` ``[batch, pos, d]`` to one receiver's input: the plain reference of one patched edge."""

    def hook(x, hook=None):
        x = x.clone()
        if point.per_head:
            x[:, :, receiver - point.start] += delta.to(x.dtype)
        else:
            x += delta.to(x.dtype)
        return x

    return (adapter.receiver_hook(point.kind, point.layer), hook)
