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
* ``pool``: ACDC candidate evaluations (circuits scored on 32 IOI prompts, one edge removed
  from a top-2,000 circuit each) per second in this process and on Ray with 1 and 2 workers,
  and Ray's start-up cost (``ray.init`` plus every actor loading its replica);
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

from discovery.adapter import load_model  # noqa: E402
from discovery.attribution import attribute_batch, ig_alphas, input_hook  # noqa: E402
from discovery.circuit import prune, top_edges  # noqa: E402
from discovery.graph import EdgeGraph  # noqa: E402
from discovery.patching import patched_logits, run_recording_senders  # noqa: E402
from tasks import build_task  # noqa: E402


def write_result(result: dict, prefix: str) -> Path:
    """Save ``result`` as ``outputs/benchmarks/{prefix}-TIME.json`` and print it."""
    out = ROOT / "outputs" / "benchmarks" / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return out


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (the least noisy estimate)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def pool_rates(adapter, graph, task, model: str, rows: int = 16) -> dict:
    """Candidate evaluations per second in process and on Ray with 1 and 2 workers, and Ray's start-up."""
    from functools import partial

    import ray

    from discovery.pool import InProcessPool, RayPool, ScorerSpec

    batches = tuple(task.batches("discovery", 16, limit=32))
    spec = ScorerSpec(partial(load_model, model), batches, task.metric, "kl", 32)
    g = torch.Generator().manual_seed(0)
    base = prune(graph, top_edges(graph, torch.rand(graph.allowed.shape, generator=g), 2000))
    edges = torch.nonzero(base)[torch.randperm(int(base.sum()), generator=g)[:rows]]
    circuits = base.unsqueeze(0).repeat(rows, 1, 1)
    circuits[torch.arange(rows), edges[:, 0], edges[:, 1]] = False
    chunk = 2
    out = {"prompts": 32, "circuits": rows, "edges_per_circuit": int(base.sum()) - 1}
    pool = InProcessPool(spec.build(adapter), chunk)
    out["in_process_per_second"] = round(rows / best_of(lambda: pool(circuits), 1), 3)
    for workers in (1, 2):
        start = time.perf_counter()
        ray_pool = RayPool(spec, workers, chunk)
        out[f"ray_{workers}_startup_seconds"] = round(time.perf_counter() - start, 1)
        out[f"ray_{workers}_per_second"] = round(rows / best_of(lambda: ray_pool(circuits), 1), 3)
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
    parser.add_argument("--skip-pool", action="store_true", help="skip the ACDC scorer pool timings (in-process and Ray)")
    args = parser.parse_args()

    adapter = load_model(args.model)
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
        t_patched = best_of(lambda: patched_logits(adapter, graph, batch.clean, corrupted_senders, removed), args.repeats)

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
            subprocess.run([str(ROOT / ".venv" / "bin" / "circuits"), "discover", "--task", "ioi", "--model", args.model,
                            "--out", str(Path(scratch) / "run")], check=True, capture_output=True)
            result["discover_ioi_seconds"] = round(time.perf_counter() - start, 1)
            result["discover_ioi_summary"] = json.loads((Path(scratch) / "run" / "summary.json").read_text())
        result["discover_ioi_peak_rss_mb"] = round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1)

    write_result(result, "benchmark")


if __name__ == "__main__":
    main()
