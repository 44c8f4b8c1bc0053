"""EAP-IG's interpolation rule and the BOS token against exact patching, on SmolLM2 IOI (issue 21).

For the same edges (the top 40 by the default scores and 80 drawn at random, seeded) this measures
the Pearson and Spearman correlation of EAP-IG scores with exact single-edge effects under the
midpoint rule ((k + ½)/m, this project's default) and the left rule (k/m, k = 0 … m−1, the
published code's), at equal steps, with the tokenizer's own prompts (SmolLM2 adds no BOS) and with
the BOS token prepended (as the published code does), and how far the default scores are from
the published choices' (Pearson, Spearman, top-1,000 overlap). Writes
outputs/benchmarks/ig-rules-TIME.json.

    .venv/bin/python scripts/measure_ig_rules.py [--pairs 64] [--steps 5]
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
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.methods.attribution import eap_ig
    from circuitfinder.methods.validation import correlations, exact_edge_effects, pick_edges
    from circuitfinder.tasks import build_task

    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    model = load_unchecked("smollm2-135m")
    graph = EdgeGraph(model.shape)
    plain = build_task("ioi", model.tokenizer, n_pairs=args.pairs, seed=0)
    tasks = {"tokenizer's own (no BOS)": plain, "BOS prepended": plain.with_bos(model.tokenizer.bos_token_id)}
    scores = {
        (prompts, rule): eap_ig(model, graph, task, steps=args.steps, ig_rule=rule)
        for prompts, task in tasks.items()
        for rule in ("midpoint", "left")
    }
    print(f"scores: {time.perf_counter() - started:.0f} s", flush=True)
    edges, _ = pick_edges(graph, scores[("tokenizer's own (no BOS)", "midpoint")], top=40, random=80, seed=0)
    rows = []
    for prompts, task in tasks.items():
        exact = exact_edge_effects(model, graph, task, edges)
        for rule in ("midpoint", "left"):
            s = torch.tensor([float(scores[(prompts, rule)][e]) for e in edges])
            rows.append({"prompts": prompts, "rule": rule, **correlations(s, exact)})
            print(rows[-1], flush=True)

    def top(x: torch.Tensor, k: int = 1000) -> set[int]:
        return set(torch.topk(x[graph.allowed].abs(), k).indices.tolist())

    default, published = scores[("tokenizer's own (no BOS)", "midpoint")], scores[("BOS prepended", "left")]
    apart = {
        **correlations(default[graph.allowed], published[graph.allowed]),
        "top_1000_in_common": len(top(default) & top(published)),
    }
    result = {
        "model": "smollm2-135m",
        "task": "ioi",
        "discovery_prompts": len(plain.indices("discovery")),
        "steps": args.steps,
        "edges": len(edges),
        "edge_sample": "top 40 by default scores + 80 random (seed 0)",
        "against_exact_patching": rows,
        "default_vs_published_choices": apart,
        "seconds": round(time.perf_counter() - started, 1),
        "note": "2 CPU threads; nothing else heavy running",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_result(result, "ig-rules")


if __name__ == "__main__":
    main()
