"""The stages of a discovery run, each a function with a typed hand-off to the next.

:func:`circuitfinder.runs.run.run_config` reads as their list: check the configuration, plan the
precision and load (:func:`load`), build the task and baseline (:func:`prepare`), find the circuit
(:func:`find`), measure it on the held-out prompts (:func:`measure`), summarise it
(:func:`summarise`), describe its heads (``Run.roles``) and save.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.ablation import ABLATIONS, Ablation, make_ablation
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.checks import load_model
from circuitfinder.engine.faithfulness import DISTANCES, Baseline, CircuitEvaluator, Curve, faithfulness_curve
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.masks import node_count, prune, top_edges
from circuitfinder.engine.models import resolve_device
from circuitfinder.engine.precision import (
    PrecisionPlan,
    dtype_name,
    given_precision,
    plan_precision,
    resolve_dtype,
)
from circuitfinder.errors import UserError
from circuitfinder.methods.attribution import IG_RULES
from circuitfinder.methods.registry import METHODS, UNSEEDED, Found, Problem, Reporter, check_method, seed_target
from circuitfinder.runs.summary import Summary
from circuitfinder.tasks import TASKS, Task, build_task, is_task_file

MIN_ACCURACY = 0.6  # below this the model does not show the behaviour well enough to have a circuit for it


@dataclass
class Prepared:
    """A loaded model with the run's task, edge graph, ablation and held-out evaluator."""

    adapter: ModelAdapter
    precision: PrecisionPlan
    task: Task
    graph: EdgeGraph
    ablation: Ablation
    heldout: CircuitEvaluator

    @property
    def baseline(self) -> Baseline:
        return self.heldout.baseline

    def reload(self, config: DiscoverConfig, dtype: torch.dtype, reporter: Reporter) -> None:
        """Replace the model by a copy in ``dtype`` (the old one is released first), with its
        ablation and held-out evaluator."""
        device = self.adapter.device
        self.adapter = self.ablation = self.heldout = None
        adapter = load_model(config.model, reporter.log, check=config.execution.check_model, dtype=dtype, device=device)
        self.adapter, self.ablation, self.heldout = adapter, *held_out(adapter, self.task, self.graph, config)


@dataclass(frozen=True)
class Measured:
    """The circuit measured on the held-out prompts, by exact patching."""

    faithfulness: float
    found_faithfulness: float | None  # re-measured: its faithfulness in the dtype it was found in
    curve: Curve | None


def check_config(config: DiscoverConfig, task_given: bool = False) -> None:
    """Refuse a configuration that cannot run, naming the argument to fix.

    Args:
        task_given: the task is passed built, so ``config.task`` is only its name.

    Raises:
        UserError: with ``argument`` set to the field to fix.
    """

    def need(ok: bool, argument: str, message: str) -> None:
        if not ok:
            raise UserError(message, argument)

    p, size, a, s, e = config.prompts, config.size, config.attribution, config.search, config.execution
    if not task_given and is_task_file(config.task):
        need(Path(config.task).is_file(), "task", f"no task file at {config.task}")
    elif not task_given:
        need(
            config.task in TASKS,
            "task",
            f"unknown task {config.task!r}: use one of {', '.join(sorted(TASKS))}, or a .jsonl or .csv task file",
        )
    need(
        size.ablation in ABLATIONS, "ablation", f"unknown ablation {size.ablation!r}: use one of {', '.join(ABLATIONS)}"
    )
    check_method(config.method, s.seed_method, size.ablation)
    seeded = ", ".join(n for n, m in METHODS.items() if m.seeded)
    searching = METHODS[config.method].seeded
    need(
        s.seed_method != UNSEEDED or searching,
        "seed_method",
        f"`seed_method` {UNSEEDED!r} is for the seeded methods ({seeded})",
    )
    need(s.tau is None or s.tau >= 0, "tau", f"`tau` must be a number ≥ 0, got {s.tau}")
    need(
        s.acdc_metric in DISTANCES,
        "acdc_metric",
        f"`acdc_metric` must be one of {', '.join(DISTANCES)}, got {s.acdc_metric!r}",
    )
    for name, value, least in (
        ("search_prompts", s.search_prompts, 1),
        ("chain", s.chain, 1),
        ("workers", e.workers, 0),
        ("n_pairs", p.n_pairs, 4),
        ("ig_steps", a.ig_steps, 1),
        ("batch_size", e.batch_size, 1),
    ):
        need(value >= least, name, f"`{name}` must be at least {least}, got {value}")
    need(size.edges is None or size.threshold is None, "edges", "give `edges` or `threshold`, not both")
    need(size.edges is None or size.edges >= 1, "edges", f"`edges` must be at least 1, got {size.edges}")
    need(
        size.threshold is None or size.threshold >= 0,
        "threshold",
        f"`threshold` must be a number ≥ 0, got {size.threshold}",
    )
    need(
        0 < size.target_faithfulness <= 1,
        "target_faithfulness",
        f"`target_faithfulness` must be in (0, 1], got {size.target_faithfulness}",
    )
    need(
        s.seed_faithfulness is None or size.target_faithfulness <= s.seed_faithfulness <= 1,
        "seed_faithfulness",
        f"`seed_faithfulness` must be at least `target_faithfulness` ({size.target_faithfulness}) and at most 1, "
        f"got {s.seed_faithfulness}",
    )
    need(
        s.seed_faithfulness is None or searching,
        "seed_faithfulness",
        f"`seed_faithfulness` is for the seeded searches ({seeded}); attribution's own size uses `target_faithfulness`",
    )
    need(a.ig_rule in IG_RULES, "ig_rule", f"`ig_rule` must be one of {', '.join(IG_RULES)}, got {a.ig_rule!r}")
    need(p.bos in ("auto", "always"), "bos", f"`bos` must be auto or always, got {p.bos!r}")
    try:
        resolve_dtype(e.dtype, resolve_device(e.device), config.model)
    except UserError as exc:
        raise UserError(str(exc), "dtype" if "dtype" in str(exc) else "device") from None


def wants_curve(config: DiscoverConfig) -> bool:
    """Whether the run measures the MIB curve: ``outputs.curve`` when given, else only for
    attribution's top N. The curve ranks edges by attribution's scores, so after a search it
    describes the seed, not the circuit found, and costs about a tenth of the run."""
    if config.outputs.curve is not None:
        return config.outputs.curve
    return METHODS[config.method].score is not None


def load(
    config: DiscoverConfig, adapter: ModelAdapter | None, reporter: Reporter
) -> tuple[PrecisionPlan, ModelAdapter]:
    """Plan the run's precision once (``circuitfinder.engine.precision.plan_precision``) and load
    the model in it, checked at load; a model given loaded keeps its dtype."""
    searching = METHODS[config.method].seeded
    e = config.execution
    if adapter is not None:
        precision = given_precision(adapter.dtype, searching)
        if precision.why:
            reporter.log(precision.why)
        return precision, adapter
    device = resolve_device(e.device)
    precision = plan_precision(e.dtype, device, config.model, searching, e.referee, e.batch_size)
    if precision.why:
        reporter.log(precision.why)
    reporter.log(f"loading {config.model} ({dtype_name(precision.model)} on {device})")
    return precision, load_model(config.model, reporter.log, check=e.check_model, dtype=precision.model, device=device)


def build_run_task(config: DiscoverConfig, tokenizer) -> Task:
    """The run's task: built for the tokenizer, with the BOS token prepended when ``prompts.bos`` says so."""
    p = config.prompts
    task = build_task(config.task, tokenizer, n_pairs=p.n_pairs, seed=p.seed, skip_bad_rows=p.skip_bad_rows)
    if p.bos == "always":
        if tokenizer.bos_token_id is None:
            raise UserError(f"`bos='always'`: the tokenizer of {config.model} has no BOS token", "bos")
        task = task.with_bos(tokenizer.bos_token_id)
    return task


def prepare(
    config: DiscoverConfig, adapter: ModelAdapter, precision: PrecisionPlan, task: Task | None, reporter: Reporter
) -> Prepared:
    """Build the task and the edge graph, say the memory plan, measure the held-out baseline, and
    refuse what cannot run: an ablation or method the model's heads do not allow, a batch that does
    not fit, a behaviour the model does not show."""
    task = task if task is not None else build_run_task(config, adapter.tokenizer)
    for note in task.notes:
        reporter.log(f"task: {note}")
    graph, shape = EdgeGraph(adapter.shape), adapter.shape
    ablation = config.size.ablation
    if shape.post_norm and ablation != "counterfactual":
        raise UserError(
            f"{adapter.name} normalises its heads' sum (a shared post-attention norm): mean/zero "
            "ablation is not defined for it yet; use the counterfactual ablation"
        )
    reporter.log(
        f"{adapter.name}: {shape.n_layers} layers, {shape.n_heads} heads, {shape.n_kv_groups} key/value "
        f"groups: {graph.n_edges:,} edges"
    )
    reporter.log(
        f"task {task.name}: {len(task)} prompt pairs ({len(task.indices('discovery'))} discovery, "
        f"{len(task.indices('heldout'))} held-out), metric {task.metric_name}"
    )
    check_memory(adapter, task, config.execution.batch_size, reporter, precision.passes if precision.referee else None)
    prepared = Prepared(adapter, precision, task, graph, *held_out(adapter, task, graph, config))
    reporter.log(f"baseline (held-out): {prepared.baseline}")
    check_behaviour(prepared.baseline, config, adapter.name)
    method = METHODS[config.method]
    seed = config.search.seed_method if method.seeded and config.search.seed_method != UNSEEDED else None
    for name in filter(None, (config.method, seed)):
        refusal = METHODS[name].refusal(name, ablation, shape.post_norm)
        if refusal:
            raise UserError(f"{adapter.name}: {refusal}")
    return prepared


def held_out(
    adapter: ModelAdapter, task: Task, graph: EdgeGraph, config: DiscoverConfig
) -> tuple[Ablation, CircuitEvaluator]:
    """The run's ablation on ``adapter``, and its evaluator on the held-out prompts."""
    batch = config.execution.batch_size
    ablation = make_ablation(config.size.ablation, adapter, graph, task, batch)
    return ablation, CircuitEvaluator(adapter, graph, task, "heldout", batch, ablation)


def find(config: DiscoverConfig, prepared: Prepared, reporter: Reporter, checkpoints: Path) -> Found:
    """Run the configured method (``circuitfinder.methods.registry.METHODS``) on the discovery prompts."""
    problem = Problem(
        prepared.adapter,
        prepared.graph,
        prepared.task,
        config,
        prepared.ablation,
        reporter,
        checkpoints,
        prepared.precision,
    )
    found = METHODS[config.method].find(problem)
    outcome = found.search
    if outcome is not None:
        st = outcome.result.state
        reporter.log(
            f"{config.method}: {outcome.result.candidates:,} candidates, "
            f"{outcome.result.evaluated:,} evaluated by patching ({st.rows:,} circuits in {st.chains:,} chains, "
            f"{st.wasted_rows:,} on wrong guesses), {outcome.forward_passes:,} forward passes, {outcome.seconds:.0f} s"
            + (f" over {outcome.sittings} sittings" if outcome.sittings > 1 else "")
        )
    return found


def measure(config: DiscoverConfig, prepared: Prepared, found: Found, reporter: Reporter) -> Measured:
    """The circuit's exact faithfulness on the held-out prompts (again on a float32 copy of the model
    when the precision plan says so), and the faithfulness curve when the run wants one."""
    graph, circuit = prepared.graph, found.circuit
    faithfulness = prepared.heldout.faithfulness(circuit)
    kept = int(circuit.sum())
    reporter.log(
        f"circuit: {kept:,} of {graph.n_edges:,} edges ({kept / graph.n_edges:.2%}), "
        f"{node_count(graph, circuit)} nodes; faithfulness {faithfulness:.3f} (held-out, exact, "
        f"{dtype_name(prepared.adapter.dtype)})"
    )
    found_faithfulness = None
    if prepared.precision.remeasure:  # what is reported is the circuit in float32, on a float32 copy of the model
        found_faithfulness, found_dtype = faithfulness, dtype_name(prepared.adapter.dtype)
        prepared.reload(config, torch.float32, reporter)
        faithfulness = prepared.heldout.faithfulness(circuit)
        reporter.log(
            f"circuit in float32: faithfulness {faithfulness:.3f} (held-out, exact; {found_faithfulness:.3f} "
            f"in {found_dtype}); baseline {prepared.baseline}"
        )
    if faithfulness < config.size.target_faithfulness:
        reporter.log(below_target(faithfulness, config))
    curve = held_out_curve(config, prepared, found.scores, reporter) if wants_curve(config) and found.ranked else None
    return Measured(faithfulness, found_faithfulness, curve)


def held_out_curve(config: DiscoverConfig, prepared: Prepared, scores: torch.Tensor, reporter: Reporter) -> Curve:
    """Held-out faithfulness of the top edges by score at the MIB edge fractions, on Ray actors
    (split by prompt batches, as attribution is) when the run has workers."""
    metrics, e = None, config.execution
    if e.workers:
        from functools import partial

        from circuitfinder.methods.pool import ray_metrics

        load = partial(load_model, config.model, check=False, dtype=prepared.adapter.dtype, device=e.device)
        metrics = partial(
            ray_metrics, load, prepared.task, "heldout", e.batch_size, e.workers, e.address, config.size.ablation
        )
        reporter.log(f"faithfulness curve on {e.workers} Ray worker(s)")
    with reporter.progress("faithfulness curve (held-out)", 10) as advance:
        curve = faithfulness_curve(prepared.heldout, scores, progress=advance, metrics=metrics)
    reporter.log(
        "curve (held-out): "
        + ", ".join(f"{p:g}% {f:.2f}" for p, _, _, f in curve.points)
        + f"; CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}"
    )
    return curve


def summarise(config: DiscoverConfig, prepared: Prepared, found: Found, measured: Measured, started: float) -> Summary:
    """The run's :class:`~circuitfinder.runs.summary.Summary`."""
    b, f = prepared.baseline, measured.faithfulness
    outcome, search, curve = found.search, found.size_search, measured.curve
    searching = METHODS[config.method].seeded
    task, graph = prepared.task, prepared.graph
    searched = (
        None if outcome is None else search_record(outcome, graph, prepared.heldout, found.scores)
    )  # before the count
    return Summary(
        model=config.model,
        task=config.task,
        method=config.method,
        ablation=config.size.ablation,
        metric=task.metric_name,
        edges_total=graph.n_edges,
        edges_selected=int(found.selected.sum()),
        edges_kept=int(found.circuit.sum()),
        nodes_kept=node_count(graph, found.circuit),
        faithfulness=f,
        metric_clean=b.clean,
        metric_corrupted=b.corrupted,
        metric_circuit=b.corrupted + f * (b.clean - b.corrupted),
        accuracy_clean=b.accuracy,
        prompts_discovery=len(task.indices("discovery")),
        prompts_heldout=len(task.indices("heldout")),
        target_faithfulness=config.size.target_faithfulness,
        meets_target=f >= config.size.target_faithfulness,
        dtype=dtype_name(prepared.adapter.dtype),
        device=str(prepared.adapter.device),
        precision=precision_record(prepared.precision, found, measured),
        forward_passes=found.forward_passes + prepared.heldout.forward_passes,
        seconds=round(time.perf_counter() - started, 2),
        size_search_target=None
        if search is None
        else seed_target(config)
        if searching
        else config.size.target_faithfulness,
        size_search=None
        if search is None
        else [{"top_n": n, "edges_kept": k, "faithfulness_discovery": x} for n, k, x in search.points],
        curve=None if curve is None else [[p / 100, x] for p, _, _, x in curve.points],
        cpr=None if curve is None else curve.cpr,
        cmd=None if curve is None else curve.cmd,
        search=searched,
        peak_memory_mb=peak_memory_mb(prepared.adapter.device),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def precision_record(precision: PrecisionPlan, found: Found, measured: Measured) -> dict:
    """The precision plan as ``summary.json`` keeps it, with what it measured: the circuit's
    faithfulness in the dtype it was found in (after a re-measure), and the referee's decisions."""
    record = precision.to_json() | {"found_faithfulness": measured.found_faithfulness, "referee_decisions": None}
    if precision.referee and found.search is not None:
        referee = found.search.rule["referee"]
        record["referee_decisions"] = {
            k: referee.get(k) for k in ("passes_dtype", "why_float32", "decided", "overruled")
        }
    return record


def search_record(outcome, graph: EdgeGraph, heldout: CircuitEvaluator, scores: torch.Tensor) -> dict:
    """The search's rule and cost, and the seed's own top-N circuit of the same size for comparison."""
    st = outcome.result.state
    n = int(outcome.circuit.sum())
    same_size = prune(graph, top_edges(graph, scores, n))
    return outcome.rule | {
        "candidates": outcome.result.candidates,
        "evaluated": outcome.result.evaluated,
        "circuits_evaluated": st.rows,
        "wasted_on_wrong_guesses": st.wasted_rows,
        "chains": st.chains,
        "forward_passes": outcome.forward_passes,
        "seconds": round(outcome.seconds, 1),
        "sittings": outcome.sittings,
        "ray_startup_seconds": None if outcome.ray_seconds is None else round(outcome.ray_seconds, 1),
        "seed_top_n_same_size": None
        if not scores.any()
        else {"top_n": n, "edges_kept": int(same_size.sum()), "faithfulness_heldout": heldout.faithfulness(same_size)},
    }


def check_memory(
    adapter: ModelAdapter, task: Task, batch_size: int, reporter: Reporter, copy: torch.dtype | None = None
) -> None:
    """Say the run's memory plan (``circuitfinder.engine.plan``) before the heavy work, and refuse
    a batch that cannot fit the device's free memory, naming the largest that does. ``copy``: the
    dtype of a second copy of the weights the run loads (a refereed search's passes)."""
    from circuitfinder.engine.plan import (
        BYTES,
        format_bytes,
        free_memory,
        largest_batch,
        memory_plan,
        shape_from_config,
    )

    shape = shape_from_config(adapter.name, adapter.hf_config)
    positions = int(task.lengths.max())
    plan = memory_plan(shape, adapter.dtype, batch_size, positions, adapter.device)
    copied = shape.n_params * BYTES[copy] if copy is not None else 0
    need = plan.working + copied
    free = free_memory(adapter.device)
    reporter.log(
        f"memory plan: {format_bytes(need)} for batches of {batch_size} × {positions} positions, "
        f"beyond the loaded model"
        + (f" (of it {format_bytes(copied)} for the search's {dtype_name(copy)} copy)" if copied else "")
        + f"; {format_bytes(free)} free on {adapter.device}"
    )
    if need > free:
        fits = largest_batch(
            shape,
            free - copied + plan.loaded + plan.terms["libraries"],
            adapter.dtype,
            positions,
            device=adapter.device,
        )
        raise UserError(
            f"batches of {batch_size} need {format_bytes(need)} and {adapter.device} has "
            f"{format_bytes(free)} free: pass `batch_size={max(fits, 1)}`" + ("" if fits else " (even one may not fit)")
        )


def check_behaviour(baseline: Baseline, config: DiscoverConfig, model: str) -> None:
    """Refuse (unless ``execution.force``) to look for the circuit of a behaviour the model lacks.

    The model shows a behaviour when its clean metric exceeds the corrupted one and, where the
    task's answers are outputs to choose between, it prefers the right answer to the wrong one on
    at least ``MIN_ACCURACY`` of the held-out prompts.
    """
    if config.execution.force:
        return
    ranked = baseline.accuracy is not None
    if baseline.clean <= baseline.corrupted or ranked and baseline.accuracy < MIN_ACCURACY:
        raise UserError(
            f"{model} does not show the behaviour of task {config.task!r} (held-out: clean metric "
            f"{baseline.clean:.3g}, corrupted {baseline.corrupted:.3g}"
            + (
                f", accuracy {baseline.accuracy:.0%}; needs clean > corrupted and accuracy ≥ {MIN_ACCURACY:.0%}"
                if ranked
                else "; needs clean > corrupted"
            )
            + "); pass `force=True` to search anyway"
        )


def below_target(faithfulness: float, config: DiscoverConfig) -> str:
    """What a run says when its circuit misses the target on the held-out prompts, and what to try."""
    size = config.size
    chosen = "chosen on" if size.edges is None and size.threshold is None else "fixed for"
    return (
        f"below target: the circuit keeps {faithfulness:.3f} of the behaviour on held-out prompts, under the target "
        f"{size.target_faithfulness} (its edges were {chosen} the discovery prompts). Try more prompt pairs "
        "(`n_pairs`), a larger circuit (`edges`, `threshold`, or a higher `target_faithfulness`), or a smaller `tau`"
    )


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: the GPU's allocated peak, or the resident set on a CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e6, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)  # Linux: KiB


def run_name(config: DiscoverConfig) -> str:
    """``TASK-MODEL-METHOD``, safe as a folder name (a task file by its stem)."""

    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")

    task = Path(config.task).stem if is_task_file(config.task) else config.task
    return f"{safe(task)}-{safe(config.model)}-{config.method}"


def default_out_dir(config: DiscoverConfig, root: Path = Path("outputs")) -> Path:
    """``outputs/TASK-MODEL-METHOD-TIME``."""
    return root / f"{run_name(config)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prompt_rows(task: Task) -> list[dict]:
    """Every prompt pair of a task as text, with its split (the rows of ``prompts.jsonl``)."""
    return [
        {k: text[k] for k in ("clean", "corrupted", "answer", "wrong")} | {"split": split}
        for text, split in zip(task.texts, task.split)
    ]
