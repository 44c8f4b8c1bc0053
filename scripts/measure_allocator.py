"""glibc's default allocator against :func:`circuitfinder.engine.models.keep_freed_memory` on a CPU.

    .venv/bin/python scripts/measure_allocator.py [--rounds 3] [--passes 5] [--model smollm2-135m]

Each round runs both settings, one after the other, each in a fresh process: load the model in
float32 on the CPU, build the IOI task, and time ``--passes`` exact evaluations of one sparse
circuit on the 32 search prompts (full passes: nothing reused), after one warm-up. Reports the
seconds per evaluation, the minor page faults, the peak resident memory, and the metric (the same
in both: the allocator changes where tensors live, not what they hold). Writes
``outputs/benchmarks/allocator-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(model: str, heap: bool, passes: int) -> dict:
    import torch

    import circuitfinder.engine.adapter as adapter_module
    from circuitfinder.engine.checks import load_model
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.tasks import build_task

    if not heap:
        adapter_module.keep_freed_memory = lambda: False
    adapter = load_model(model, check=False, dtype="float32", device="cpu")
    graph = EdgeGraph(adapter.shape)
    task = build_task("ioi", adapter)
    evaluator = CircuitEvaluator(adapter, graph, task, "discovery", 16, limit=32, distance="task", reuse=0)
    circuit = (torch.rand(graph.allowed.shape, generator=torch.Generator().manual_seed(0)) < 0.002) & graph.allowed
    evaluator.evaluate(circuit[None])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    for _ in range(passes):
        metric = float(evaluator.evaluate(circuit[None]).metric[0])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds_per_evaluation": (time.perf_counter() - started) / passes,
        "minor_faults_per_evaluation": (usage.ru_minflt - faults) / passes,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "metric": metric,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--child", choices=["default", "heap"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child == "heap", args.passes)))
        return
    runs = {"default": [], "heap": []}
    for r in range(args.rounds):
        for mode in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--model", args.model, "--passes", str(args.passes)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {mode}: {runs[mode][-1]}", flush=True)
    median = {m: statistics.median(x["seconds_per_evaluation"] for x in v) for m, v in runs.items()}
    result = {
        "model": args.model,
        "dtype": "float32",
        "prompts": 32,
        "passes": args.passes,
        "rounds": runs,
        "median_seconds": median,
        "heap_over_default": median["heap"] / median["default"],
        "same_metric": len({x["metric"] for v in runs.values() for x in v}) == 1,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count()},
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = ROOT / "outputs" / "benchmarks" / f"allocator-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"heap / default: {result['heap_over_default']:.3f} (median s/evaluation {median}); same metric: "
        f"{result['same_metric']} -> {path}"
    )


if __name__ == "__main__":
    main()
