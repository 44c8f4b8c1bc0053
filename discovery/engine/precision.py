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
6e-8 relative. That is issue 14's 4e-8 on the tiny float64 Gemma-3 model: 0 on one CPU, 4e-8 on
another, with the same releases.

Tolerance, for an absolute difference of logits (or any output of magnitude ``scale``)::

    GROWTH_PER_LAYER · n_layers · eps(working dtype) · max(1, scale)

``GROWTH_PER_LAYER = 64`` is a margin over what was measured: on the tiny 3-layer float64 Gemma-3
(working dtype float32) a relative nudge of 1e-15 on *every* value of the residual stream flips
ties everywhere and moves the logits (scale 8) by 4.6e-6, about 1.6 ulp · scale per layer; the
tiny GPT-2 (no island, float64 throughout) reproduces the corrupted run to 1.3e-15. A real
fault moves logits by far more: one wrongly wired edge moves the tiny models' logits by 1e-3 to
1, and the tests check that their circuits differ by more than 1e-3. Half precision needs its own
derivation (accumulation in float32, one rounding per op): this formula is stated for float32 and
float64 working dtypes.
"""

from __future__ import annotations

import torch

GROWTH_PER_LAYER = 64


def exact_tolerance(working_dtype: torch.dtype, n_layers: int, scale: float = 1.0) -> float:
    """The largest absolute difference between two exact computations of an output of size ``scale``."""
    return GROWTH_PER_LAYER * max(n_layers, 1) * torch.finfo(working_dtype).eps * max(1.0, float(scale))


def tolerance_for(adapter, reference: torch.Tensor) -> float:
    """``exact_tolerance`` for a model's outputs like ``reference`` (its working dtype and depth)."""
    return exact_tolerance(adapter.working_dtype, adapter.shape.n_layers, reference.detach().abs().max().item())
