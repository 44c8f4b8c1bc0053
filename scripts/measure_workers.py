"""Attribution on 1 and 2 Ray workers against one process, on a bundled model.

    .venv/bin/python scripts/measure_workers.py [--model smollm2-135m] [--pairs 32] [--steps 5]

EAP-IG over the task's discovery prompts (batches of 8) in this process, then split by batches
over 1 and 2 Ray actors (``circuitfinder.methods.pool.ray_scores``); the largest difference of
the scores relative to the largest score, and the wall time of each (a Ray run includes starting
Ray and loading every replica). Writes ``outputs/benchmarks/workers-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import circuitfinder as cf
    from circuitfinder.engine.checks import load_model
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.methods.attribution import eap_ig
    from circuitfinder.methods.pool import ray_scores

    model = cf.load_model(args.model)
    task = cf.build_task("ioi", model, n_pairs=args.pairs)
    start = time.perf_counter()
    want = eap_ig(model, EdgeGraph(model.shape), task, batch_size=8, steps=args.steps)
    rows = [{"workers": 0, "seconds": round(time.perf_counter() - start, 1), "max_relative_difference": 0.0}]
    scale = float(want.abs().max())
    for workers in (1, 2):
        start = time.perf_counter()
        got = ray_scores(partial(load_model, args.model, check=False), eap_ig, task, 8, workers, steps=args.steps)
        diff = float((got - want).abs().max()) / scale
        rows.append(
            {"workers": workers, "seconds": round(time.perf_counter() - start, 1), "max_relative_difference": diff}
        )
        print(
            f"{workers} worker(s): max |difference| / max |score| = {diff:.2e}, {rows[-1]['seconds']} s "
            f"(one process: {rows[0]['seconds']} s)",
            flush=True,
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = ROOT / "outputs" / "benchmarks" / f"workers-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "when": stamp,
                "model": args.model,
                "pairs": args.pairs,
                "steps": args.steps,
                "what": "EAP-IG, IOI discovery prompts, batches of 8; Ray times include start-up and loading",
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
