"""Issue 16, a measured negative result: iterative pruning by attribution at the current circuit.

The method tried (kept here, not in the package, because it overfits; see docs/measurements/attribution.md):
Iterative pruning: attribution at the current circuit, its weakest edges removed in rounds,
each round checked by exact patching.

Attribution ranks edges by a first-order estimate taken at the full model (EAP, Syed et al.
2023; EAP-IG, Hanna et al. 2024). Once most edges are gone the estimate is taken far from where
it is used, and the top N of one ranking is a poor small circuit (on SmolLM2 IOI, EAP-IG's top
241 edges keep 0.23 of the behaviour where ACDC's 241 keep 0.86). Here the estimate is taken
again at every circuit on the way down: :func:`circuitfinder.methods.attribution.attribute_circuit`
gives the exact derivative of the patched metric in every edge's patch weight *at the current
circuit*, so each round removes the edges that matter least where the circuit now is. The
schedule is that of iterative magnitude pruning (Frankle & Carbin 2019, "The Lottery Ticket
Hypothesis"), with the exact patched metric as the acceptance test, as in ACDC (Conmy et al. 2023):

1. Start from the full graph: attribution there is EAP.
2. Choose up to ``fraction`` of the circuit's edges to remove, weakest ``|score|`` first, skipping
   an edge whose estimated change would take the predicted metric (the circuit's plus the
   chosen edges' scores) outside half the room left in the band. Weak edges are many and their
   effects add up: removed blindly they carry the metric down (on SmolLM2 IOI the weakest half
   of 35,000 edges hold 0.13 of the behaviour); chosen so that their estimates cancel, they do not.
3. Prune to input → logits paths and measure the circuit's metric exactly on the prompts. If it
   stays in the band — faithfulness within ``1 − target`` of the full model's, on either side,
   i.e. ``|m(C) − m(full)| ≤ (1 − target) · |m(full) − m(∅)|`` — keep the removal and take the
   attribution again at the new circuit; otherwise halve ``fraction`` and try again.
4. Stop when ``fraction`` would remove less than one edge.

The band is two-sided, as ACDC's task distance ``|m(C) − m(full)|`` is: a circuit that drops the
components working against the behaviour (negative name movers) may not overshoot the model by
more than it may fall short. Every accepted circuit meets the target on the prompts used; the
run then measures it on held-out prompts. Each round costs one patched forward pass, and an accepted one a forward and
backward more; about ``log2(edges / result)`` rounds are accepted and ``log2(result)`` refused.
The result depends only on the prompts and the model, and a search resumed from its state
takes the same rounds (the attribution is recomputed, deterministically, at the saved circuit).


Research measurement: runs :func:`circuitfinder.methods.pruning.iterative_pruning` from the full
graph with the exact metric on the discovery prompts as the acceptance test, then measures the
circuit's exact faithfulness on the held-out prompts. Writes outputs/benchmarks/pruning-TIME.json.

    .venv/bin/python scripts/measure_pruning.py [--model smollm2-135m] [--task ioi] [--target 0.8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts")]


from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from circuitfinder.engine.graph import EdgeGraph  # noqa: E402
from circuitfinder.engine.masks import Mask, prune  # noqa: E402

Attribute = Callable[[Mask], tuple[torch.Tensor, float]]  # circuit -> (scores at it, its metric)
Measure = Callable[[Mask], float]  # circuit -> its metric, exactly


@dataclass
class PruningState:
    """Progress of the pruning: enough to resume it exactly."""

    circuit: Mask
    metric: float  # of ``circuit``, on the search's prompts
    fraction: float  # of the circuit's edges the next round tries to remove
    rounds: list[dict] = field(default_factory=list)  # one per round: sizes, the metric, accepted

    def to_json(self) -> dict:
        edges = torch.nonzero(self.circuit).tolist()
        return {
            "edges": edges,
            "shape": list(self.circuit.shape),
            "metric": self.metric,
            "fraction": self.fraction,
            "rounds": self.rounds,
        }

    @classmethod
    def from_json(cls, data: dict, graph: EdgeGraph) -> "PruningState":
        if list(data["shape"]) != list(graph.allowed.shape):
            raise ValueError("the saved pruning is of another graph")
        circuit = torch.zeros(graph.allowed.shape, dtype=torch.bool)
        for s, r in data["edges"]:
            circuit[s, r] = True
        return cls(circuit, float(data["metric"]), float(data["fraction"]), list(data["rounds"]))


def removal(circuit: Mask, scores: torch.Tensor, most: int, low: float, high: float) -> Mask:
    """Up to ``most`` edges of ``circuit`` to remove, weakest ``|score|`` first, each taken only if
    the sum of the chosen edges' scores stays within ``[low, high]``."""
    edges = torch.nonzero(circuit)
    estimate = scores[edges[:, 0], edges[:, 1]].double()
    order = torch.sort(estimate.abs(), stable=True).indices.tolist()
    values, chosen, total = estimate.tolist(), [], 0.0
    for i in order:
        if len(chosen) == most:
            break
        if low <= total + values[i] <= high:
            total += values[i]
            chosen.append(i)
    out = torch.zeros_like(circuit)
    if chosen:
        picked = edges[torch.tensor(chosen)]
        out[picked[:, 0], picked[:, 1]] = True
    return out


MARGIN = 0.5  # of the room left in the band that a round's estimated change may use


def iterative_pruning(
    graph: EdgeGraph,
    attribute: Attribute,
    measure: Measure,
    start: Mask,
    band: tuple[float, float],
    fraction: float = 0.5,
    state: PruningState | None = None,
    on_round: Callable[[PruningState], None] | None = None,
    ablation_is_run: bool = True,
) -> tuple[PruningState, torch.Tensor]:
    """Prune ``start`` while its metric stays within ``band`` (see the module docstring).

    Returns:
        the final state and the scores: for each edge, its attribution at the circuit from which
        it was removed (at the final circuit for the edges kept), in the metric's units.
    """
    if state is None:
        circuit = prune(graph, start, ablation_is_run)
        scores, metric = attribute(circuit)
        state = PruningState(circuit, metric, fraction)
    else:
        scores, _ = attribute(state.circuit)
    at_removal = scores.clone()
    low, high = band
    if not low <= state.metric <= high:
        return state, at_removal
    while True:
        n = int(state.circuit.sum())
        most = int(n * state.fraction)
        if most < 1:
            return state, at_removal
        chosen = removal(state.circuit, scores, most, MARGIN * (low - state.metric), MARGIN * (high - state.metric))
        trial = prune(graph, state.circuit & ~chosen, ablation_is_run)
        metric = measure(trial)
        accepted = low <= metric <= high
        state.rounds.append({"edges": n, "tried": int(trial.sum()), "metric": metric, "accepted": accepted})
        if accepted:
            scores, metric = attribute(trial)
            at_removal[trial] = scores[trial]  # the edges just removed keep their score at removal
            state.circuit, state.metric = trial, metric
        else:
            state.fraction /= 2
        if on_round:
            on_round(state)


def main() -> None:
    import torch
    from benchmark import write_result

    from circuitfinder.engine.adapter import load_unchecked
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.masks import node_count, top_edges
    from circuitfinder.methods.attribution import attribute_circuit, eap_ig
    from circuitfinder.tasks import build_task

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--n-pairs", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=None, help="discovery prompts measured (default all)")
    parser.add_argument(
        "--attribute-prompts", type=int, default=None, help="discovery prompts attributed (default all)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--start-edges", type=int, default=None, help="start from EAP-IG's top N (default: every edge)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = load_unchecked(args.model)
    graph = EdgeGraph(model.shape)
    task = build_task(args.task, model.tokenizer, n_pairs=args.n_pairs, seed=0)
    t_load = time.perf_counter() - t0
    discovery = CircuitEvaluator(model, graph, task, "discovery", args.batch_size, limit=args.prompts)
    attributing = (
        discovery
        if args.attribute_prompts is None
        else CircuitEvaluator(model, graph, task, "discovery", args.batch_size, limit=args.attribute_prompts)
    )
    heldout = CircuitEvaluator(model, graph, task, "heldout", args.batch_size)
    b = discovery.baseline
    slack = (1 - args.target) * abs(b.clean - b.corrupted)
    band = (b.clean - slack, b.clean + slack)
    timing = {"attribute": 0.0, "measure": 0.0}

    def attribute(mask):
        t = time.perf_counter()
        scores, _ = attribute_circuit(attributing, (graph.allowed & ~mask).double())
        out = scores, (discovery.metric(mask) if attributing is not discovery else _)
        timing["attribute"] += time.perf_counter() - t
        return out

    def measure(mask):
        t = time.perf_counter()
        out = discovery.metric(mask)
        timing["measure"] += time.perf_counter() - t
        return out

    def on_round(state):
        r = state.rounds[-1]
        f = (r["metric"] - b.corrupted) / (b.clean - b.corrupted)
        print(
            f"{time.perf_counter() - t0:6.0f} s  {r['edges']:>6,} → {r['tried']:>6,}: faithfulness {f:.3f} "
            f"{'kept' if r['accepted'] else 'refused'}",
            flush=True,
        )

    start = graph.allowed.clone()
    if args.start_edges:
        start = top_edges(graph, eap_ig(model, graph, task), args.start_edges)
        print(f"{time.perf_counter() - t0:6.0f} s  EAP-IG top {args.start_edges:,}", flush=True)
    t1 = time.perf_counter()
    state, scores = iterative_pruning(graph, attribute, measure, start, band, args.fraction, on_round=on_round)
    t_search = time.perf_counter() - t1
    held = heldout.faithfulness(state.circuit)
    result = {
        "model": args.model,
        "task": args.task,
        "target": args.target,
        "fraction": args.fraction,
        "prompts_discovery": discovery.n,
        "prompts_heldout": heldout.n,
        "start_edges": args.start_edges,
        "attribute_prompts": args.attribute_prompts,
        "edges": int(state.circuit.sum()),
        "nodes": node_count(graph, state.circuit),
        "faithfulness_discovery": (state.metric - b.corrupted) / (b.clean - b.corrupted),
        "faithfulness_heldout": held,
        "rounds": len(state.rounds),
        "seconds_load": round(t_load, 1),
        "seconds_search": round(t_search, 1),
        "seconds_attribute": round(timing["attribute"], 1),
        "seconds_measure": round(timing["measure"], 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "log": state.rounds,
    }
    write_result(result, f"pruning-{args.model}-{args.task}")


if __name__ == "__main__":
    main()
