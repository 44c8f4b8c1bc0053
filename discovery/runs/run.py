"""A discovery run: model + task → edge scores → circuit → exact held-out faithfulness → run folder.

Every step is a plain function of the library; this module only sequences them, reports
progress and writes the results. A run folder is written whole or not at all: files go to a
hidden temporary folder beside the target, which is renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from circuitfinder.engine.ablation import ABLATIONS, make_ablation
from circuitfinder.engine.adapter import ModelAdapter, load_unchecked
from circuitfinder.engine.checks import load_model
from circuitfinder.engine.models import resolve_device
from circuitfinder.engine.precision import HALF, dtype_name, resolve_dtype
from circuitfinder.methods.attribution import IG_RULES
from circuitfinder.methods.registry import METHODS, UNSEEDED, Problem, Reporter, check_method, seed_target
from circuitfinder.engine.masks import node_count, prune, top_edges
from circuitfinder.errors import OutputExists, UserError
from circuitfinder.folders import atomic_dir, check_out_dir
from circuitfinder.engine.faithfulness import Baseline, CircuitEvaluator, Curve, faithfulness_curve
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.engine.faithfulness import DISTANCES
from circuitfinder.methods.search import decisions_table
from circuitfinder.graphs.circuit import Circuit
from circuitfinder.graphs.explorer import write_explorer
from circuitfinder.graphs.tables import nodes_table, read_scores, scores_table
from circuitfinder.tasks import TASKS, Task, build_task, is_task_file




@dataclass(frozen=True)
class DiscoverConfig:
    """Everything that decides a discovery run; saved as ``config.json`` beside its results."""

    task: str = "ioi"
    model: str = "smollm2-135m"
    method: str = "acdc-groups"  # the minimal faithful circuit; "eap-ig": attribution's top-N alone (the quick look)
    edges: int | None = None  # keep the top-N edges by |score| …
    threshold: float | None = None  # … or every edge with |score| ≥ threshold …
    target_faithfulness: float = 0.8  # … or else the smallest top-N found to reach this (discovery split)
    ig_steps: int = 5  # interpolation steps of EAP-IG
    ig_rule: str = "midpoint"  # EAP-IG's interpolation points: midpoint, left (published, inputs), right (published, activations)
    bos: str = "auto"  # "auto": the tokenizer's own rule (SmolLM2 adds no BOS, Gemma does); "always": prepend it
    ablation: str = "counterfactual"  # what a removed edge carries: counterfactual, mean or zero
    seed_method: str = "eap-ig"  # for --method acdc: the attribution that orders and bounds the search ("none": all edges)
    seed_faithfulness: float | None = None  # a search's seed: the smallest top-N reaching this (None: halfway from target_faithfulness to 1, room above the floor)
    tau: float | None = None  # ACDC threshold on the distance; None: 1 % of the empty circuit's distance
    acdc_metric: str = "task"  # ACDC's distance from the clean run: "task" (|mean metric change|), "prompt" (mean per-prompt |change|) or "kl" (Conmy et al.'s)
    floor: bool = True  # acdc, acdc-groups: a removal also keeps target_faithfulness on the search prompts
    minimize: bool = False  # prune the chosen circuit edge by edge while it keeps the target faithfulness
    search_prompts: int = 32  # discovery prompts that ACDC / --minimize evaluate on (faithfulness is then held-out)
    chain: int = 16  # the most candidates evaluated per speculative chain (each chain's length adapts)
    workers: int = 0  # Ray actors: attribution split by prompt batches, ACDC / --minimize circuits (0: in this process)
    address: str | None = None  # an existing Ray cluster to join
    curve: bool | None = None  # held-out faithfulness at the MIB edge fractions; None: for attribution's top-N only
    roles: bool = True  # measure every head's role on the run's prompts (seconds); the circuit's heads by role
    force: bool = False  # search even when the model does not show the behaviour
    skip_bad_rows: bool = False  # for a task file: drop invalid rows instead of refusing the file
    check_model: bool = True  # verify at load that the engine is exact on the model (circuitfinder.engine.checks)
    n_pairs: int = 128
    batch_size: int = 16
    seed: int = 0
    dtype: str = "auto"  # the model's dtype: auto (float32 for a search; for attribution alone bfloat16 where the hardware computes it, the circuit re-measured in float32), float32, bfloat16, float16 or float64
    referee: bool = True  # a search in half precision: float32 scores the seed, re-decides removals within half precision's error of the threshold, and measures the circuit
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:N or mps

    def __post_init__(self) -> None:
        if self.minimize and METHODS.get(self.method, METHODS["minimize"]).score is not None:
            # minimize=True with an attribution method (the older spelling): minimisation seeded by it
            object.__setattr__(self, "seed_method", self.method)
            object.__setattr__(self, "method", "minimize")
        object.__setattr__(self, "minimize", False)

    def validate(self, task_given: bool = False) -> None:
        """Refuse a configuration that cannot run, naming the argument to fix.

        Args:
            task_given: the task is passed built, so ``task`` is only its name.

        Raises:
            UserError: with ``argument`` set to the field to fix.
        """
        def need(ok: bool, argument: str, message: str) -> None:
            if not ok:
                raise UserError(message, argument)

        if not task_given and is_task_file(self.task):
            need(Path(self.task).is_file(), "task", f"no task file at {self.task}")
        elif not task_given:
            need(self.task in TASKS, "task",
                 f"unknown task {self.task!r}: use one of {', '.join(sorted(TASKS))}, or a .jsonl or .csv task file")
        need(self.ablation in ABLATIONS, "ablation", f"unknown ablation {self.ablation!r}: use one of {', '.join(ABLATIONS)}")
        check_method(self.method, self.seed_method, self.ablation)
        seeded = ", ".join(n for n, m in METHODS.items() if m.seeded)
        need(self.seed_method != UNSEEDED or METHODS[self.method].seeded, "seed_method",
             f"`seed_method` {UNSEEDED!r} is for the seeded methods ({seeded})")
        need(self.tau is None or self.tau >= 0, "tau", f"`tau` must be a number ≥ 0, got {self.tau}")
        need(self.acdc_metric in DISTANCES, "acdc_metric",
             f"`acdc_metric` must be one of {', '.join(DISTANCES)}, got {self.acdc_metric!r}")
        need(self.search_prompts >= 1, "search_prompts", f"`search_prompts` must be at least 1, got {self.search_prompts}")
        need(self.chain >= 1, "chain", f"`chain` must be at least 1, got {self.chain}")
        need(self.workers >= 0, "workers", f"`workers` must be ≥ 0, got {self.workers}")
        need(self.edges is None or self.threshold is None, "edges", "give `edges` or `threshold`, not both")
        need(self.edges is None or self.edges >= 1, "edges", f"`edges` must be at least 1, got {self.edges}")
        need(self.threshold is None or self.threshold >= 0, "threshold",
             f"`threshold` must be a number ≥ 0, got {self.threshold}")
        need(0 < self.target_faithfulness <= 1, "target_faithfulness",
             f"`target_faithfulness` must be in (0, 1], got {self.target_faithfulness}")
        need(self.seed_faithfulness is None or self.target_faithfulness <= self.seed_faithfulness <= 1, "seed_faithfulness",
             f"`seed_faithfulness` must be at least `target_faithfulness` ({self.target_faithfulness}) and at most 1, "
             f"got {self.seed_faithfulness}")
        need(self.seed_faithfulness is None or METHODS[self.method].seeded, "seed_faithfulness",
             f"`seed_faithfulness` is for the seeded searches ({seeded}); attribution's own size uses `target_faithfulness`")
        need(self.n_pairs >= 4, "n_pairs", f"`n_pairs` must be at least 4, got {self.n_pairs}")
        need(self.ig_steps >= 1, "ig_steps", f"`ig_steps` must be at least 1, got {self.ig_steps}")
        need(self.ig_rule in IG_RULES, "ig_rule", f"`ig_rule` must be one of {', '.join(IG_RULES)}, got {self.ig_rule!r}")
        need(self.bos in ("auto", "always"), "bos", f"`bos` must be auto or always, got {self.bos!r}")
        need(self.batch_size >= 1, "batch_size", f"`batch_size` must be at least 1, got {self.batch_size}")
        try:
            resolve_dtype(self.dtype, resolve_device(self.device), self.model)
        except UserError as exc:
            raise UserError(str(exc), "dtype" if "dtype" in str(exc) else "device") from None

    @property
    def wants_curve(self) -> bool:
        """Whether the run measures the MIB curve: ``curve`` when given, else only for attribution's
        top-N. The curve ranks edges by attribution's scores, so after a search it describes the seed,
        not the circuit found, and costs about a tenth of the run."""
        if self.curve is not None:
            return self.curve
        method = METHODS.get(self.method)
        return method is not None and method.score is not None

    def matching_published(self) -> "DiscoverConfig":
        """This configuration with every choice the published EAP-IG code makes (hannamw/EAP-IG):
        the BOS token always prepended, and its interpolation points (``left`` on the inputs,
        ``right`` on activations). Its scores then equal that code's (divided by the prompt count)."""
        rule = "right" if self.method == "eap-ig-activations" else "left"
        return dataclasses.replace(self, bos="always", ig_rule=rule)


def check_memory(adapter: ModelAdapter, task: Task, batch_size: int, reporter: Reporter,
                 copy: torch.dtype | None = None) -> None:
    """Say the run's memory plan (``circuitfinder.engine.plan``) before the heavy work, and refuse
    a batch that cannot fit the device's free memory, naming the largest that does. ``copy``: the
    dtype of a second copy of the weights the run loads (a refereed search's passes)."""
    from circuitfinder.engine.plan import BYTES, format_bytes, free_memory, largest_batch, memory_plan, shape_from_config

    shape = shape_from_config(adapter.name, adapter.hf_config)
    positions = int(task.lengths.max())
    plan = memory_plan(shape, adapter.dtype, batch_size, positions, adapter.device)
    copied = shape.n_params * BYTES[copy] if copy is not None else 0
    need = plan.working + copied
    free = free_memory(adapter.device)
    reporter.log(f"memory plan: {format_bytes(need)} for batches of {batch_size} × {positions} positions, "
                 f"beyond the loaded model" + (f" (of it {format_bytes(copied)} for the search's "
                                               f"{dtype_name(copy)} copy)" if copied else "")
                 + f"; {format_bytes(free)} free on {adapter.device}")
    if need > free:
        fits = largest_batch(shape, free - copied + plan.loaded + plan.terms["libraries"], adapter.dtype, positions,
                             device=adapter.device)
        raise UserError(f"batches of {batch_size} need {format_bytes(need)} and {adapter.device} has "
                        f"{format_bytes(free)} free: pass `batch_size={max(fits, 1)}`" + ("" if fits else " (even one may not fit)"))


def referee_fits(config: DiscoverConfig, half: torch.dtype, device: torch.device,
                 reporter: Reporter) -> tuple[torch.dtype | None, torch.dtype]:
    """``(the search passes' dtype, the model's)`` for a half-precision search: ``(half, float32)``
    when the memory plan of the float32 model and a half-precision copy fits the device (a shape
    that cannot be read without loading is taken to fit), else ``(None, half)``: no referee."""
    from circuitfinder.engine.plan import format_bytes, free_memory, plan_shape, refereed_total

    try:
        shape = plan_shape(config.model)
    except Exception:  # noqa: BLE001 -- a shape the plan cannot read leaves the check to the load
        return half, torch.float32
    need = refereed_total(shape, half, config.batch_size, 32, device)
    free = free_memory(device)
    if need <= free:
        return half, torch.float32
    smaller = next((b for b in range(config.batch_size - 1, 0, -1)
                    if refereed_total(shape, half, b, 32, device) <= free), 0)
    reporter.log(f"no float32 referee: the float32 model and a {dtype_name(half)} copy need {format_bytes(need)} for "
                 f"batches of {config.batch_size}, {device} has {format_bytes(free)} free; the search runs in "
                 f"{dtype_name(half)} alone" + (f" (`--batch-size {smaller}` leaves room for the referee)" if smaller else ""))
    return None, half


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: the GPU's allocated peak, or the resident set on a CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e6, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)  # Linux: KiB


def build_run_task(config: DiscoverConfig, tokenizer) -> Task:
    """The run's task: built for the tokenizer, with the BOS token prepended when ``config.bos`` says so."""
    task = build_task(config.task, tokenizer, n_pairs=config.n_pairs, seed=config.seed, skip_bad_rows=config.skip_bad_rows)
    if config.bos == "always":
        if tokenizer.bos_token_id is None:
            raise UserError(f"`bos='always'`: the tokenizer of {config.model} has no BOS token", "bos")
        task = task.with_bos(tokenizer.bos_token_id)
    return task


def run_name(config: DiscoverConfig) -> str:
    """``TASK-MODEL-METHOD``, safe as a folder name (a task file by its stem)."""
    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")

    task = Path(config.task).stem if is_task_file(config.task) else config.task
    return f"{safe(task)}-{safe(config.model)}-{config.method}"


def default_out_dir(config: DiscoverConfig, root: Path = Path("outputs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{run_name(config)}-{stamp}"


def prompt_rows(task: Task) -> list[dict]:
    """Every prompt pair of a task as text, with its split (the rows of ``prompts.jsonl``)."""
    return [{k: text[k] for k in ("clean", "corrupted", "answer", "wrong")} | {"split": split}
            for text, split in zip(task.texts, task.split)]


MIN_ACCURACY = 0.6  # below this the model does not show the behaviour well enough to have a circuit for it


def check_behaviour(baseline, config: DiscoverConfig, model: str) -> None:
    """Refuse (unless ``config.force``) to look for the circuit of a behaviour the model lacks.

    The model shows a behaviour when its clean metric exceeds the corrupted one and, where the
    task's answers are outputs to choose between, it prefers the right answer to the wrong one on
    at least ``MIN_ACCURACY`` of the held-out prompts.
    """
    if config.force:
        return
    ranked = baseline.accuracy is not None
    if baseline.clean <= baseline.corrupted or ranked and baseline.accuracy < MIN_ACCURACY:
        raise UserError(
            f"{model} does not show the behaviour of task {config.task!r} (held-out: clean metric "
            f"{baseline.clean:.3g}, corrupted {baseline.corrupted:.3g}" + (
                f", accuracy {baseline.accuracy:.0%}; needs clean > corrupted and accuracy ≥ {MIN_ACCURACY:.0%}"
                if ranked else "; needs clean > corrupted") + "); pass `force=True` to search anyway"
        )


def run_config(config: DiscoverConfig, out: Path | None = None, overwrite: bool = False,
               reporter: Reporter | None = None, adapter: ModelAdapter | None = None, task: Task | None = None) -> "Run":
    """Run discovery as ``config`` says; write the run folder when ``out`` is given.

    Args:
        config: what to run.
        out: the run folder to write (nothing is written when None, except an iterative search's
            checkpoints, kept under ``outputs/.checkpoints`` then).
        overwrite: replace an existing run folder.
        reporter: receives messages and progress (silent when None).
        adapter: an already loaded model; loaded (and checked) from ``config.model`` when None.
        task: an already built task; built from ``config.task`` when None.
    """
    reporter = reporter or Reporter()
    config.validate(task_given=task is not None)
    if out is not None:
        out = Path(out)
        check_out_dir(out, overwrite)
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    verify_in_float32 = False  # auto chose half precision: the circuit found is re-measured in float32
    search_dtype = None  # a refereed search's passes: half precision, with the run's model in float32
    searching = METHODS[config.method].seeded  # a patching search (its decisions need float32)
    if adapter is None:
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device, config.model)
        auto_half = config.dtype == "auto" and dtype in HALF
        if auto_half and searching:
            dtype, auto_half = torch.float32, False
            reporter.log(f"auto: float32 on {device} for a search (bfloat16's rounding moves a removal's change of "
                         "distance by about half of ACDC's τ; `--dtype bfloat16` runs the passes it can settle in bfloat16)")
        elif dtype in HALF and config.referee and searching:
            search_dtype, dtype = referee_fits(config, dtype, device, reporter)
        verify_in_float32 = auto_half
        chosen = ", chosen by auto: this device computes it natively" if auto_half else ""
        if search_dtype is not None:
            reporter.log(f"loading {config.model} (float32 on {device}; the search's passes in "
                         f"{dtype_name(search_dtype)} where they can settle its removals, refereed in float32)")
        else:
            reporter.log(f"loading {config.model} ({dtype_name(dtype)} on {device}"
                         + (f"{chosen}; the circuit is re-measured in float32)" if verify_in_float32 else ")"))
        adapter = load_model(config.model, reporter.log, check=config.check_model, dtype=dtype, device=device)
    elif adapter.dtype in HALF and searching:
        reporter.log(f"the search runs in {dtype_name(adapter.dtype)} alone, without a float32 referee (the model was "
                     "given loaded in it; give its name to have float32 referee the search)")
    task = task if task is not None else build_run_task(config, adapter.tokenizer)
    for note in task.notes:
        reporter.log(f"task: {note}")
    graph = EdgeGraph(adapter.shape)
    if adapter.shape.post_norm and config.ablation != "counterfactual":
        raise UserError(f"{adapter.name} normalises its heads' sum (a shared post-attention norm): mean/zero "
                        "ablation is not defined for it yet; use the counterfactual ablation")
    n_disc, n_held = len(task.indices("discovery")), len(task.indices("heldout"))
    reporter.log(
        f"{adapter.name}: {adapter.shape.n_layers} layers, {adapter.shape.n_heads} heads, "
        f"{adapter.shape.n_kv_groups} key/value groups: {graph.n_edges:,} edges"
    )
    reporter.log(f"task {task.name}: {len(task)} prompt pairs ({n_disc} discovery, {n_held} held-out), metric {task.metric_name}")
    check_memory(adapter, task, config.batch_size, reporter, search_dtype)

    def held_out(model: ModelAdapter) -> tuple:
        """The run's ablation on ``model`` and its evaluator on the held-out prompts."""
        made = make_ablation(config.ablation, model, graph, task, config.batch_size)
        return made, CircuitEvaluator(model, graph, task, "heldout", config.batch_size, made)

    ablation, heldout = held_out(adapter)
    b = heldout.baseline
    reporter.log(f"baseline (held-out): {b}")
    check_behaviour(b, config, adapter.name)

    method = METHODS[config.method]
    for name in (config.method, config.seed_method if method.seeded and config.seed_method != UNSEEDED else None):
        refusal = name and METHODS[name].refusal(name, config.ablation, adapter.shape.post_norm)
        if refusal:
            raise UserError(f"{adapter.name}: {refusal}")
    # checkpoints are keyed by the dtype of the passes, not "auto"
    refereed = search_dtype is not None or (config.referee and adapter.dtype not in HALF)  # False: a search in half precision alone
    settings = dataclasses.replace(config, dtype=dtype_name(search_dtype or adapter.dtype), referee=refereed)
    problem = Problem(adapter, graph, task, settings, ablation, reporter, out.parent if out is not None else Path("outputs"),
                      search_dtype)
    found = method.find(problem)
    scores, chosen, circuit, search, outcome = found.scores, found.selected, found.circuit, found.size_search, found.search
    attribution_passes = found.forward_passes
    if outcome is not None:
        st = outcome.result.state
        reporter.log(
            f"{config.method}: {outcome.result.candidates:,} candidates, "
            f"{outcome.result.evaluated:,} evaluated by patching ({st.rows:,} circuits in {st.chains:,} chains, "
            f"{st.wasted_rows:,} on wrong guesses), {outcome.forward_passes:,} forward passes, {outcome.seconds:.0f} s"
            + (f" over {outcome.sittings} sittings" if outcome.sittings > 1 else "")
        )
    faithfulness = heldout.faithfulness(circuit)
    edges_kept, nodes_kept = int(circuit.sum()), node_count(graph, circuit)
    reporter.log(
        f"circuit: {edges_kept:,} of {graph.n_edges:,} edges ({edges_kept / graph.n_edges:.2%}), {nodes_kept} nodes; "
        f"faithfulness {faithfulness:.3f} (held-out, exact, {dtype_name(adapter.dtype)})"
    )
    if search_dtype is not None:  # a refereed search: the dtype of its passes, and what its referee decided
        search_dtype = {"dtype": dtype_name(search_dtype), "refereed_by": "float32",
                        **{k: outcome.rule["referee"].get(k) for k in ("passes_dtype", "why_float32", "decided", "overruled")}}
    if verify_in_float32:  # what is reported is the circuit in float32, on a float32 copy of the model
        search_dtype = {"dtype": dtype_name(adapter.dtype), "faithfulness": faithfulness}
        del problem, ablation, heldout, adapter  # the half-precision model goes before the float32 one loads
        adapter = load_model(config.model, reporter.log, check=config.check_model, dtype=torch.float32, device=device)
        ablation, heldout = held_out(adapter)
        b = heldout.baseline
        faithfulness = heldout.faithfulness(circuit)
        reporter.log(f"circuit in float32: faithfulness {faithfulness:.3f} (held-out, exact; "
                     f"{search_dtype['faithfulness']:.3f} in {search_dtype['dtype']}); baseline {b}")
    meets_target = faithfulness >= config.target_faithfulness
    if not meets_target:
        reporter.log(below_target(faithfulness, config))

    curve = None
    if config.wants_curve and found.ranked:  # the curve ranks edges by score
        metrics = None
        if config.workers:  # split by prompt batches over Ray actors, as attribution is
            from functools import partial

            from circuitfinder.methods.pool import ray_metrics

            load = partial(load_model, config.model, check=False, dtype=adapter.dtype, device=config.device)
            metrics = partial(ray_metrics, load, task, "heldout", config.batch_size, config.workers, config.address,
                              config.ablation)
            reporter.log(f"faithfulness curve on {config.workers} Ray worker(s)")
        with reporter.progress("faithfulness curve (held-out)", 10) as advance:
            curve = faithfulness_curve(heldout, scores, progress=advance, metrics=metrics)
        reporter.log("curve (held-out): " + ", ".join(f"{p:g}% {f:.2f}" for p, _, _, f in curve.points)
                     + f"; CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}")

    summary = {
        "model": config.model,
        "task": config.task,
        "method": config.method,
        "ablation": config.ablation,
        "metric": task.metric_name,
        "edges_total": graph.n_edges,
        "edges_selected": int(chosen.sum()),
        "edges_kept": edges_kept,
        "nodes_kept": nodes_kept,
        "faithfulness": faithfulness,
        "metric_clean": b.clean,
        "metric_corrupted": b.corrupted,
        "metric_circuit": b.corrupted + faithfulness * (b.clean - b.corrupted),
        "accuracy_clean": b.accuracy,
        "prompts_discovery": n_disc,
        "prompts_heldout": n_held,
        "target_faithfulness": config.target_faithfulness,
        "meets_target": meets_target,
        "size_search_target": None if search is None else seed_target(config) if method.seeded else config.target_faithfulness,
        "size_search": None if search is None else [
            {"top_n": n, "edges_kept": k, "faithfulness_discovery": f} for n, k, f in search.points
        ],
        "curve": None if curve is None else [[p / 100, f] for p, _, _, f in curve.points],
        "cpr": None if curve is None else curve.cpr,
        "cmd": None if curve is None else curve.cmd,
        "search": None if outcome is None else _search_summary(outcome, graph, heldout, scores),
        "forward_passes": attribution_passes + heldout.forward_passes,
        "seconds": round(time.perf_counter() - started, 2),
        "dtype": dtype_name(adapter.dtype),  # the dtype of the reported faithfulness (and baseline)
        "search_dtype": search_dtype,  # auto in half precision: the dtype the circuit was found in, and its faithfulness there
        "device": str(adapter.device),
        "peak_memory_mb": peak_memory_mb(adapter.device),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": True,
    }
    circuit = Circuit(graph, circuit, scores, model=config.model, task=config.task, method=config.method,
                      metadata={"faithfulness": faithfulness, "edges_total": graph.n_edges})
    tables = {}
    if outcome is not None:
        tables = {"certificate": _certificate(summary, outcome), "necessity": pd.DataFrame(outcome.necessity),
                  "decisions": decisions_table(graph, outcome, scores)}
    run = Run(config=config, circuit=circuit, summary=summary, baseline=b, curve=curve,
              prompts=prompt_rows(task), tables=tables, task=task)
    if config.roles:
        with reporter.progress("head roles (clean prompts)", 0):
            run.roles(adapter)
        reporter.log("heads by role: " + ("; ".join(f"{r} {', '.join(h)}" for r, h in summary["heads_by_role"].items()) or "none labelled"))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    if out is not None:
        run.save(out, overwrite=overwrite, reporter=reporter)
    if found.checkpoint is not None:  # the search is saved in the run folder (or returned): its checkpoint goes
        found.checkpoint.clear()
    return run


def below_target(faithfulness: float, config: DiscoverConfig) -> str:
    """What a run says when its circuit misses the target on the held-out prompts, and what to try."""
    chosen = "chosen on" if config.edges is None and config.threshold is None else "fixed for"
    return (f"below target: the circuit keeps {faithfulness:.3f} of the behaviour on held-out prompts, under the target "
            f"{config.target_faithfulness} (its edges were {chosen} the discovery prompts). Try more prompt pairs "
            "(`n_pairs`), a larger circuit (`edges`, `threshold`, or a higher `target_faithfulness`), or a smaller `tau`")


def discover(model: "str | ModelAdapter" = "smollm2-135m", task: "str | Task" = "ioi", method: str = DiscoverConfig.method, *,
             out: Path | None = None, overwrite: bool = False, reporter: Reporter | None = None, **options) -> "Run":
    """Find the circuit of ``task`` in ``model`` and check it by exact patching on held-out prompts.

    Args:
        model: a bundled model's name, a Hugging Face id, a local folder, or a model already
            loaded with :func:`circuitfinder.load_unchecked`.
        task: a task name (``circuitfinder.tasks.TASKS``), a ``.jsonl``/``.csv`` task file, or a
            :class:`~circuitfinder.tasks.Task` already built for this model's tokenizer.
        method: a name of :data:`circuitfinder.methods.registry.METHODS` (``circuits methods`` lists them).
        out: a run folder to write (see :meth:`Run.save`); nothing is written when None.
        overwrite: replace ``out`` if it holds results.
        reporter: receives messages and progress (silent when None).
        **options: any other field of :class:`DiscoverConfig` (``edges``, ``target_faithfulness``,
            ``ig_steps``, ``n_pairs``, ``seed``, ...).

    Returns:
        the :class:`Run`: scores, circuit, baseline, faithfulness, curve and the search's log.

    Example::

        run = discover("smollm2-135m", "ioi")
        run.circuit.top(200).prune().draw()
    """
    adapter = None if isinstance(model, str) else model
    built = None if isinstance(task, str) else task
    config = DiscoverConfig(model=model if adapter is None else adapter.name,
                            task=task if built is None else built.name, method=method, **options)
    return run_config(config, out=out, overwrite=overwrite, reporter=reporter, adapter=adapter, task=built)


def _search_summary(outcome, graph: EdgeGraph, heldout: CircuitEvaluator, scores: torch.Tensor) -> dict:
    """The search's cost, and the seed's own top-N circuit of the same size for comparison."""
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
        "seed_top_n_same_size": None if not scores.any() else {
            "top_n": n, "edges_kept": int(same_size.sum()), "faithfulness_heldout": heldout.faithfulness(same_size)},
    }


def _certificate(summary: dict, outcome) -> dict:
    """What the circuit is certified to do: exact faithfulness, size, and each edge's necessity."""
    return {
        "model": summary["model"], "task": summary["task"], "method": summary["method"],
        "faithfulness_heldout": summary["faithfulness"], "prompts_heldout": summary["prompts_heldout"],
        "edges": summary["edges_kept"], "nodes": summary["nodes_kept"],
        "search": summary["search"],
        "necessity": sorted(outcome.necessity, key=lambda e: -abs(e["metric_drop"])),
    }


@dataclass(eq=False)
class Run:
    """A discovery run: what was asked, every edge's score, the circuit and its exact faithfulness.

    ``discover`` returns one; :meth:`save` writes it as a run folder and :meth:`load` reads one
    back (without the model: ``task`` is then None and ``prompts`` holds the prompts as text).

    Attributes:
        config: the run's :class:`DiscoverConfig`.
        circuit: the :class:`~circuitfinder.graphs.circuit.Circuit`, knowing every edge's score.
        summary: what ``summary.json`` holds (held-out faithfulness, baselines, sizes, costs).
        baseline: clean and corrupted metric and clean accuracy on the held-out prompts.
        curve: held-out faithfulness at the MIB edge fractions, or None.
        prompts: every prompt pair as text, with its split.
        tables: the search's log when there was one: ``certificate`` (dict), ``necessity`` and
            ``decisions`` (DataFrames); after :meth:`roles`, ``roles`` (DataFrame) and
            ``attention`` (the circuit's heads' attention patterns on three clean prompts, a dict).
        task: the task, when the run was made in this process.
        out: the folder it was saved to or loaded from.
    """

    config: DiscoverConfig
    circuit: Circuit
    summary: dict
    baseline: Baseline
    curve: Curve | None = None
    prompts: list[dict] = dataclasses.field(default_factory=list)
    tables: dict = dataclasses.field(default_factory=dict)
    task: Task | None = None
    out: Path | None = None

    @property
    def scores(self) -> torch.Tensor:
        """Every edge's score, ``[senders, receivers]`` (float64; NaN off the graph's edges)."""
        return self.circuit.scores

    @property
    def faithfulness(self) -> float:
        """The circuit's exact faithfulness on the held-out prompts."""
        return self.summary["faithfulness"]

    def evaluate(self, reference: str | None = None) -> dict:
        """Grade the circuit and its scores against a published circuit (default: the task's;
        ``circuitfinder.graphs.evaluate.evaluate_circuit``): precision, recall, ROC-AUC."""
        from circuitfinder.graphs.evaluate import evaluate_circuit

        seeded = METHODS[self.config.method].seeded
        return evaluate_circuit(self.circuit, reference, self.config.seed_method if seeded else self.config.method)

    def roles(self, model: ModelAdapter, max_prompts: int = 64) -> pd.DataFrame:
        """Measure every head's role on the run's prompts (``circuitfinder.graphs.roles``): the
        circuit takes the roles of its heads, ``tables["roles"]`` the table of every head (returned),
        and ``summary["heads_by_role"]`` the circuit's heads by role."""
        from circuitfinder.graphs.roles import attention_patterns, measure_roles

        task = self.task if self.task is not None else build_run_task(self.config, model.tokenizer)
        table = measure_roles(model, task, max_prompts=max_prompts, batch_size=self.config.batch_size)
        self.circuit = self.circuit.with_roles(table)
        self.tables["roles"] = table
        self.tables["attention"] = attention_patterns(model, task, self.circuit.heads())
        self.summary["heads_by_role"] = heads_by_role(self.circuit)
        return table

    def __repr__(self) -> str:
        where = f", {self.out}" if self.out else ""
        return (f"Run({self.config.task} · {self.config.model} · {self.config.method}: {self.circuit.n_edges:,} of "
                f"{self.circuit.graph.n_edges:,} edges, faithfulness {self.faithfulness:.3f} held-out{where})")

    def save(self, out: Path, overwrite: bool = False, reporter: Reporter | None = None) -> Path:
        """Write the run folder whole or not at all (``circuitfinder.folders.atomic_dir``).

        Files: ``config.json``, ``summary.json``, ``scores.parquet``, ``nodes.csv``,
        ``circuit.json``, ``circuit.svg``, ``circuit.html`` (the explorer), ``prompts.jsonl``; ``curve.csv``/``curve.png`` with a
        curve; ``certificate.json``, ``necessity.csv``, ``decisions.csv`` after a search; ``roles.csv`` and
        ``attention.json`` after :meth:`roles`.

        Raises:
            OutputExists: ``out`` holds results and ``overwrite`` is off.
        """
        reporter = reporter or Reporter()
        out = Path(out)
        check_out_dir(out, overwrite)
        with atomic_dir(out, overwrite) as tmp:
            (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=1) + "\n")
            scores_table(self.circuit).to_parquet(tmp / "scores.parquet", index=False)
            nodes_table(self.circuit).to_csv(tmp / "nodes.csv", index=False)
            self.circuit.save(tmp / "circuit.json")
            with open(tmp / "prompts.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.prompts)
            _render(self.circuit, tmp / "circuit", reporter)
            for name in ("certificate", "attention"):
                if name in self.tables:
                    (tmp / f"{name}.json").write_text(json.dumps(self.tables[name], indent=1 if name == "certificate" else None) + "\n")
            for name in ("necessity", "decisions", "roles"):
                if name in self.tables:
                    self.tables[name].to_csv(tmp / f"{name}.csv", index=False)
            if self.curve is not None:
                pd.DataFrame(self.curve.rows()).to_csv(tmp / "curve.csv", index=False)
                _plot_curve(self.curve, f"{self.config.task} · {self.config.model} · {self.config.method}", tmp / "curve.png")
            (tmp / "summary.json").write_text(json.dumps({k: v for k, v in self.summary.items() if k != "out"}, indent=1) + "\n")
            write_explorer(tmp)  # circuit.html, from the files above
        self.out = out
        self.summary["out"] = str(out)
        reporter.log(f"wrote {out}")
        return out

    @classmethod
    def load(cls, run_dir: Path) -> "Run":
        """Read a run folder written by :meth:`save` (or by ``circuits discover``).

        Raises:
            UserError: not a run folder, or one whose files do not fit together.
        """
        from circuitfinder.graphs.circuit import load_circuit

        run_dir = Path(run_dir)
        config = load_run_config(run_dir)
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{run_dir} has no readable summary.json ({exc})") from None
        circuit = load_circuit(run_dir)
        if (run_dir / "scores.parquet").is_file():
            circuit = circuit.replace(scores=torch.where(circuit.mask, circuit.scores, read_scores(run_dir / "scores.parquet", circuit.graph)))
        curve = None
        if (run_dir / "curve.csv").is_file():
            rows = pd.read_csv(run_dir / "curve.csv")
            curve = Curve(tuple((float(r.percent), int(r.top_n), int(r.edges_kept), float(r.faithfulness)) for r in rows.itertuples()),
                          summary.get("cpr"), summary.get("cmd"))
        prompts = []
        if (run_dir / "prompts.jsonl").is_file():
            prompts = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines() if line.strip()]
        tables = {}
        for name in ("certificate", "attention"):
            if (run_dir / f"{name}.json").is_file():
                tables[name] = json.loads((run_dir / f"{name}.json").read_text())
        for name in ("necessity", "decisions", "roles"):
            if (run_dir / f"{name}.csv").is_file():
                tables[name] = pd.read_csv(run_dir / f"{name}.csv")
        baseline = Baseline(summary["metric_clean"], summary["metric_corrupted"], summary.get("accuracy_clean"),
                            summary.get("prompts_heldout"))
        return cls(config, circuit, summary | {"out": str(run_dir)}, baseline, curve, prompts, tables, None, run_dir)


def heads_by_role(circuit: Circuit) -> dict[str, list[str]]:
    """The circuit's heads grouped by role label (a head with two labels is listed under each),
    in layer order; heads with no role are left out."""
    out: dict[str, list[str]] = {}
    for head in circuit.heads():
        role = (circuit.roles.get(head) or {}).get("role")
        for label in (role.split(", ") if role else ()):
            out.setdefault(label, []).append(head)
    return dict(sorted(out.items()))


def _render(circuit: Circuit, path: Path, reporter: Reporter) -> None:
    """Draw ``circuit.svg``; without the ``dot`` program, write ``circuit.dot`` and say so."""
    formats = ("svg",) if shutil.which("dot") else ("dot",)
    if formats == ("dot",):
        reporter.log("Graphviz's dot program is missing: wrote circuit.dot only (install graphviz for SVG)")
    try:
        circuit.draw(path, formats=formats, max_edges=300)  # a minimal circuit (≤ 300 edges) whole
    except ValueError as exc:
        reporter.log(f"no diagram: {exc}")


def load_run_config(run_dir: Path) -> DiscoverConfig:
    """The configuration a run folder was made with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    try:
        return DiscoverConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{path} is not a valid run configuration ({exc})") from None


def validate_run(run_dir: Path, top: int = 40, random: int = 60, overwrite: bool = False,
                 reporter: Reporter = Reporter(), adapter: ModelAdapter | None = None) -> dict:
    """Compare a run's attribution scores with exact single-edge effects on the same prompts.

    Writes ``validation.csv`` (edge, group, score, exact effect), ``validation.json`` (Pearson and
    Spearman correlation, overall and by group) and ``validation.png`` (a scatter plot) into the
    run folder. Returns the correlations.
    """
    from circuitfinder.methods.validation import correlations, exact_edge_effects, pick_edges

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    targets = [run_dir / n for n in ("validation.csv", "validation.json", "validation.png")]
    if any(t.exists() for t in targets) and not overwrite:
        raise OutputExists(f"{run_dir} already holds a validation: pass `overwrite=True` to redo it")
    if top < 0 or random < 0 or top + random < 3:
        raise UserError("`top` and `random` must be ≥ 0 and give at least 3 edges together", "top")
    if adapter is None:
        reporter.log(f"loading {config.model}")
        adapter = load_unchecked(config.model, reporter.log)
    task = build_run_task(config, adapter.tokenizer)
    graph = EdgeGraph(adapter.shape)
    scores = read_scores(run_dir / "scores.parquet", graph)
    edges, groups = pick_edges(graph, scores, top, random, seed=config.seed)
    with reporter.progress(f"exact effects of {len(edges)} edges", len(edges) * len(list(task.batches("discovery", config.batch_size)))) as advance:
        effects = exact_edge_effects(adapter, graph, task, edges, "discovery", config.batch_size, progress=advance,
                                     ablation=config.ablation)
    frame = pd.DataFrame({
        "edge": [graph.edge_name(s, r) for s, r in edges], "group": groups,
        "score": [float(scores[s, r]) for s, r in edges], "exact_effect": effects.numpy(),
    })
    result = {"method": config.method, "edges": len(edges), "all": correlations(torch.tensor(frame.score, device="cpu"), effects)}
    for group in ("top", "random"):
        part = frame[frame.group == group]
        if len(part) >= 3:
            result[group] = correlations(torch.tensor(part.score.to_numpy(), device="cpu"), torch.tensor(part.exact_effect.to_numpy(), device="cpu"))
    _scatter(frame, result, run_dir / ".validation.png.tmp")
    frame.to_csv(run_dir / ".validation.csv.tmp", index=False)
    (run_dir / ".validation.json.tmp").write_text(json.dumps(result, indent=1) + "\n")
    for t in targets:
        os.replace(t.with_name(f".{t.name}.tmp"), t)
    reporter.log(f"{config.method} against exact single-edge patching on {len(edges)} edges: "
                 f"Pearson {result['all']['pearson']:.3f}, Spearman {result['all']['spearman']:.3f}")
    return result


def _figure(width: float, height: float):
    """A figure drawn without pyplot: no backend is switched, so a notebook's inline plots keep working."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150)
    return fig, fig.subplots()


def _plot_curve(curve, title: str, path: Path) -> None:
    fig, ax = _figure(5, 3.5)
    xs = [p for p, *_ in curve.points]
    ax.plot(xs, [f for *_, f in curve.points], marker="o")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of all, top by |score|)")
    ax.set_ylabel("faithfulness (held-out, exact)")
    ax.set_title(f"{title}: CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _scatter(frame: pd.DataFrame, result: dict, path: Path) -> None:
    fig, ax = _figure(5, 5)
    for group, marker in (("random", "o"), ("top", "^")):
        part = frame[frame.group == group]
        ax.scatter(part.exact_effect, part.score, s=14, marker=marker, alpha=0.7, label=f"{group} ({len(part)})")
    low = min(frame.exact_effect.min(), frame.score.min())
    high = max(frame.exact_effect.max(), frame.score.max())
    ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--", label="score = effect")
    ax.set_xlabel("exact effect: m(edge patched) − m(clean)")
    ax.set_ylabel(f"{result['method']} score")
    ax.set_title(f"{result['method']}: Pearson {result['all']['pearson']:.2f}, Spearman {result['all']['spearman']:.2f}")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def roles_for_run(run_dir, max_prompts: int = 64, overwrite: bool = False, reporter=None, adapter=None):
    """Measure the roles of a run's model on its task's prompts; write ``roles.csv``, ``roles.md``
    and ``attention.json`` (the circuit's heads on three clean prompts), and redraw ``circuit.html``.

    Returns:
        The roles table (every head of the model).
    """
    from circuitfinder.graphs.circuit import load_circuit
    from circuitfinder.graphs.roles import attention_patterns, measure_roles
    from circuitfinder.graphs.tables import to_markdown

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    target = run_dir / "roles.csv"
    if target.exists() and not overwrite:
        raise OutputExists(f"{target} exists: pass `overwrite=True` to measure the roles again")
    log = reporter.log if reporter is not None else (lambda _m: None)
    if adapter is None:
        log(f"loading {config.model}")
        adapter = load_unchecked(config.model, log)
    task = build_run_task(config, adapter.tokenizer)
    table = measure_roles(adapter, task, max_prompts=max_prompts, batch_size=config.batch_size)
    table.to_csv(target, index=False)
    labelled = table[table.role.notna()]
    (run_dir / "roles.md").write_text(
        f"# Head roles: {config.task} on {config.model} ({min(max_prompts, len(task))} clean prompts)\n\n"
        + to_markdown(labelled, floatfmt=".3f") + "\n")
    attention = attention_patterns(adapter, task, load_circuit(run_dir).heads())
    (run_dir / "attention.json").write_text(json.dumps(attention) + "\n")
    write_explorer(run_dir)
    return table
