"""The memory plan against the real peak: EAP-IG on one batch of IOI prompts, on each bundled model.

    .venv/bin/python scripts/measure_memory.py [--batches 8 16 32] [--models smollm2-135m gemma3-270m]
                                               [--dtypes float32 bfloat16]

Each (model, dtype, batch) runs in a fresh process: import the libraries, load the model, build the
task, read the resident memory, then run EAP-IG (5 steps) over one batch while a thread samples
``/proc/self/statm`` every 2 ms. Each term group of the plan (``circuitfinder.engine.plan.memory_plan``)
is set beside what it predicts: the libraries beside the memory after the imports, the loaded
model (weights and tokenizer) beside what the load added, the working memory beside the peak
above the memory before attribution, and the plan's total beside the process's peak over the
load and attribution both. The load's own peak above what stays says whether the weights ever sat
in memory twice (a float32 file mapped while it is cast to bfloat16, say). Writes
``outputs/benchmarks/memory-<time>.json``.
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


class Sampler:
    """The largest resident memory seen while the ``with`` block runs, sampled every 2 ms."""

    def __enter__(self) -> "Sampler":
        self.peak, self._stop = [rss()], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak.append(rss())
            time.sleep(0.002)

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak.append(rss())

    @property
    def max(self) -> int:
        return max(self.peak)


def one(model_name: str, batch: int, dtype_name: str = "float32") -> dict:
    """Measure one (model, dtype, batch) in this process."""
    import torch
    import transformer_lens.model_bridge  # noqa: F401  (the plan's libraries: imported before the load)
    import transformers  # noqa: F401

    import circuitfinder as cf
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.models import cache_root
    from circuitfinder.engine.plan import memory_plan, shape_from_config
    from circuitfinder.engine.precision import parse_dtype
    from circuitfinder.methods.attribution import eap_ig

    before_load = rss()
    with Sampler() as loading:
        model = cf.load_model(model_name, dtype=parse_dtype(dtype_name))
    loaded = rss()
    task = cf.build_task("ioi", model, n_pairs=2 * batch)
    graph = EdgeGraph(model.shape)
    positions = int(task.lengths[list(task.indices("discovery"))[:batch]].max())
    shape = shape_from_config(model_name, json.loads((cache_root() / model_name / "config.json").read_text()))
    plan = memory_plan(shape, model.dtype, batch, positions)
    base = rss()
    start = time.perf_counter()
    with Sampler() as running:
        eap_ig(model, graph, task, batch_size=batch)
    seconds = time.perf_counter() - start
    measured = running.max - base  # the process started with next to nothing resident (~10 MB)
    peak = max(loading.max, running.max)
    return {
        "model": model_name,
        "batch": batch,
        "positions": positions,
        "dtype": str(model.dtype).removeprefix("torch."),
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "libraries_measured_bytes": before_load,
        "libraries_planned_bytes": plan.terms["libraries"],
        "weights_loaded_bytes": loaded - before_load,
        "weights_planned_bytes": plan.loaded,
        "load_peak_bytes": loading.max - before_load,
        "load_peak_over_loaded": round((loading.max - before_load) / (loaded - before_load), 3),
        "working_measured_bytes": measured,
        "working_planned_bytes": plan.working,
        "planned_over_measured": round(plan.working / measured, 3),
        "attribution_peak_bytes": running.max,
        "process_peak_bytes": peak,
        "planned_total_bytes": plan.total,
        "total_planned_over_measured": round(plan.total / peak, 3),
        "terms": plan.terms,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BATCH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2])))
        return 0
    rows = []
    for model, dtype, batch in [(m, d, b) for m in args.models for d in args.dtypes for b in args.batches]:
        out = subprocess.run(
            [sys.executable, __file__, "--one", model, str(batch), dtype], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{model} {dtype} batch {batch} ({row['positions']} positions): "
            f"libraries {row['libraries_measured_bytes'] / 1e6:,.0f} MB, "
            f"planned {row['libraries_planned_bytes'] / 1e6:,.0f} MB; working memory measured "
            f"{row['working_measured_bytes'] / 1e6:,.0f} MB, planned {row['working_planned_bytes'] / 1e6:,.0f} MB "
            f"(ratio {row['planned_over_measured']}); weights loaded {row['weights_loaded_bytes'] / 1e6:,.0f} MB, "
            f"planned {row['weights_planned_bytes'] / 1e6:,.0f} MB, "
            f"peak while loading {row['load_peak_bytes'] / 1e6:,.0f} MB; "
            f"process peak {row['process_peak_bytes'] / 1e6:,.0f} MB, "
            f"planned total {row['planned_total_bytes'] / 1e6:,.0f} MB (ratio {row['total_planned_over_measured']})",
            flush=True,
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = ROOT / "outputs" / "benchmarks" / f"memory-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "when": stamp,
                "what": "EAP-IG (5 steps), one IOI batch, fresh process per row; "
                "working memory = peak resident memory above the memory before attribution; "
                "process peak = the largest resident memory over the load and attribution",
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
