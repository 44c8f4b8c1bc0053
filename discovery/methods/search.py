"""The iterative phase of a run: ACDC or minimisation on a pool, checkpointed, with a certificate.

Given attribution scores and a start circuit, this builds the scorer pool (in process or on Ray),
runs :func:`circuitfinder.methods.acdc.acdc` or :func:`circuitfinder.methods.acdc.minimize` with a checkpoint saved
after every chain, and measures each kept edge's necessity: the change in metric and distance when it
alone is removed from the final circuit (on the same prompts as the search).

A half-precision search (``Problem.precision.referee``) runs its passes on a bfloat16 (or float16)
copy of the model, loaded for it beside the run's float32 model, which referees it
(:class:`circuitfinder.methods.acdc.Referee`): τ and the floor come from float32's empty and full
circuits, the half-precision error is measured on the seed and on five circuits along its removal
order, and every decision within :data:`~circuitfinder.methods.acdc.REFEREE_MARGIN` errors of the
threshold is made again in float32; where the passes cannot settle removals under τ, or are not
:data:`~circuitfinder.methods.acdc.REFEREE_SPEEDUP` times as fast as float32's, the search's
passes run in float32 instead.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import pandas as pd
import torch

from circuitfinder.checkpoint import Checkpoint
from circuitfinder.engine.checks import load_model
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import Mask, prune
from circuitfinder.engine.precision import dtype_name
from circuitfinder.methods.acdc import (
    GROUP_MAX,
    AcdcRule,
    Referee,
    SearchResult,
    SearchState,
    acdc,
    acdc_groups,
    candidate_order,
    minimize,
    removal_order,
)
from circuitfinder.methods.pool import EvaluatorSpec, InProcessPool, RayPool

if TYPE_CHECKING:
    from circuitfinder.methods.registry import Problem

MAX_ROWS = 256  # sequences per forward pass in the search, once the batch is repeated per circuit
REUSE = 2  # passes kept per batch: a trial runs only the blocks from where it differs from one of them
CALIBRATION = (
    0.5,
    0.8,
    0.9,
    0.95,
    0.98,
)  # shares of the removal order taken out of the seed to measure half precision's error


@dataclass(frozen=True)
class SearchOutcome:
    circuit: Mask
    result: SearchResult
    rule: dict  # what decided removals: tau and distance, or the metric floor
    necessity: list[dict]  # per kept edge: metric and distance change when it alone is removed
    forward_passes: int  # over every sitting of a resumed search (each up to its last saved chain)
    seconds: float  # likewise
    ray_seconds: float | None  # start-up of the Ray pool, when one was used
    sittings: int  # 1, or more when the search was resumed from its checkpoint


def _pool(execution, adapter, spec: EvaluatorSpec, chunk: int):
    if execution.workers == 0:
        return InProcessPool(spec.build(adapter), chunk)
    return RayPool(spec, execution.workers, chunk, execution.address)


CRITERIA = ("acdc", "acdc-groups", "minimize")


@dataclass
class _Passes:
    """Where a search's circuits are scored: ``pool`` (in process or on Ray, in the passes' dtype)
    and, for a refereed half-precision search, ``float32`` (the run's own model, in process)."""

    pool: object
    float32: InProcessPool | None
    spec: EvaluatorSpec
    chunk: int

    @property
    def forward_passes(self) -> int:
        return self.pool.forward_passes + (self.float32.forward_passes if self.float32 is not None else 0)

    def in_float32(self, problem: "Problem") -> None:
        """Give up the half-precision passes: score every circuit on the float32 model."""
        e, adapter = problem.config.execution, problem.adapter
        self.pool.close()
        self.spec = dataclasses.replace(
            self.spec, load=partial(load_model, problem.config.model, check=False, dtype=adapter.dtype, device=e.device)
        )
        self.pool = self.float32 if not e.workers else _pool(e, adapter, self.spec, self.chunk)
        self.float32 = None


def _passes(problem: "Problem", distance: str, batches: tuple) -> _Passes:
    """The search's pools; a refereed search loads its half-precision copy of the model here."""
    config, adapter, e = problem.config, problem.adapter, problem.config.execution
    passes_model = adapter
    if problem.precision is not None and problem.precision.referee:  # half-precision passes, refereed by float32
        passes_model = load_model(
            config.model,
            problem.reporter.log,
            check=e.check_model,
            dtype=problem.precision.passes,
            device=adapter.device,
        )
    spec = EvaluatorSpec(
        partial(load_model, config.model, check=False, dtype=passes_model.dtype, device=e.device),
        problem.task,
        e.batch_size,
        config.search.search_prompts,
        distance,
        MAX_ROWS,
        REUSE,
    )
    chunk = max(1, MAX_ROWS // max(b.size for b in batches))
    if e.workers:
        problem.reporter.log(f"starting {e.workers} Ray worker(s)" + (f" on {e.address}" if e.address else ""))
    pool = _pool(e, passes_model, spec, chunk)
    float32 = InProcessPool(spec.build(adapter), chunk) if passes_model is not adapter else None
    return _Passes(pool, float32, spec, chunk)


def _rule(problem: "Problem", criterion: str, distance: str, empty: tuple, full: tuple) -> tuple[dict, AcdcRule]:
    """What decides a removal: ``(the rule as the certificate says it, the rule the search applies)``."""
    s, target = problem.config.search, problem.config.size.target_faithfulness
    floor = empty[0] + target * (full[0] - empty[0])
    if criterion == "minimize":
        return {"rule": "minimize", "target_faithfulness": target, "metric_floor": floor}, AcdcRule(None, floor)
    tau = s.tau if s.tau is not None else 0.01 * empty[1]
    rule = {"rule": criterion, "distance": distance, "tau": tau, "distance_empty": empty[1]}
    if s.floor:
        rule |= {"target_faithfulness": target, "metric_floor": floor}
    return rule, AcdcRule(tau, floor if s.floor else None)


def _label(problem: "Problem", criterion: str, rule: dict, n_prompts: int) -> str:
    target = problem.config.size.target_faithfulness
    if criterion == "minimize":
        return f"minimising (faithfulness ≥ {target} on {n_prompts} prompts)"
    return (
        f"ACDC{' on groups of edges' if criterion == 'acdc-groups' else ''} (τ = {rule['tau']:.3g}, "
        f"{rule['distance']}" + (f", faithfulness ≥ {target}" if problem.config.search.floor else "") + ")"
    )


def run_search(
    problem: "Problem", criterion: str, scores: torch.Tensor, start: Mask, checkpoint: Checkpoint
) -> SearchOutcome:
    """ACDC (``criterion="acdc"``: τ on ``search.acdc_metric``, and with ``search.floor`` the
    target faithfulness kept on the search prompts; ``"acdc-groups"``: the same rule on groups of
    edges) or minimisation to ``size.target_faithfulness`` (``"minimize"``), from the circuit
    ``start``, checkpointed after every chain and resumed from the checkpoint when there is one."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown search criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    graph, reporter, s = problem.graph, problem.reporter, problem.config.search
    started = time.perf_counter()
    batches = tuple(
        b.to("cpu")
        for b in problem.task.batches("discovery", problem.config.execution.batch_size, limit=s.search_prompts)
    )
    distance = "task" if criterion == "minimize" else s.acdc_metric
    passes = _passes(problem, distance, batches)
    ray_seconds = time.perf_counter() - started if problem.config.execution.workers else None
    try:
        ends_stack = torch.stack([graph.allowed & False, graph.allowed.clone()])  # the empty and the full circuit
        ends = (passes.float32 or passes.pool)(ends_stack)
        empty, full = (float(ends.metric[0]), float(ends.distance[0])), (float(ends.metric[1]), float(ends.distance[1]))
        start = prune(graph, start)
        rule, search_rule = _rule(problem, criterion, distance, empty, full)
        candidates = (candidate_order if criterion == "acdc" else removal_order)(graph, start, scores)
        referee = _calibrate(problem, passes, ends_stack, start, candidates, search_rule, rule)
        n_prompts = sum(b.size for b in batches)
        result, sittings, before = _decide(
            problem,
            criterion,
            passes,
            scores,
            start,
            candidates,
            search_rule,
            referee,
            checkpoint,
            _label(problem, criterion, rule, n_prompts),
            n_prompts,
            started,
        )
        if "referee" in rule:
            rule["referee"] |= refereed(result.state, search_rule)
        if referee is not None:
            reporter.log(
                f"float32 referee: {rule['referee']['decided']:,} of {result.evaluated:,} candidates decided "
                f"in float32, {rule['referee']['overruled']:,} of them against the "
                f"{rule['referee']['passes_dtype']} verdict"
            )
        necessity, base = _necessity(problem, passes.pool, result.circuit, scores)
        rule |= {
            "metric_empty": empty[0],
            "metric_full": full[0],
            "metric_circuit": float(base.metric[0]),
            "distance_circuit": float(base.distance[0]),
            "prompts": n_prompts,
        }
        return SearchOutcome(
            result.circuit,
            result,
            rule,
            necessity,
            before[0] + passes.forward_passes,
            before[1] + time.perf_counter() - started,
            ray_seconds,
            sittings,
        )
    finally:
        passes.pool.close()


def _calibrate(
    problem: "Problem",
    passes: _Passes,
    ends_stack: torch.Tensor,
    start: Mask,
    candidates: list,
    search_rule: AcdcRule,
    rule: dict,
) -> Referee | None:
    """A refereed search's referee, after measuring half precision's error (recorded in ``rule``);
    None, and the passes moved to float32, where half precision cannot settle the removals or
    is not faster."""
    if passes.float32 is None:
        return None
    reporter = problem.reporter
    referee = _referee(passes.pool, passes.float32, ends_stack, start, candidates, search_rule)
    half = dtype_name(problem.precision.passes)
    rule["referee"] = {
        "dtype": "float32",
        "passes_dtype": half,
        "error_metric": referee.error[0],
        "error_distance_change": referee.error[1],
        "margin": referee.margin,
        "speedup": referee.speedup,
    }
    reporter.log(
        f"{half} against float32 on {2 * len(CALIBRATION) + 2} circuits: the metric differs by up to "
        f"{referee.error[0]:.2g}, a removal's change of distance by up to {referee.error[1]:.2g}; "
        f"its passes take {1 / referee.speedup:.2f} of float32's time"
    )
    why = referee.unprofitable(half)
    if why:
        reporter.log(f"{why}: the search's passes run in float32")
        rule["referee"] |= {"passes_dtype": "float32", "why_float32": why}
        passes.in_float32(problem)
        return None
    reporter.log(f"decisions within {referee.margin:g} errors of the threshold are made again in float32")
    return referee


def _decide(
    problem: "Problem",
    criterion: str,
    passes: _Passes,
    scores: torch.Tensor,
    start: Mask,
    candidates: list,
    search_rule: AcdcRule,
    referee: Referee | None,
    checkpoint: Checkpoint,
    label: str,
    n_prompts: int,
    started: float,
) -> tuple[SearchResult, int, tuple[int, float]]:
    """Decide every candidate, from the checkpoint's state when there is one, saving it after every
    chain. Returns the result, the sittings, and the passes and seconds of the sittings before."""
    reporter, chain, graph = problem.reporter, problem.config.search.chain, problem.graph
    saved = checkpoint.load_json("search")
    try:
        state = SearchState.from_json(saved, start, candidates) if saved else None
    except (ValueError, KeyError, TypeError):
        reporter.log(f"checkpoint {checkpoint.dir} does not fit this search: starting the search afresh")
        state = None
    earlier = saved if state is not None else {}
    before = (earlier.get("forward_passes", 0), earlier.get("seconds", 0.0))
    sittings = earlier.get("sittings", 1) + 1 if state is not None else 1
    if state is not None:
        reporter.log(
            f"resuming from checkpoint {checkpoint.dir}: {state.position:,} of {len(candidates):,} candidates decided"
        )
    per = f"groups of up to {GROUP_MAX}" if criterion == "acdc-groups" else f"up to {chain} per chain"
    reporter.log(f"{label}: {len(candidates):,} candidate edges, {n_prompts} prompts, {per}")
    with reporter.progress(label, len(candidates)) as advance:
        done = [state.position if state else 0]
        if done[0]:
            advance(done[0])

        def on_chain(st: SearchState) -> None:
            checkpoint.save_json(
                "search",
                st.to_json()
                | {
                    "forward_passes": before[0] + passes.forward_passes,
                    "sittings": sittings,
                    "seconds": before[1] + time.perf_counter() - started,
                },
            )
            advance(st.position - done[0])
            done[0] = st.position
            if st.chains % 50 == 0:
                reporter.log(
                    f"  {st.position:,}/{len(candidates):,} decided, {int(st.circuit.sum()):,} edges left, "
                    f"metric {st.current[0]:.3f}, distance {st.current[1]:.4f}, "
                    f"{st.rows:,} circuits evaluated ({st.wasted_rows:,} on wrong guesses)"
                )

        tau, floor, pool = search_rule.tau, search_rule.floor, passes.pool
        if criterion == "acdc":
            result = acdc(graph, pool, scores, start, tau, chain, state, on_chain, floor, referee)
        elif criterion == "acdc-groups":
            result = acdc_groups(graph, pool, scores, start, tau, state, on_chain, floor, referee)
        else:
            result = minimize(graph, pool, scores, start, floor, chain, state, on_chain, referee)
    return result, sittings, before


def _necessity(problem: "Problem", pool, circuit: Mask, scores: torch.Tensor) -> tuple[list[dict], object]:
    """Each kept edge's metric drop and distance rise when it alone is removed from ``circuit``
    (latest receivers first: a pass's circuits then differ only from a late layer on), and the
    circuit's own scores."""
    graph = problem.graph
    kept = sorted(torch.nonzero(circuit).tolist(), key=lambda e: (-e[1], e[0]))
    with problem.reporter.progress(f"necessity of {len(kept)} kept edges", len(kept)) as advance:
        base = pool(circuit.unsqueeze(0))
        necessity = []
        for i in range(0, len(kept), 64):
            trials = circuit.unsqueeze(0).repeat(len(kept[i : i + 64]), 1, 1)
            for j, (s, r) in enumerate(kept[i : i + 64]):
                trials[j, s, r] = False
            scored = pool(trials)
            for j, (s, r) in enumerate(kept[i : i + 64]):
                necessity.append(
                    {
                        "edge": graph.edge_name(s, r),
                        "score": float(scores[s, r]),
                        "metric_drop": float(base.metric[0] - scored.metric[j]),
                        "distance_rise": float(scored.distance[j] - base.distance[0]),
                    }
                )
            advance(len(trials))
    return necessity, base


def _referee(
    pool, float32: InProcessPool, ends: torch.Tensor, start: Mask, candidates: list[tuple[int, int]], rule: AcdcRule
) -> Referee:
    """A float32 referee for ``pool``'s half-precision passes. Their error is measured on the seed
    and on the seed less the first :data:`CALIBRATION` shares of its removal order, each alone and
    less its next 8 candidates (a removal like the search's): the largest metric difference, and
    the largest difference in the change of distance that removal makes. Both pools are timed on
    those circuits after a first call on ``ends`` (each evaluator runs its prompts on its first call)."""
    circuits = []
    for share in (0.0, *CALIBRATION):
        k = int(share * len(candidates))
        trial = start.clone()
        for s, r in candidates[:k]:
            trial[s, r] = False
        circuits.append(trial.clone())
        for s, r in candidates[k : k + 8]:
            trial[s, r] = False
        circuits.append(trial)
    stack = torch.stack(circuits)
    pool(ends)
    started = time.perf_counter()
    half = pool(stack)
    halfway = time.perf_counter()
    exact = float32(stack)
    speedup = (time.perf_counter() - halfway) / max(halfway - started, 1e-9)
    metric = (half.metric.double() - exact.metric.double()).abs().max()
    distance = half.distance.double() - exact.distance.double()
    change = (distance[1::2] - distance[0::2]).abs().max()
    return Referee(float32, rule, (float(metric), float(change)), speedup=speedup)


def refereed(state: SearchState, rule: AcdcRule) -> dict:
    """How many candidates the referee decided (their trials carry float32's scores), and how many
    of those against the half-precision passes' own verdict."""
    trials = [t for t in state.trials if t and len(t) == 8]
    overruled = sum(rule(t[:2], t[2:4]) != rule(t[4:6], t[6:8]) for t in trials)
    return {"decided": len(trials), "overruled": overruled}


DECISION = {0: "kept", 1: "removed", 2: "dead receiver"}


def decisions_table(graph: EdgeGraph, outcome: SearchOutcome, scores: torch.Tensor) -> pd.DataFrame:
    """One row per candidate in the order decided: its score, the decision, and the (metric, distance)
    before it and with it removed (empty for a dead receiver's edges, which went without a pass)."""
    state = outcome.result.state
    rows = []
    for step, ((s, r), decided, trial) in enumerate(zip(outcome.result.order, state.decided, state.trials), 1):
        trial = list(trial or []) + [None] * (8 - len(trial or []))
        after_m, after_d, before_m, before_d, *float32 = trial
        rows.append(
            {
                "step": step,
                "edge": graph.edge_name(s, r),
                "score": float(scores[s, r]),
                "decision": DECISION[decided],
                "metric_before": before_m,
                "metric_removed": after_m,
                "distance_before": before_d,
                "distance_removed": after_d,
                **dict(zip(FLOAT32_COLUMNS, float32)),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "step",
            "edge",
            "score",
            "decision",
            "metric_before",
            "metric_removed",
            "distance_before",
            "distance_removed",
            *FLOAT32_COLUMNS,
        ],
    )


# a refereed decision's trial in float32 (empty where the half-precision pass decided alone)
FLOAT32_COLUMNS = (
    "metric_removed_float32",
    "distance_removed_float32",
    "metric_before_float32",
    "distance_before_float32",
)
