"""Measure a coarse-to-fine search: whole nodes removed by ACDC's rule before edges.

The default search (``acdc-groups``) tests groups of the seed's edges by exact patching, so its
cost grows with the seed. Here the same rule (the distance grows by less than τ, the circuit keeps
the target faithfulness on the search prompts) is first applied to whole nodes of the seed (a
head's or an MLP's every outgoing edge; pruning then drops the edges into it), by group tests
over nodes weakest first (groups bisected when their removal does not stand), and the edge search
runs on what is left. Both are measured on the same seed, prompts, τ and floor:

    .venv/bin/python scripts/measure_node_pass.py --task ioi        # SmolLM2, the default run's seed

Writes ``outputs/benchmarks/node-pass-TASK-MODEL-TIME.json``: per variant the circuits tested,
seconds, edges and nodes kept and held-out faithfulness. Nothing else may run beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def node_pass(graph, evaluate, scores, circuit, current, rule, largest: int = 64) -> tuple[torch.Tensor, dict]:
    """Group tests over the circuit's head and MLP nodes, weakest total |score| first."""
    from circuitfinder.engine.masks import prune

    kept = scores.abs().nan_to_num() * circuit
    weight = kept.sum(1)  # a node's edges out, and (below) the edges into the receivers that feed it
    for r, total in enumerate(kept.sum(0).tolist()):
        for s in graph.receiver_node[r]:
            weight[s] += total
    nodes = [s for s in torch.nonzero(circuit.any(1)).flatten().tolist() if s != 0]  # every sender but the input
    nodes.sort(key=lambda s: float(weight[s]))
    tested, wasted, kept_recent = 0, 0, []

    def size() -> int:
        recent = kept_recent[-128:]
        p = (recent.count(True) + 1) / (len(recent) + 64)
        return max(1, min(largest, 2 ** int(math.floor(math.log2(max(1.0, math.log(2) / p))))))

    def test(block: list[int]) -> None:
        nonlocal circuit, current, tested, wasted
        live = [s for s in block if bool(circuit[s].any())]
        if not live:
            return
        trial = circuit.clone()
        trial[live] = False
        trial = prune(graph, trial)
        scored = evaluate(trial.unsqueeze(0))
        new = (float(scored.metric[0]), float(scored.distance[0]))
        tested += 1
        if rule(new, current):
            circuit, current = trial, new
            kept_recent.extend([False] * len(live))
        elif len(live) == 1:
            kept_recent.append(True)
        else:
            wasted += 1
            test(live[: len(live) // 2])
            test(live[len(live) // 2 :])

    i = 0
    while i < len(nodes):
        n = size()
        test(nodes[i : i + n])
        i += n
    return circuit, {"nodes_tried": len(nodes), "circuits": tested, "wasted": wasted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--checkpoints", default=str(ROOT / "outputs"), help="root of .checkpoints (a saved seed)")
    parser.add_argument(
        "--node-target",
        type=float,
        default=None,
        help="the node pass keeps this faithfulness on the search prompts (default: the target's)",
    )
    parser.add_argument("--variants", default="edges,nodes-then-edges", help="comma-separated: edges, nodes-then-edges")
    args = parser.parse_args()

    from circuitfinder.checkpoint import Checkpoint
    from circuitfinder.config import DiscoverConfig
    from circuitfinder.engine.ablation import make_ablation
    from circuitfinder.engine.checks import load_model
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.masks import node_count, prune
    from circuitfinder.methods.acdc import AcdcRule, acdc_groups
    from circuitfinder.methods.pool import EvaluatorSpec, InProcessPool
    from circuitfinder.methods.registry import Problem, _seed, seed_key
    from circuitfinder.methods.search import MAX_ROWS, REUSE
    from circuitfinder.runs.pipeline import build_run_task

    torch.manual_seed(0)
    config = DiscoverConfig.from_options(task=args.task, model=args.model, dtype="float32")
    adapter = load_model(args.model, print, dtype=torch.float32, device="cpu")
    task = build_run_task(config, adapter.tokenizer)
    graph = EdgeGraph(adapter.shape)
    batch = config.execution.batch_size
    ablation = make_ablation("counterfactual", adapter, graph, task, batch)
    problem = Problem(adapter, graph, task, config, ablation, checkpoints=Path(args.checkpoints))
    scores, seed, _, _, _ = _seed(problem, Checkpoint(Path(args.checkpoints), seed_key(problem)))
    spec = EvaluatorSpec(None, task, batch, config.search.search_prompts, "task", MAX_ROWS, REUSE)
    pool = InProcessPool(spec.build(adapter), max(1, MAX_ROWS // batch))
    ends = pool(torch.stack([graph.allowed & False, graph.allowed.clone()]))
    empty, full = (float(ends.metric[0]), float(ends.distance[0])), (float(ends.metric[1]), float(ends.distance[1]))
    tau, floor = 0.01 * empty[1], empty[0] + config.size.target_faithfulness * (full[0] - empty[0])
    heldout = CircuitEvaluator(adapter, graph, task, "heldout", batch, ablation)
    seed = prune(graph, seed)
    results = {}
    for variant in args.variants.split(","):
        started = time.perf_counter()
        start, node_stats = seed, None
        if variant != "edges":
            first = pool(seed.unsqueeze(0))
            current = (float(first.metric[0]), float(first.distance[0]))
            node_floor = floor if args.node_target is None else empty[0] + args.node_target * (full[0] - empty[0])
            start, node_stats = node_pass(graph, pool, scores, seed.clone(), current, AcdcRule(tau, node_floor))
            node_stats["seconds"] = round(time.perf_counter() - started, 1)
            node_stats["edges_left"] = int(start.sum())
            print(f"{variant}: node pass {node_stats}")
        found = acdc_groups(graph, pool, scores, start, tau, floor=floor)
        seconds = time.perf_counter() - started
        results[variant] = {
            "seed_edges": int(seed.sum()),
            "node_pass": node_stats,
            "edge_pass_candidates": found.candidates,
            "circuits": found.state.rows + (node_stats["circuits"] if node_stats else 0),
            "seconds": round(seconds, 1),
            "edges_kept": int(found.circuit.sum()),
            "nodes_kept": node_count(graph, found.circuit),
            "faithfulness_heldout": heldout.faithfulness(found.circuit),
        }
        print(f"{variant}: {results[variant]}")
    out = ROOT / "outputs" / "benchmarks" / f"node-pass-{args.task}-{args.model}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "what": __doc__.split("\n\n")[0],
        "task": args.task,
        "model": args.model,
        "node_target": args.node_target,
        "tau": tau,
        "floor": floor,
        "search_prompts": config.search.search_prompts,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
