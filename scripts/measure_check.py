"""The check at load's time on the bundled models, and what its random sparse circuit adds.

    .venv/bin/python scripts/measure_check.py [--models smollm2-135m gemma3-270m] [--repeats 3]

Each model is loaded once without the check (float32, CPU); then ``check_model`` runs ``repeats``
times, and so does its fifth step alone (one random sparse circuit patched by the engine and by
``direct_patched_logits``), in the same process, one after the other. Writes
``outputs/benchmarks/check-<time>.json`` with every time, the minimum and the ratio of the step to
the whole check.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from circuitfinder.engine.adapter import load_unchecked
    from circuitfinder.engine.checks import check_model, direct_patched_logits, random_circuit
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.patching import patched_logits, run_recording_senders

    results = []
    for name in args.models:
        adapter = load_unchecked(name, dtype=torch.float32)
        graph = EdgeGraph(adapter.shape)
        whole, step = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            worst = check_model(adapter)
            whole.append(time.perf_counter() - start)
        g = torch.Generator().manual_seed(0)
        vocab = int(adapter.bridge.cfg.d_vocab)
        clean, corrupted = (torch.randint(0, vocab, (1, adapter.probe_positions), generator=g) for _ in range(2))
        corr, _ = run_recording_senders(adapter, graph, corrupted)
        removed = random_circuit(graph, kept=0.1)
        for _ in range(args.repeats):
            start = time.perf_counter()
            patched_logits(adapter, graph, clean, corr, removed)
            direct_patched_logits(adapter, graph, clean, corr, removed)
            step.append(time.perf_counter() - start)
        results.append(
            {
                "model": name,
                "edges": graph.n_edges,
                "check_seconds": whole,
                "check_min": min(whole),
                "sparse_step_seconds": step,
                "sparse_step_min": min(step),
                "sparse_step_share": min(step) / min(whole),
                "worst_over_tolerance": worst,
            }
        )
        print(
            f"{name}: check at load {min(whole):.2f} s (min of {args.repeats}), of which the random sparse circuit "
            f"{min(step):.2f} s ({min(step) / min(whole):.0%})"
        )
        del adapter
    out = ROOT / "outputs" / "benchmarks" / f"check-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "python": sys.version.split()[0],
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
