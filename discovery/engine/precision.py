"""How near "exact" is: the one tolerance for results the engine must reproduce exactly.

The engine's exact claims (full circuit = clean run, empty circuit = corrupted run, a stacked
pass = one copy per circuit, a patched edge = a plain-hook reference) compare two computations of
the same function that round differently: a patched receiver input is rebuilt as a sum of sender
values, a stacked batch is 4 copies deep instead of 2. They agree to the rounding of the precision
the model *really* computes in, its working dtype (``ModelAdapter.working_dtype``). That is the
model's dtype, except where a float64 model passes through float32 islands: Hugging Face's
RMSNorms (Llama, Gemma, ...) compute in float32 and cast back, and the bridge's rotary attention
takes q·cos, k·sin and its softmax in float32. An island rounds everything it passes onto the
float32 grid. On Gemma's post-norm blocks every residual term leaves such a norm, so the residual
stream is a sum of a few float32 numbers and often sits exactly on a round-half tie of the next
norm's float32 cast: a last-bit float64 difference (the summation order of a matrix product,
which depends on the CPU's kernels and the batch shape) flips the tie and becomes a float32 ulp,
6e-8 relative. That is the 4e-8 measured on the tiny float64 Gemma-3 model: 0 on one CPU, 4e-8 on
another, with the same releases.

Tolerance, for an absolute difference of logits (or any output of magnitude ``scale``)::

    GROWTH_PER_LAYER · n_layers · eps(working dtype) · max(1, scale)

``GROWTH_PER_LAYER = 64`` is a margin over what was measured: on the tiny 3-layer float64 Gemma-3
(working dtype float32) a relative nudge of 1e-15 on *every* value of the residual stream flips
ties everywhere and moves the logits (scale 8) by 4.6e-6, about 1.6 ulp · scale per layer; the
tiny GPT-2 (no island, float64 throughout) reproduces the corrupted run to 1.3e-15. A real
fault moves logits by far more: one wrongly wired edge moves the tiny models' logits by 1e-3 to
1, and the tests check that their circuits differ by more than 1e-3. This formula is stated for float32
and float64 working dtypes.

**Half precision** (bfloat16, float16) is measured instead of bounded: a forward pass in 8 or 11
bits of mantissa is itself noisy, and the formula's bound (``64 · L · eps``, 7.5 times the logits'
size for SmolLM2 in bfloat16) could not tell a fault from noise. ``ModelAdapter.rounding_noise``
rounds the residual stream entering every block off once more (a relative ``½ eps`` random
nudge) and reads how far the logits move; the tolerance is :data:`NOISE_MARGIN` times that,
relative to the output's size. On SmolLM2 the exact claims differ from their references by at
most 0.2 of that noise in bfloat16, float16 and float32 alike (full = clean: 0; empty =
corrupted: 0.375 of 33 in bfloat16, against a noise of 2.1), so the margin of 4 leaves a factor 20.
The noise itself is what bfloat16 costs: 6 % of the largest logit on SmolLM2, 0.2 % in float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitfinder.errors import UserError

GROWTH_PER_LAYER = 64
NOISE_MARGIN = 4
HALF = (torch.bfloat16, torch.float16)


def exact_tolerance(working_dtype: torch.dtype, n_layers: int, scale: float = 1.0) -> float:
    """The largest absolute difference between two exact computations of an output of size ``scale``."""
    return GROWTH_PER_LAYER * max(n_layers, 1) * torch.finfo(working_dtype).eps * max(1.0, float(scale))


def tolerance_for(adapter, reference: torch.Tensor) -> float:
    """The tolerance for a model's outputs like ``reference``: ``exact_tolerance`` for its working
    dtype and depth, or in half precision :data:`NOISE_MARGIN` times its measured rounding noise."""
    scale = reference.detach().abs().max().item()
    if adapter.working_dtype in HALF:
        return NOISE_MARGIN * adapter.rounding_noise * max(1.0, scale)
    return exact_tolerance(adapter.working_dtype, adapter.shape.n_layers, scale)


def noise_floor_for(adapter, reference: torch.Tensor) -> float:
    """What a change to outputs like ``reference`` must exceed to be more than rounding: the
    exact tolerance, or in half precision the rounding noise itself (a quarter of the tolerance)."""
    if adapter.working_dtype in HALF:
        return adapter.rounding_noise * max(1.0, reference.detach().abs().max().item())
    return tolerance_for(adapter, reference)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware, so that it runs faster than float32: a CUDA
    GPU that supports it, or a CPU with AVX-512 BF16 or AMX (its flags in Linux's /proc/cpuinfo).
    Elsewhere (an older x86 CPU, MPS) bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_dtype(text: str, device: torch.device, model: str = "") -> torch.dtype:
    """``auto``: bfloat16 where ``device`` computes it natively (:func:`native_bfloat16`), else
    float32; float64 for the compiled tracr models, whose hard attention needs it. A run in
    ``auto`` that lands in bfloat16 re-measures its circuit in float32 before reporting it, and a
    search in ``auto`` runs in float32 (``circuitfinder.runs.run``). Any other text: :func:`parse_dtype`."""
    if text != "auto":
        try:
            return parse_dtype(text)
        except UserError:
            raise UserError(f"unknown dtype {text!r}: use auto, float32, bfloat16, float16 or float64") from None
    from circuitfinder.engine.models import COMPILED

    if model in COMPILED:
        return torch.float64
    return torch.bfloat16 if native_bfloat16(device) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``: the name the command line and ``summary.json`` use."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str) -> torch.dtype:
    """``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``/``half``, ``float64``: the dtype."""
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float64": torch.float64,
    }
    if text not in names:
        raise UserError(f"unknown dtype {text!r}: use float32, bfloat16, float16 or float64")
    return names[text]


@dataclass(frozen=True)
class PrecisionPlan:
    """A run's precision, decided once before loading (:func:`plan_precision`).

    Attributes:
        model: the dtype the run's model is loaded in; the reported faithfulness is measured in it,
            unless ``remeasure``.
        passes: the dtype of a search's patched passes: ``model``, or a half precision on a second
            copy of the weights when float32 referees the search.
        referee: float32 (``model``) referees a half-precision search's passes
            (``circuitfinder.methods.acdc.Referee``).
        remeasure: ``auto`` chose half precision for attribution: the circuit is measured again on
            a float32 copy of the model, and that is what the run reports.
        why: one line saying what was chosen and why, where it is more than the dtype asked for.
    """

    model: torch.dtype
    passes: torch.dtype
    referee: bool = False
    remeasure: bool = False
    why: str = ""

    def to_json(self) -> dict:
        return {
            "model": dtype_name(self.model),
            "passes": dtype_name(self.passes),
            "referee": self.referee,
            "remeasure": self.remeasure,
            "why": self.why,
        }


def plan_precision(
    requested: str, device: torch.device, model: str, searching: bool, referee: bool, batch_size: int = 16
) -> PrecisionPlan:
    """The precision of a run that loads ``model`` on ``device`` with ``dtype=requested``.

    * ``auto`` resolves by :func:`resolve_dtype`. Where it lands in half precision, attribution runs
      in it and its circuit is re-measured in float32; a search runs in float32 instead (bfloat16's
      rounding moves a removal's change of distance by about half of ACDC's τ).
    * A search asked for in half precision with ``referee`` loads the model in float32 and runs its
      passes on a half-precision copy, refereed by float32, where the memory plan of both fits the
      device (``circuitfinder.engine.plan.refereed_total``); otherwise it runs in half precision alone.
    """
    dtype = resolve_dtype(requested, device, model)
    half = dtype in HALF
    if requested == "auto" and half and searching:
        return PrecisionPlan(
            torch.float32,
            torch.float32,
            why=(
                f"auto: float32 on {device} for a search (bfloat16's rounding moves a removal's change of distance by "
                "about half of ACDC's τ; `dtype='bfloat16'` runs the passes it can settle in bfloat16)"
            ),
        )
    if requested == "auto" and half:
        return PrecisionPlan(
            dtype,
            dtype,
            remeasure=True,
            why=(
                f"{dtype_name(dtype)} on {device}, chosen by auto: this device computes it natively; the circuit is "
                "re-measured in float32"
            ),
        )
    if half and searching and referee:
        no_room = _no_room_for_referee(model, dtype, device, batch_size)
        if no_room is None:
            return PrecisionPlan(
                torch.float32,
                dtype,
                referee=True,
                why=(
                    f"float32 on {device}; the search's passes in {dtype_name(dtype)} where they can settle its "
                    "removals, refereed in float32"
                ),
            )
        return PrecisionPlan(dtype, dtype, why=no_room)
    return PrecisionPlan(dtype, dtype)


def given_precision(dtype: torch.dtype, searching: bool) -> PrecisionPlan:
    """The precision of a run given a model already loaded in ``dtype``: it runs in that dtype alone
    (``why`` says so for a search in half precision, which then has no float32 referee)."""
    if not (searching and dtype in HALF):
        return PrecisionPlan(dtype, dtype)
    return PrecisionPlan(
        dtype,
        dtype,
        why=(
            f"the search runs in {dtype_name(dtype)} alone, without a float32 referee (the model was given loaded in "
            "it; give its name to have float32 referee the search)"
        ),
    )


def _no_room_for_referee(model: str, half: torch.dtype, device: torch.device, batch_size: int) -> str | None:
    """None when the float32 model and a half-precision copy fit ``device`` (a shape the memory
    plan cannot read without loading is taken to fit); else why there is no referee."""
    from circuitfinder.engine.plan import format_bytes, free_memory, plan_shape, refereed_total

    try:
        shape = plan_shape(model)
    except Exception:  # noqa: BLE001 -- a shape the plan cannot read leaves the check to the load
        return None
    need = refereed_total(shape, half, batch_size, 32, device)
    free = free_memory(device)
    if need <= free:
        return None
    smaller = next((b for b in range(batch_size - 1, 0, -1) if refereed_total(shape, half, b, 32, device) <= free), 0)
    return (
        f"no float32 referee: the float32 model and a {dtype_name(half)} copy need {format_bytes(need)} for "
        f"batches of {batch_size}, {device} has {format_bytes(free)} free; the search runs in {dtype_name(half)} "
        "alone" + (f" (`batch_size={smaller}` leaves room for the referee)" if smaller else "")
    )
