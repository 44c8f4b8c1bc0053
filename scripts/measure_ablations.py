"""Measure ablations and EAP-IG on activations on a bundled model (one-off research script).

    .venv/bin/python scripts/measure_ablations.py [--model smollm2-135m] [--task ioi] [--pairs 32] [--steps 3]

On one task (half the pairs discover, half are held out):
* m(∅) on the held-out prompts under counterfactual, mean and zero ablation (and m(full));
* EAP, EAP-IG on inputs and EAP-IG on activations (counterfactual): Pearson and Spearman
  correlation with exact single-edge effects (the top 40 edges of each method plus 60 random
  edges, shared), and seconds per method;
* the faithfulness curve of EAP-IG-on-activations scores evaluated several circuits per pass and
  one circuit per pass (same values; seconds of each).

Writes ``outputs/benchmarks/ablations-<time>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuitfinder.engine.adapter import load_unchecked  # noqa: E402
from circuitfinder.engine.faithfulness import CircuitEvaluator, faithfulness_curve  # noqa: E402
from circuitfinder.engine.graph import EdgeGraph  # noqa: E402
from circuitfinder.methods.registry import METHODS  # noqa: E402
from circuitfinder.methods.validation import correlations, exact_edge_effects, pick_edges  # noqa: E402
from circuitfinder.tasks import build_task  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from benchmark import write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    adapter = load_unchecked(args.model)
    graph = EdgeGraph(adapter.shape)
    task = build_task(args.task, adapter.tokenizer, n_pairs=args.pairs, seed=0)
    result = {
        "model": args.model,
        "task": args.task,
        "pairs": args.pairs,
        "ig_steps": args.steps,
        "edges": graph.n_edges,
        "threads": torch.get_num_threads(),
    }

    evaluators = {}
    for kind in ("counterfactual", "mean", "zero"):
        start = time.perf_counter()
        evaluators[kind] = CircuitEvaluator(adapter, graph, task, "heldout", args.batch_size, ablation=kind)
        b = evaluators[kind].baseline
        result[f"baseline_{kind}"] = {
            "clean": b.clean,
            "empty": b.corrupted,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(kind, result[f"baseline_{kind}"], flush=True)

    scores = {}
    for name in ("eap", "eap-ig", "eap-ig-activations"):
        start = time.perf_counter()
        scores[name] = METHODS[name].score(adapter, graph, task, args.batch_size, steps=args.steps)
        result[f"seconds_{name}"] = round(time.perf_counter() - start, 1)
        print(name, result[f"seconds_{name}"], "s", flush=True)

    top = set()
    for s in scores.values():
        top.update(pick_edges(graph, s, 40, 0)[0])
    random_edges = [e for e in pick_edges(graph, scores["eap-ig"], 0, 60, seed=1)[0] if e not in top]
    edges = sorted(top) + random_edges
    start = time.perf_counter()
    effects = exact_edge_effects(adapter, graph, task, edges, "discovery", args.batch_size)
    result["seconds_exact_effects"] = round(time.perf_counter() - start, 1)
    result["edges_checked"] = len(edges)
    for name, s in scores.items():
        values = torch.tensor([float(s[i, j]) for i, j in edges], dtype=torch.float64)
        result[f"correlation_{name}"] = correlations(values, effects)
        own_top = pick_edges(graph, s, 40, 0)[0]
        idx = [edges.index(e) for e in own_top]
        result[f"correlation_{name}_own_top40"] = correlations(values[idx], effects[idx])
        print(name, result[f"correlation_{name}"], result[f"correlation_{name}_own_top40"], flush=True)

    evaluator = evaluators["counterfactual"]
    timings = {}
    for label, budget in (("batched", evaluator.memory_budget), ("one_per_pass", 1)):
        evaluator.memory_budget = budget
        start = time.perf_counter()
        curve = faithfulness_curve(evaluator, scores["eap-ig-activations"])
        timings[label] = (
            round(time.perf_counter() - start, 1),
            [f for *_, f in curve.points],
            curve.cpr,
            curve.cmd,
            evaluator.circuits_per_pass(),
        )
    result["curve_eap_ig_activations"] = timings["batched"][1]
    result["cpr_cmd_eap_ig_activations"] = timings["batched"][2:4]
    result["curve_seconds_batched"], result["curve_seconds_one_per_pass"] = (
        timings["batched"][0],
        timings["one_per_pass"][0],
    )
    result["curve_circuits_per_pass"] = timings["batched"][4]
    result["curve_max_difference"] = max(abs(a - b) for a, b in zip(timings["batched"][1], timings["one_per_pass"][1]))

    write_result(result, "ablations")


if __name__ == "__main__":
    main()
