"""Benchmark: EAP and patching cost as ratios of plain passes measured in the same run.

    .venv/bin/python scripts/benchmark.py [--model smollm2-135m] [--batch-size 16] [--repeats 3] [--skip-run]

Measures, on one IOI batch:
* ``eap_over_plain``: time of EAP on the batch over the time of the same passes run plainly
  (a corrupted forward, a clean forward and a backward from the metric), so the ratio is the
  cost of recording senders and scoring edges;
* ``eap_ig_over_plain``: the same for EAP-IG with m steps (two forwards, then m forward and
  backward pairs);
* ``patched_over_plain``: an exact patched forward (for a circuit of the size the default run
  picks, about 10 % of edges) over a plain forward, not counting the shared corrupted pass;
* ``pool``: ACDC candidate evaluations per second (circuits scored on 32 IOI prompts; three
  chains of up to 8, each removing one edge into the same receiver, late, middle and early): stacked
  (a chain shares the layers before its receiver) against one circuit per pass, in this
  process and on Ray with 1 and 2 workers (chunks of 4), and Ray's start-up cost (``ray.init``
  plus every actor loading its replica);
* peak resident memory of this process;
* wall time and peak memory of the default ``circuits discover --task ioi`` (in a subprocess).

Writes ``outputs/benchmarks/benchmark-<time>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuitfinder.engine.adapter import load_unchecked  # noqa: E402
from circuitfinder.engine.graph import EdgeGraph  # noqa: E402
from circuitfinder.engine.masks import prune, top_edges  # noqa: E402
from circuitfinder.engine.patching import patched_logits, run_recording_senders  # noqa: E402
from circuitfinder.methods.attribution import attribute_batch, ig_alphas, input_hook  # noqa: E402
from circuitfinder.tasks import build_task  # noqa: E402


def write_result(result: dict, prefix: str) -> Path:
    """Save ``result`` as ``outputs/benchmarks/{prefix}-TIME.json`` and print it."""
    out = ROOT / "outputs" / "benchmarks" / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return out


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (the least noisy estimate); with
    ``repeats`` 0, the one call's time."""
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def acdc_chains(graph, base, layers=(27, 15, 3), per_chain: int = 8) -> torch.Tensor:
    """Stacks like ACDC's chains: ``base`` minus one edge (up to ``per_chain`` of them) into the
    receiver with most edges of each of ``layers``."""
    circuits = []
    for layer in layers:
        points = [p for p in graph.receiver_points if p.layer == min(layer, graph.shape.n_layers - 1)]
        receivers = torch.tensor([r for p in points for r in range(p.start, p.stop)])
        r = int(receivers[base[:, receivers].sum(0).argmax()])  # the layer's receiver with most edges
        for s in torch.nonzero(base[:, r]).flatten()[:per_chain].tolist():
            circuit = base.clone()
            circuit[s, r] = False
            circuits.append(circuit)
    return torch.stack(circuits)


def pool_rates(adapter, graph, task, model: str) -> dict:
    """ACDC candidate evaluations per second: stacked (circuits of a chain sharing the layers
    before their receiver) against one circuit per pass in this process, and on Ray with 1 and 2
    workers; and Ray's start-up cost."""
    from functools import partial

    import ray

    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.methods.pool import EvaluatorSpec, InProcessPool, RayPool
    from circuitfinder.methods.search import MAX_ROWS

    prompts = 32
    g = torch.Generator().manual_seed(0)
    base = prune(graph, top_edges(graph, torch.rand(graph.allowed.shape, generator=g), 3000))
    circuits = acdc_chains(graph, base)
    n = len(circuits)
    out = {
        "prompts": prompts,
        "circuits": n,
        "edges_per_circuit": int(base.sum()) - 1,
        "chains": "up to 8 circuits each, one edge removed from the same receiver in layers 27, 15, 3",
    }
    one = CircuitEvaluator(adapter, graph, task, "discovery", prompts, limit=prompts, distance="kl", max_rows=prompts)
    stacked = CircuitEvaluator(
        adapter, graph, task, "discovery", prompts, limit=prompts, distance="kl", max_rows=MAX_ROWS
    )
    t_one = best_of(lambda: one.evaluate(circuits), 0)
    t_stacked = best_of(lambda: stacked.evaluate(circuits), 0)
    out |= {
        "one_per_pass_per_second": round(n / t_one, 3),
        "stacked_per_second": round(n / t_stacked, 3),
        "stacked_speedup": round(t_one / t_stacked, 2),
    }
    chunk = 4  # half a chain: two workers share each chain
    pool = InProcessPool(stacked, chunk)
    out["in_process_chunk4_per_second"] = round(n / best_of(lambda: pool(circuits), 0), 3)
    spec = EvaluatorSpec(partial(load_unchecked, model), task, prompts, prompts, "kl", MAX_ROWS)
    for workers in (1, 2):
        start = time.perf_counter()
        ray_pool = RayPool(spec, workers, chunk)
        out[f"ray_{workers}_startup_seconds"] = round(time.perf_counter() - start, 1)
        out[f"ray_{workers}_per_second"] = round(n / best_of(lambda: ray_pool(circuits), 0), 3)
        ray_pool.close()
        if ray.is_initialized():
            ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--skip-run", action="store_true", help="skip timing the default discover command")
    parser.add_argument(
        "--skip-pool", action="store_true", help="skip the ACDC scorer pool timings (in-process and Ray)"
    )
    args = parser.parse_args()

    adapter = load_unchecked(args.model)
    graph = EdgeGraph(adapter.shape)
    task = build_task("ioi", adapter.tokenizer, n_pairs=64)
    batch = next(task.batches("discovery", args.batch_size))

    def forward():
        with torch.no_grad():
            adapter.logits(batch.clean)

    # The bridge's weights are frozen, so a plain backward needs a grad-requiring input.
    def forward_backward():
        with torch.enable_grad(), adapter.hooks([input_hook(adapter, None)]):
            x = adapter.logits(batch.clean)
            rows = torch.arange(batch.size)
            task.metric(x[rows, batch.last], batch).sum().backward()

    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    t_forward = best_of(forward, args.repeats)
    t_fb = best_of(forward_backward, args.repeats)
    t_eap = best_of(lambda: attribute_batch(adapter, graph, task, batch, scores, 1.0), args.repeats)
    alphas = ig_alphas(args.ig_steps)
    t_ig = best_of(lambda: attribute_batch(adapter, graph, task, batch, scores, 1.0, alphas), args.repeats)
    plain_eap = t_forward + t_fb  # corrupted forward + clean forward and backward
    plain_ig = 2 * t_forward + args.ig_steps * t_fb  # corrupted and clean forwards + m forward/backward pairs

    corrupted_senders, _ = run_recording_senders(adapter, graph, batch.corrupted)
    circuit = prune(graph, top_edges(graph, scores, graph.n_edges // 10))
    removed = (~circuit).float()
    with torch.no_grad():
        t_patched = best_of(
            lambda: patched_logits(adapter, graph, batch.clean, corrupted_senders, removed), args.repeats
        )

    result = {
        "model": args.model,
        "edges": graph.n_edges,
        "batch": list(batch.clean.shape),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "plain_forward_seconds": round(t_forward, 3),
        "plain_forward_backward_seconds": round(t_fb, 3),
        "eap_seconds": round(t_eap, 3),
        "eap_over_plain": round(t_eap / plain_eap, 2),
        "ig_steps": args.ig_steps,
        "eap_ig_seconds": round(t_ig, 3),
        "eap_ig_over_plain": round(t_ig / plain_ig, 2),
        "patched_forward_seconds": round(t_patched, 3),
        "patched_edges_kept": int(circuit.sum()),
        "patched_over_plain": round(t_patched / t_forward, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if not args.skip_pool:
        result["pool"] = pool_rates(adapter, graph, task, args.model)
    if not args.skip_run:
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            subprocess.run(
                [
                    str(ROOT / ".venv" / "bin" / "circuits"),
                    "discover",
                    "--task",
                    "ioi",
                    "--model",
                    args.model,
                    "--out",
                    str(Path(scratch) / "run"),
                ],
                check=True,
                capture_output=True,
            )
            result["discover_ioi_seconds"] = round(time.perf_counter() - start, 1)
            result["discover_ioi_summary"] = json.loads((Path(scratch) / "run" / "summary.json").read_text())
        result["discover_ioi_peak_rss_mb"] = round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1)

    write_result(result, "benchmark")


if __name__ == "__main__":
    main()
