"""The exact tolerance (circuitfinder.engine.precision): the working dtype is probed, and the float32 islands
it finds are real: a last-bit change moves a float64 Gemma-3 by float32 rounding, not float64's."""

import math

import pytest
import torch
from tiny_models import random_pair, tiny  # noqa: F401 (fixture)

from circuitfinder.engine.precision import exact_tolerance, tolerance_for

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


# ---- half precision ------------------------------------------------------------------

HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(
    scope="module",
    params=[(s, d) for s in ("gpt2", "llama", "gemma3") for d in HALF_DTYPES],
    ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}",
)
def half(request, tmp_path_factory):
    from tiny_models import tiny_adapter

    style, dtype = request.param
    return tiny_adapter(style, tmp_path_factory.mktemp(f"half-{style}"), dtype=dtype)


def test_half_precision_passes_the_check_at_load_and_its_tolerance_still_sees_one_edge(half):
    """In half precision the tolerance is a multiple of the measured rounding noise: the model
    passes the check at load (full = clean, empty = corrupted, one edge = a plain hook), and the
    tolerance is smaller than what patching one wrong edge does, so a miswired edge still fails."""
    from circuitfinder.engine.checks import check_model, sample_edges
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.patching import patched_logits, run_recording_senders

    assert half.working_dtype == half.dtype and 0 < half.rounding_noise < 0.5
    assert check_model(half) <= 1.0
    graph = EdgeGraph(half.shape)
    clean, corrupted = random_pair(batch=2, pos=6, seed=3)
    senders, corrupted_logits = run_recording_senders(half, graph, corrupted)
    _, clean_logits = run_recording_senders(half, graph, clean)
    tol = tolerance_for(half, clean_logits)
    empty = patched_logits(half, graph, clean, senders, graph.allowed.double())
    assert (empty - corrupted_logits).abs().max().item() <= tol
    effects = []
    for edge in sample_edges(graph):
        removed = torch.zeros(graph.n_senders, graph.n_receivers)
        removed[graph.edge_index(edge)] = 1
        effects.append((patched_logits(half, graph, clean, senders, removed) - clean_logits).abs().max().item())
    assert max(effects) > tol  # the tolerance can tell a patched edge from none


def test_half_precision_scores_are_summed_in_float32(half):
    from tiny_models import tiny_task

    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.methods.attribution import eap

    scores = eap(half, EdgeGraph(half.shape), tiny_task(), batch_size=2)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all() and scores.abs().max() > 0


# --------------------------------------------------------------------------------------------
# dtype="auto": bfloat16 where the hardware computes it, the circuit reported in float32
# --------------------------------------------------------------------------------------------

from circuitfinder.engine.precision import native_bfloat16 as real_native_bfloat16  # noqa: E402 (before conftest's patch)


@pytest.mark.parametrize(
    "flags, native",
    [
        ("fpu avx512f avx512bw avx512_bf16 avx512vl", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx2 avx512f avx512bw", False),
        (None, False),
    ],
)
def test_native_bfloat16_reads_the_cpus_flags(tmp_path, monkeypatch, flags, native):
    from pathlib import Path

    from circuitfinder.engine import precision

    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_path = Path
    monkeypatch.setattr(precision, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert real_native_bfloat16(torch.device("cpu")) is native


def test_auto_resolves_to_bfloat16_only_where_native_and_float64_for_compiled_models(monkeypatch):
    from circuitfinder.engine import precision
    from circuitfinder.errors import UserError

    cpu = torch.device("cpu")
    assert precision.resolve_dtype("auto", cpu, "smollm2-135m") is torch.float32  # conftest: not native
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: True)
    assert precision.resolve_dtype("auto", cpu, "smollm2-135m") is torch.bfloat16
    assert precision.resolve_dtype("auto", cpu, "tracr-reverse") is torch.float64
    assert precision.resolve_dtype("float16", cpu) is torch.float16
    with pytest.raises(UserError, match="unknown dtype 'int8': use auto, float32"):
        precision.resolve_dtype("int8", cpu)


def test_auto_in_bfloat16_reports_the_circuit_measured_in_float32(tiny_model_dir, monkeypatch):
    """A run whose ``auto`` lands in bfloat16 finds its circuit in bfloat16 and reports that
    circuit's held-out faithfulness on a float32 copy of the model, loaded once the bfloat16 one
    is gone: both figures equal a plain evaluation of the saved circuit on the model loaded in
    each dtype, outside the run."""
    import gc
    import weakref

    from circuitfinder.config import DiscoverConfig
    from circuitfinder.engine import precision
    from circuitfinder.engine.ablation import make_ablation
    from circuitfinder.engine.adapter import load_unchecked
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.runs import pipeline as run_module
    from circuitfinder.runs.pipeline import build_run_task
    from circuitfinder.runs.run import run_config

    monkeypatch.setattr(precision, "native_bfloat16", lambda device: True)
    loaded = []  # a weak reference to each loaded model's weights, and its dtype

    def load_once(*args, **kwargs):  # never two copies: the bfloat16 weights are gone when float32's load
        gc.collect()
        assert all(weights() is None for weights, _ in loaded), "the half-precision model is still in memory"
        adapter = load_model(*args, **kwargs)
        loaded.append((weakref.ref(next(adapter.bridge.parameters())), adapter.dtype))
        return adapter

    load_model = run_module.load_model
    monkeypatch.setattr(run_module, "load_model", load_once)
    config = DiscoverConfig.from_options(
        task="ioi",
        model=str(tiny_model_dir),
        method="eap",
        edges=30,
        n_pairs=8,
        batch_size=8,
        force=True,
        roles=False,
        curve=False,
    )
    run = run_config(config)
    summary = run.summary
    assert [dtype for _, dtype in loaded] == [torch.bfloat16, torch.float32]
    assert summary.dtype == "float32" and summary.precision["passes"] == "bfloat16" and summary.precision["remeasure"]

    def measured(dtype):
        adapter = load_unchecked(str(tiny_model_dir), dtype=dtype)
        graph, task = EdgeGraph(adapter.shape), build_run_task(config, adapter.tokenizer)
        evaluator = CircuitEvaluator(
            adapter, graph, task, "heldout", 8, make_ablation("counterfactual", adapter, graph, task, 8)
        )
        return evaluator.faithfulness(run.circuit.mask)

    f32, bf16 = measured(torch.float32), measured(torch.bfloat16)
    assert summary.faithfulness == pytest.approx(f32, abs=1e-9)
    assert summary.precision["found_faithfulness"] == pytest.approx(bf16, abs=1e-9)
    assert abs(f32 - bf16) > 1e-6  # the two dtypes differ, so the test can tell which was reported


def test_auto_runs_a_search_in_float32(tiny_model_dir, monkeypatch):
    """Where auto would pick bfloat16, a search runs in float32 all the same (bfloat16 cannot
    settle removals under the default τ: the next test)."""
    from circuitfinder.config import DiscoverConfig
    from circuitfinder.engine import precision
    from circuitfinder.runs.run import run_config

    monkeypatch.setattr(precision, "native_bfloat16", lambda device: True)
    summary = run_config(
        DiscoverConfig.from_options(
            task="ioi",
            model=str(tiny_model_dir),
            method="acdc-groups",
            seed_method="eap",
            edges=30,
            search_prompts=4,
            n_pairs=8,
            batch_size=8,
            force=True,
            roles=False,
        )
    ).summary
    assert summary.dtype == "float32" and summary.precision["passes"] == "float32"
    assert not summary.precision["referee"] and not summary.precision["remeasure"]


@pytest.mark.parametrize(
    "tau, speedup, passes", [(None, 0.0, "float32"), (0.5, 0.0, "bfloat16"), (0.5, math.inf, "float32")]
)
def test_a_refereed_half_precision_search_finds_the_float32_circuit(tiny_model_dir, tau, speedup, passes, monkeypatch):
    """With the float32 referee (the default), a bfloat16 search ends at the circuit of the same
    search run in float32, edge for edge, with the same held-out faithfulness, whichever way its
    passes run. At the default τ (1 % of the empty circuit's distance) bfloat16's error on this
    tiny model is larger than τ, so the passes run in float32; at τ = 0.5 they run in bfloat16 and
    the referee re-decides the removals near the threshold, some against bfloat16's verdict,
    unless bfloat16 is not the speed-up a referee needs (``REFEREE_SPEEDUP``, patched here either
    way, since this CPU's own ratio decides it otherwise). Without the referee, bfloat16 ends at
    another circuit."""
    from circuitfinder.config import DiscoverConfig
    from circuitfinder.methods import acdc
    from circuitfinder.runs.run import run_config

    monkeypatch.setattr(acdc, "REFEREE_SPEEDUP", speedup)
    base = dict(
        task="ioi",
        model=str(tiny_model_dir),
        method="acdc-groups",
        seed_method="eap",
        edges=80,
        search_prompts=8,
        n_pairs=16,
        batch_size=8,
        force=True,
        roles=False,
        tau=tau,
    )
    f32 = run_config(DiscoverConfig.from_options(**base, dtype="float32"))
    refereed = run_config(DiscoverConfig.from_options(**base, dtype="bfloat16"))
    alone = run_config(DiscoverConfig.from_options(**base, dtype="bfloat16", referee=False))
    plan = refereed.summary.precision
    referee = plan["referee_decisions"]
    assert torch.equal(refereed.circuit.mask, f32.circuit.mask)
    assert refereed.summary.faithfulness == f32.summary.faithfulness
    assert refereed.summary.dtype == "float32"
    assert plan["passes"] == "bfloat16" and plan["referee"] and plan["model"] == "float32"
    assert referee["passes_dtype"] == passes
    decisions = refereed.tables["decisions"]
    assert decisions.metric_removed_float32.notna().sum() == referee["decided"]
    if passes == "float32":
        assert referee["decided"] == 0
        assert ("cannot settle removals" if tau is None else "a referee needs") in referee["why_float32"]
    else:
        assert referee["overruled"] >= 1
    assert not torch.equal(alone.circuit.mask, f32.circuit.mask)


def test_a_search_with_no_room_for_the_referee_runs_in_half_precision_and_says_so(tiny_model_dir, monkeypatch):
    """When the float32 model and the bfloat16 copy do not fit the free memory, the run says so in
    one line (with a batch that would leave room) and searches in bfloat16 alone."""
    from circuitfinder.config import DiscoverConfig
    from circuitfinder.engine import plan
    from circuitfinder.methods.registry import Reporter
    from circuitfinder.runs.run import run_config

    need = plan.refereed_total(plan.plan_shape(str(tiny_model_dir)), torch.bfloat16, 8, 32)
    monkeypatch.setattr(plan, "free_memory", lambda device="cpu": need - 1)

    class Lines(Reporter):
        lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    config = DiscoverConfig.from_options(
        task="ioi",
        model=str(tiny_model_dir),
        method="acdc-groups",
        seed_method="eap",
        edges=30,
        search_prompts=4,
        n_pairs=8,
        batch_size=8,
        force=True,
        roles=False,
        dtype="bfloat16",
    )
    summary = run_config(config, reporter=Lines()).summary
    said = [line for line in Lines.lines if "no float32 referee" in line]
    assert len(said) == 1 and "the search runs in bfloat16 alone (`batch_size=7` leaves room" in said[0]
    assert (
        summary.dtype == "bfloat16" and summary.precision["passes"] == "bfloat16" and not summary.precision["referee"]
    )


def test_the_summary_line_says_how_a_refereed_search_ran():
    from circuitfinder.cli import _refereed

    why = "bfloat16 cannot settle removals under τ = 0.0465 (4 × 0.027 ≥ τ)"
    assert _refereed({}) == "" and _refereed({"passes": "bfloat16", "referee_decisions": None}) == ""
    assert (
        _refereed(
            {
                "passes": "bfloat16",
                "referee": True,
                "referee_decisions": {"passes_dtype": "float32", "why_float32": why},
            }
        )
        == f"; searched in float32: {why}"
    )
    assert _refereed(
        {
            "passes": "bfloat16",
            "referee": True,
            "referee_decisions": {"passes_dtype": "bfloat16", "decided": 1287, "overruled": 134},
        }
    ) == ("; searched in bfloat16, 1,287 removals decided again in float32, 134 of them overruled")
