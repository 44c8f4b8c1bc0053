"""The memory plan against the real peak: EAP-IG on one batch of IOI prompts, on each bundled model.

    .venv/bin/python scripts/measure_memory.py [--batches 8 16 32] [--models smollm2-135m gemma3-270m]

Each (model, batch) runs in a fresh process: load the model, build the task, read the resident
memory, then run EAP-IG (5 steps) over one batch while a thread samples ``/proc/self/statm``
every 2 ms. The measured working memory is the peak above the memory just before; the plan's
(``circuitfinder.engine.plan.memory_plan``, everything but the weights) is set beside it, and
the loaded model (weights, the bridge's copies and the libraries) beside the plan's weights and
unembedding copy. Writes ``outputs/benchmarks/memory-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def one(model_name: str, batch: int) -> dict:
    """Measure one (model, batch) in this process."""
    import torch

    import circuitfinder as cf
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.plan import memory_plan, shape_from_config
    from circuitfinder.engine.models import cache_root
    from circuitfinder.methods.attribution import eap_ig

    before_load = rss()
    model = cf.load_model(model_name)
    loaded = rss()
    task = cf.build_task("ioi", model, n_pairs=2 * batch)
    graph = EdgeGraph(model.shape)
    positions = int(task.lengths[list(task.indices("discovery"))[:batch]].max())
    shape = shape_from_config(model_name, json.loads((cache_root() / model_name / "config.json").read_text()))
    plan = memory_plan(shape, model.dtype, batch, positions)
    peak, stop = [rss()], threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(rss())
            time.sleep(0.002)

    base = rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    eap_ig(model, graph, task, batch_size=batch)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    measured = max(peak) - base  # the process started with next to nothing resident (~10 MB)
    return {"model": model_name, "batch": batch, "positions": positions, "dtype": str(model.dtype).removeprefix("torch."),
            "seconds": round(seconds, 2), "threads": torch.get_num_threads(),
            "weights_loaded_bytes": loaded - before_load, "weights_planned_bytes": plan.loaded,
            "working_measured_bytes": measured, "working_planned_bytes": plan.working,
            "planned_over_measured": round(plan.working / measured, 3),
            "process_peak_bytes": max(peak), "planned_total_bytes": plan.total,
            "total_planned_over_measured": round(plan.total / max(peak), 3), "terms": plan.terms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    rows = []
    for model in args.models:
        for batch in args.batches:
            out = subprocess.run([sys.executable, __file__, "--one", model, str(batch)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{model} batch {batch} ({row['positions']} positions): working memory measured "
                  f"{row['working_measured_bytes'] / 1e6:,.0f} MB, planned {row['working_planned_bytes'] / 1e6:,.0f} MB "
                  f"(ratio {row['planned_over_measured']}); weights loaded {row['weights_loaded_bytes'] / 1e6:,.0f} MB, "
                  f"planned {row['weights_planned_bytes'] / 1e6:,.0f} MB; process peak {row['process_peak_bytes'] / 1e6:,.0f} MB, "
                  f"planned total {row['planned_total_bytes'] / 1e6:,.0f} MB (ratio {row['total_planned_over_measured']})", flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = ROOT / "outputs" / "benchmarks" / f"memory-{stamp}.json"
    path.write_text(json.dumps({"when": stamp, "what": "EAP-IG (5 steps), one IOI batch, fresh process per row; "
                                "working memory = peak resident memory above the memory before attribution",
                                "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
