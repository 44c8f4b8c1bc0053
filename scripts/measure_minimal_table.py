"""The README's table of minimal circuits: each search run beside attribution's top-N circuits.

For every run folder given (a patching search seeded by attribution, e.g. the default
``acdc-groups``), on the run's own held-out prompts:

* the search's circuit: edges, nodes, held-out faithfulness and the run's minutes (from its files);
* attribution's top-N of the same size (pruned as the run prunes), its held-out faithfulness;
* attribution's smallest top-N reaching the circuit's held-out faithfulness, found by the run's
  size search (doubling from 8, then bisecting) on the held-out prompts.

Writes ``outputs/benchmarks/minimal-table-TIME.json`` and prints the Markdown table.

    .venv/bin/python scripts/measure_minimal_table.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


def measure(run_dir: Path, adapters: dict) -> dict:
    from circuitfinder.engine.adapter import load_unchecked
    from circuitfinder.engine.faithfulness import CircuitEvaluator, search_size
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.masks import top_edges
    from circuitfinder.graphs.tables import read_scores
    from circuitfinder.runs.pipeline import build_run_task
    from circuitfinder.runs.run import load_run_config

    config = load_run_config(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    if config.model not in adapters:
        adapters[config.model] = load_unchecked(config.model)
    adapter = adapters[config.model]
    graph = EdgeGraph(adapter.shape)
    task = build_run_task(config, adapter.tokenizer)
    heldout = CircuitEvaluator(adapter, graph, task, "heldout", config.execution.batch_size)
    scores = read_scores(run_dir / "scores.parquet", graph)
    edges, reached = summary["edges_kept"], summary["faithfulness"]
    same_size = heldout.prune(top_edges(graph, scores, edges))
    found = search_size(heldout, scores, reached)
    smallest = heldout.prune(top_edges(graph, scores, found.n_edges))
    return {
        "run": str(run_dir),
        "task": config.task,
        "model": config.model,
        "method": config.method,
        "edges": edges,
        "nodes": summary["nodes_kept"],
        "faithfulness_heldout": reached,
        "meets_target": summary["meets_target"],
        "minutes": round(summary["seconds"] / 60, 1),
        "top_n_same_size": {
            "top_n": edges,
            "edges_kept": int(same_size.sum()),
            "faithfulness_heldout": heldout.faithfulness(same_size),
        },
        "top_n_same_faithfulness": {
            "top_n": found.n_edges,
            "edges_kept": int(smallest.sum()),
            "reached": found.reached,
            "faithfulness_heldout": heldout.faithfulness(smallest),
        },
    }


def row(r: dict) -> str:
    same, small = r["top_n_same_size"], r["top_n_same_faithfulness"]
    flag = "" if r["meets_target"] else " (below the target)"
    reach = (
        f"{small['edges_kept']:,} edges ({small['faithfulness_heldout']:.3f})"
        if small["reached"]
        else "none reaches it"
    )
    return (
        f"| {r['task']} | {r['model']} | {r['edges']:,} | {r['nodes']} | {r['faithfulness_heldout']:.3f}{flag} | "
        f"{r['minutes']:.0f} | {same['faithfulness_heldout']:.3f} | {reach} |"
    )


def main() -> None:
    import torch
    from benchmark import write_result

    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    adapters: dict = {}
    results = [measure(run, adapters) for run in args.runs]
    write_result({"runs": results}, "minimal-table")
    print(
        "| task | model | edges | nodes | held-out faithfulness | minutes | attribution's top-N of the same size | "
        "attribution's smallest top-N at the same faithfulness |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
