"""A first measurement for issue 16: group-wise removal with bisection, from EAP-IG's top-N circuit.

Research scaffolding, not yet a method of the registry. On SmolLM2 IOI: EAP-IG scores (default
options) on the discovery prompts, the start circuit = the default run's top-2,112 pruned (1,985
edges, held-out faithfulness 0.81), then groups of the start's edges, weakest |score| first, are
removed while the task metric on ``--search-prompts`` discovery prompts stays at or above
m(∅) + target · (m(full) − m(∅)); a group whose removal drops below is split in halves, down to
single edges, which are kept. Stops after ``--minutes`` (reporting how far it got). The held-out
faithfulness of the result is measured exactly at the end. Writes
outputs/benchmarks/group-removal-TIME.json.

    .venv/bin/python scripts/measure_group_removal.py [--group 64] [--target 0.85] [--minutes 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


def main() -> None:
    import torch
    from benchmark import write_result

    from circuitfinder.engine.adapter import load_unchecked
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.masks import prune, top_edges
    from circuitfinder.methods.attribution import eap_ig
    from circuitfinder.tasks import build_task

    parser = argparse.ArgumentParser()
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--search-prompts", type=int, default=16)
    parser.add_argument("--start-edges", type=int, default=2112)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument(
        "--rule",
        choices=("floor", "tau"),
        default="floor",
        help="floor: keep the target faithfulness; tau: ACDC's rule on groups, a removal stands "
        "when |m − m(full)| grows by less than τ = --tau × |m(full) − m(∅)|",
    )
    parser.add_argument("--tau", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = load_unchecked("smollm2-135m")
    graph = EdgeGraph(model.shape)
    task = build_task("ioi", model.tokenizer, n_pairs=128, seed=0)
    scores = eap_ig(model, graph, task)
    start = prune(graph, top_edges(graph, scores, args.start_edges))
    t_scores = time.perf_counter() - t0
    scorer = CircuitEvaluator(model, graph, task, "discovery", 16, limit=args.search_prompts, max_rows=32)
    ends = scorer.evaluate(torch.stack([graph.allowed & False, graph.allowed.clone()]))
    empty, full = float(ends.metric[0]), float(ends.metric[1])
    floor = empty + args.target * (full - empty)

    current = start.clone()
    current_metric = float(scorer.evaluate(current[None]).metric[0])
    tau = args.tau * abs(full - empty)
    evaluations = 0
    deadline = time.perf_counter() + 60 * args.minutes

    def metric(mask: torch.Tensor) -> float:
        nonlocal evaluations
        evaluations += 1
        return float(scorer.evaluate(mask[None]).metric[0])

    def try_remove(edges: list[tuple[int, int]]) -> None:
        nonlocal current, current_metric
        edges = [e for e in edges if current[e]]
        if not edges or time.perf_counter() > deadline:
            return
        trial = current.clone()
        for s, r in edges:
            trial[s, r] = False
        m = metric(trial)
        stands = m >= floor if args.rule == "floor" else abs(m - full) - abs(current_metric - full) < tau
        if stands:
            current, current_metric = prune(graph, trial), m
        elif len(edges) > 1:
            half = len(edges) // 2
            try_remove(edges[:half])
            try_remove(edges[half:])

    s_idx, r_idx = torch.nonzero(start, as_tuple=True)
    order = torch.argsort(scores[s_idx, r_idx].abs(), stable=True).tolist()  # weakest first
    candidates = [(int(s_idx[i]), int(r_idx[i])) for i in order]
    t_search = time.perf_counter()
    tried = 0
    for k in range(0, len(candidates), args.group):
        if time.perf_counter() > deadline:
            break
        try_remove([e for e in candidates[k : k + args.group] if current[e]])
        tried = min(k + args.group, len(candidates))
        print(
            f"{tried}/{len(candidates)} tried, {int(current.sum())} kept, {evaluations} evaluations, "
            f"{time.perf_counter() - t_search:.0f} s",
            flush=True,
        )
    search_seconds = time.perf_counter() - t_search
    final = prune(graph, current)
    heldout = CircuitEvaluator(model, graph, task, "heldout")
    result = {
        "model": "smollm2-135m",
        "task": "ioi",
        "method": "group-wise removal with bisection (prototype)",
        "start_edges": int(start.sum()),
        "start_faithfulness_heldout": float(heldout.faithfulness(start)),
        "group": args.group,
        "rule": args.rule,
        "tau_fraction": args.tau if args.rule == "tau" else None,
        "target_on_search_prompts": args.target if args.rule == "floor" else None,
        "faithfulness_search_prompts": (current_metric - empty) / (full - empty),
        "search_prompts": args.search_prompts,
        "candidates_tried": tried,
        "candidates": len(candidates),
        "evaluations": evaluations,
        "edges_kept": int(final.sum()),
        "faithfulness_heldout": float(heldout.faithfulness(final)),
        "seconds_scores": round(t_scores, 1),
        "seconds_search": round(search_seconds, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "note": "2 CPU threads, nothing else heavy running",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_result(result, "group-removal")


if __name__ == "__main__":
    main()
