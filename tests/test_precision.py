"""The exact tolerance (circuitfinder.engine.precision): the working dtype is probed, and the float32 islands
it finds are real: a last-bit change moves a float64 Gemma-3 by float32 rounding, not float64's."""

import pytest
import torch

from circuitfinder.engine.precision import exact_tolerance, tolerance_for
from tiny_models import random_pair, tiny  # noqa: F401 (fixture)

WORKING = {"tiny-gpt2": torch.float64, "tiny-llama": torch.float32, "tiny-gemma3": torch.float32}


def test_working_dtype_finds_the_float32_islands(tiny):
    # GPT-2: LayerNorm and attention in float64 throughout. Llama and Gemma through the bridge:
    # the rotary attention's softmax in float32; Gemma's RMSNorms also compute in float32.
    assert tiny.working_dtype == WORKING[tiny.name]


def _nudged_logits(tiny, tokens, relative: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)

    def nudge(x, hook=None):
        return x * (1 + relative * torch.randn(x.shape, generator=g, dtype=x.dtype))

    with torch.no_grad(), tiny.hooks([("blocks.1.hook_resid_pre", nudge)]):
        return tiny.logits(tokens)


def test_a_last_bit_change_moves_the_logits_by_the_working_precision_and_no_more(tiny):
    tokens, _ = random_pair(batch=8, pos=6)
    base = tiny.logits(tokens)
    moved = max((_nudged_logits(tiny, tokens, 1e-15, seed) - base).abs().max().item() for seed in range(5))
    assert moved <= tolerance_for(tiny, base)
    if tiny.name == "tiny-gemma3":
        # post-norm residual terms sit on the float32 grid: the float64 tolerance would fail here
        assert moved > exact_tolerance(torch.float64, tiny.shape.n_layers, base.abs().max().item())


def test_the_tolerance_scales_with_eps_depth_and_size():
    assert exact_tolerance(torch.float32, 3, 8.0) == pytest.approx(64 * 3 * 2**-23 * 8)
    assert exact_tolerance(torch.float64, 1, 0.5) == pytest.approx(64 * 2**-52)
