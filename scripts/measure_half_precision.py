"""bfloat16 against float32 on SmolLM2 IOI (issue 18, item 2): EAP-IG's scores and the same circuit.

Each dtype runs ``circuits discover --task ioi --method eap-ig --edges N --no-curve --no-roles``
in a process of its own (so each peak memory is its own), alternating, twice. Then, in float32:
the two score tables compared over every edge (Pearson, Spearman, the overlap of the top 1,000 by
|score|), and each run's circuit evaluated exactly on the held-out prompts in both dtypes (the
float32 circuit's faithfulness under bfloat16 patching is the difference the dtype makes to one
circuit). Writes ``outputs/benchmarks/half-precision-TIME.json`` and prints a summary.

    .venv/bin/python scripts/measure_half_precision.py [--edges 1985] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
DTYPES = ("float32", "bfloat16")


def run(dtype: str, edges: int, out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "circuits"),
            "discover",
            "--task",
            "ioi",
            "--method",
            "eap-ig",
            "--edges",
            str(edges),
            "--no-curve",
            "--no-roles",
            "--dtype",
            dtype,
            "--out",
            str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    summary = json.loads((out / "summary.json").read_text())
    return {
        "dtype": dtype,
        "wall_s": round(time.perf_counter() - start, 1),
        "run_s": summary["seconds"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "faithfulness_heldout": summary["faithfulness"],
        "edges_kept": summary["edges_kept"],
        "out": out,
    }


def main() -> None:
    import pandas as pd
    import torch

    from circuitfinder.config import DiscoverConfig
    from circuitfinder.engine.adapter import load_unchecked
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.graphs.circuit import load_circuit
    from circuitfinder.graphs.tables import read_scores
    from circuitfinder.runs.pipeline import build_run_task

    parser = argparse.ArgumentParser()
    parser.add_argument("--edges", type=int, default=1985)  # the default run's EAP-IG size search picks 1,985
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        runs = [run(dtype, args.edges, Path(scratch) / f"{dtype}-{i}") for i in range(args.repeats) for dtype in DTYPES]
        last = {r["dtype"]: r for r in runs}
        adapters = {dtype: load_unchecked("smollm2-135m", dtype=getattr(torch, dtype)) for dtype in DTYPES}
        graph = EdgeGraph(adapters["float32"].shape)
        scores = {d: read_scores(last[d]["out"] / "scores.parquet", graph)[graph.allowed].double() for d in DTYPES}
        masks = {d: load_circuit(last[d]["out"]).mask for d in DTYPES}
        task = build_run_task(DiscoverConfig(), adapters["float32"].tokenizer)
        faithfulness = {}
        for model_dtype, adapter in adapters.items():
            evaluator = CircuitEvaluator(adapter, graph, task, "heldout")
            for circuit_dtype, mask in masks.items():
                faithfulness[f"{circuit_dtype} circuit, {model_dtype} patching"] = evaluator.faithfulness(mask)
        a, b = scores["float32"], scores["bfloat16"]
        top = 1000
        top_a, top_b = set(a.abs().topk(top).indices.tolist()), set(b.abs().topk(top).indices.tolist())
        result = {
            "what": __doc__.split("\n\n")[0],
            "date": time.strftime("%Y-%m-%d"),
            "model": "smollm2-135m",
            "task": "ioi",
            "edges": args.edges,
            "runs": [{k: v for k, v in r.items() if k != "out"} for r in runs],
            "scores": {
                "pearson": float(pd.Series(a.numpy()).corr(pd.Series(b.numpy()))),
                "spearman": float(pd.Series(a.numpy()).rank().corr(pd.Series(b.numpy()).rank())),  # Pearson of ranks
                f"top_{top}_overlap": len(top_a & top_b) / top,
            },
            "circuits_shared_edges": int((masks["float32"] & masks["bfloat16"]).sum()),
            "faithfulness_heldout": faithfulness,
        }
    out = ROOT / "outputs" / "benchmarks" / f"half-precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
