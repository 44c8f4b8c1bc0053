"""The ``circuits`` command: a thin layer over the library's functions.

Bad input is reported in one line on stderr with exit status 2 and no traceback (``--debug``
shows it).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from circuitfinder.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, check and draw the circuits behind a language model's behaviours.")
tasks_app = typer.Typer(no_args_is_help=True, help="List and inspect tasks.")
app.add_typer(tasks_app, name="tasks")
console = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


class ConsoleReporter:
    """Prints run messages and progress bars to stderr."""

    def log(self, message: str) -> None:
        console.print(as_flags(message), markup=False)

    @contextmanager
    def progress(self, description: str, total: int):
        if not console.is_terminal:  # a log file or a pipe: a line per tenth instead of a live bar
            yield _progress_lines(description, total)
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as bar:
            handle = bar.add_task(description, total=total or None)
            yield lambda n=1: bar.advance(handle, n)


def _progress_lines(description: str, total: int, every: float = 0.1):
    """An ``advance(n)`` that prints ``description: done/total (p%), elapsed`` at each tenth of ``total``."""
    start, state = time.monotonic(), {"done": 0, "next": every * total}

    def advance(n: int = 1) -> None:
        state["done"] += n
        if total and state["done"] >= state["next"]:
            while state["next"] <= state["done"]:
                state["next"] += every * total
            elapsed = time.monotonic() - start
            console.print(f"{description}: {state['done']:,}/{total:,} ({state['done'] / total:.0%}), {elapsed:.0f} s")

    return advance


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


@app.command()
def discover(
    task: str = typer.Option("ioi", "--task", help="Task name (see `circuits tasks list`)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Bundled model name, Hugging Face id or local folder."),
    method: str = typer.Option("acdc-groups", "--method", help="acdc-groups (default: the minimal faithful circuit, ACDC's rule on groups of edges), acdc or minimize (patching searches seeded by --seed-method); eap-ig (attribution's top-N alone: the quick look), eap, eap-ig-activations; see `circuits methods`."),
    seed_method: str = typer.Option("eap-ig", "--seed-method", help="acdc/minimize: attribution that orders and bounds the candidates; none: every edge, in graph order (textbook ACDC)."),
    seed_faithfulness: Optional[float] = typer.Option(None, "--seed-faithfulness", help="Searches: the seed is attribution's smallest top N reaching this on the discovery prompts (default: halfway from --target-faithfulness to 1, 0.9 for 0.8), which leaves the search room above the floor."),
    tau: Optional[float] = typer.Option(None, "--tau", help="acdc: keep a removal when the distance grows by less than this (default: 1% of the empty circuit's distance)."),
    acdc_metric: str = typer.Option("task", "--acdc-metric", help="acdc, acdc-groups: distance from the clean run: task (|change of the mean metric|, the default: a faithful circuit), prompt (mean per-prompt |change|, which cannot cancel across prompts) or kl (ACDC's own; at its default τ it keeps a quarter to a third of the behaviour)."),
    floor: bool = typer.Option(True, "--floor/--no-floor", help="acdc, acdc-groups: a removal also needs the circuit to keep --target-faithfulness on the search prompts (ACDC's rule alone bounds each removal's growth, not their sum); --no-floor: Conmy et al.'s rule alone."),
    minimize: bool = typer.Option(False, "--minimize", help="Shorthand for --method minimize --seed-method METHOD: remove edges one by one while the target faithfulness holds."),
    search_prompts: int = typer.Option(32, "--search-prompts", help="acdc, acdc-groups, minimize: discovery prompts each candidate is evaluated on (16 overfit on IOI: the circuit fell short on held-out prompts)."),
    chain: int = typer.Option(16, "--chain", help="acdc/--minimize: the most candidates evaluated together (speculatively) per chain; each chain's length adapts to how often guesses are right."),
    workers: int = typer.Option(0, "--workers", help="Ray actors with a model replica each (one GPU each where there are GPUs): attribution is split by prompt batches over them, and acdc/--minimize score their circuits on them (0: in this process)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join an existing Ray cluster at this address (with --workers)."),
    ig_steps: int = typer.Option(5, "--ig-steps", help="Interpolation steps of eap-ig."),
    ig_rule: str = typer.Option("midpoint", "--ig-rule", help="EAP-IG's interpolation points: midpoint ((k+½)/m), left (k/m, k<m: the published code on inputs) or right (k/m, k≥1: on activations)."),
    bos: str = typer.Option("auto", "--bos", help="auto: the tokenizer's own rule (SmolLM2 adds no BOS token, Gemma does); always: prepend it, as the published EAP-IG code does."),
    match_published: bool = typer.Option(False, "--match-published", help="Every choice the published EAP-IG code makes (--bos always and its --ig-rule): its scores, divided by the prompt count."),
    ablation: str = typer.Option("counterfactual", "--ablation", help="What a removed edge carries: counterfactual (the corrupted prompt), mean (over the task's prompts) or zero."),
    curve: Optional[bool] = typer.Option(None, "--curve/--no-curve", help="Measure faithfulness at the MIB edge fractions (CPR, CMD); by default for attribution's top-N, not after a search (the curve ranks by attribution)."),
    roles: bool = typer.Option(True, "--roles/--no-roles", help="Measure every head's role on the run's prompts (seconds): roles.csv, and the circuit's heads by role."),
    force: bool = typer.Option(False, "--force", help="Search even if the model does not show the behaviour."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Task files: drop invalid rows instead of refusing the file."),
    skip_model_check: bool = typer.Option(False, "--skip-model-check", help="Do not verify at load that patching is exact on the model."),
    edges: Optional[int] = typer.Option(None, "--edges", help="Keep the top N edges by |score|."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep edges with |score| ≥ T."),
    target_faithfulness: float = typer.Option(0.8, "--target-faithfulness", help="Without --edges/--threshold: smallest top-N reaching this."),
    pairs: int = typer.Option(128, "--pairs", help="Prompt pairs (half discovery, half held-out)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and split."),
    dtype: str = typer.Option("auto", "--dtype", help="The model's dtype: auto (float32 for a search; for attribution alone, bfloat16 where this device computes it natively, with the circuit re-measured in float32), float32, bfloat16, float16 or float64. Scores and metrics are summed in float32/float64."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps."),
    referee: bool = typer.Option(True, "--referee/--no-referee", help="A search in bfloat16/float16: float32 scores the seed, re-decides the removals within half precision's error of the threshold and measures the circuit, so the search finds float32's circuit (--no-referee: everything in half precision)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: outputs/TASK-MODEL-METHOD-TIME)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
) -> None:
    """Find the circuit of a task in a model and check it by exact patching."""
    from circuitfinder.runs.run import DiscoverConfig, default_out_dir, run_config

    config = DiscoverConfig(task=task, model=model, method=method, edges=edges, threshold=threshold,
                            target_faithfulness=target_faithfulness, ig_steps=ig_steps, ig_rule=ig_rule, bos=bos,
                            ablation=ablation, curve=curve, roles=roles, force=force,
                            skip_bad_rows=skip_bad_rows, check_model=not skip_model_check, n_pairs=pairs, batch_size=batch_size, seed=seed,
                            seed_method=seed_method, seed_faithfulness=seed_faithfulness, tau=tau, acdc_metric=acdc_metric, floor=floor, minimize=minimize,
                            search_prompts=search_prompts, chain=chain, workers=workers, address=address,
                            dtype=dtype, device=device, referee=referee)
    if match_published:
        config = config.matching_published()
    summary = run_config(config, out=out or default_out_dir(config), overwrite=overwrite, reporter=ConsoleReporter()).summary
    print(
        f"{summary['task']} on {summary['model']} ({summary['method']}): "
        f"clean {summary['metric_clean']:.3f}, corrupted {summary['metric_corrupted']:.3f}; "
        f"{summary['edges_kept']:,}/{summary['edges_total']:,} edges, {summary['nodes_kept']} nodes; "
        f"faithfulness {summary['faithfulness']:.3f} (held-out, {summary['dtype']}"
        + (f"; {summary['search_dtype']['faithfulness']:.3f} in {summary['search_dtype']['dtype']}, where it was found"
           if (summary.get("search_dtype") or {}).get("faithfulness") is not None else "")
        + _refereed(summary.get("search_dtype") or {})
        + ("" if summary["meets_target"] else f"; BELOW the target {summary['target_faithfulness']}") + f") -> {summary['out']}"
    )


def _refereed(search_dtype: dict) -> str:
    """What the summary line says of a half-precision search refereed in float32."""
    if not search_dtype.get("refereed_by"):
        return ""
    if search_dtype["passes_dtype"] == "float32":
        return f"; searched in float32: {search_dtype['why_float32']}"
    return (f"; searched in {search_dtype['dtype']}, {search_dtype['decided']:,} removals decided again in float32, "
            f"{search_dtype['overruled']:,} of them overruled")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


@app.command()
def sweep(
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated tasks (names or task files)."),
    models: str = typer.Option(..., "--models", help="Comma-separated models (bundled names, Hugging Face ids, folders)."),
    methods: str = typer.Option("eap-ig", "--methods", help="Comma-separated methods."),
    out: Path = typer.Option(Path("outputs/sweep"), "--out", help="Sweep folder: one run folder per task-model-method, and sweep.csv/sweep.md."),
    workers: int = typer.Option(0, "--workers", help="Runs at once, as Ray tasks (0: one after another in this process; each run already uses every core)."),
    cpus_per_run: int = typer.Option(1, "--cpus-per-run", help="With --workers: CPUs (torch threads) Ray gives each run."),
    address: Optional[str] = typer.Option(None, "--address", help="With --workers: join an existing Ray cluster (its machines must see --out)."),
    edges: Optional[int] = typer.Option(None, "--edges", help="Keep the top N edges by |score|."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep edges with |score| ≥ T."),
    target_faithfulness: float = typer.Option(0.8, "--target-faithfulness", help="Without --edges/--threshold: smallest top-N reaching this."),
    ig_steps: int = typer.Option(5, "--ig-steps", help="Interpolation steps of eap-ig."),
    ablation: str = typer.Option("counterfactual", "--ablation", help="counterfactual, mean or zero."),
    curve: Optional[bool] = typer.Option(None, "--curve/--no-curve", help="Measure faithfulness at the MIB edge fractions (CPR, CMD); by default for attribution's top-N, not after a search (the curve ranks by attribution)."),
    force: bool = typer.Option(False, "--force", help="Search even if a model does not show the behaviour."),
    pairs: int = typer.Option(128, "--pairs", help="Prompt pairs (half discovery, half held-out)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo runs that already finished."),
) -> None:
    """Discover every task × model × method (skipping finished runs) and write one comparison table."""
    from circuitfinder.runs.run import DiscoverConfig
    from circuitfinder.runs.sweep import sweep as run_sweep

    base = DiscoverConfig(edges=edges, threshold=threshold, target_faithfulness=target_faithfulness, ig_steps=ig_steps,
                          ablation=ablation, curve=curve, force=force, n_pairs=pairs, batch_size=batch_size, seed=seed)
    try:
        frame = run_sweep(_names(tasks), _names(models), _names(methods), out=out, base=base, workers=workers,
                          cpus=cpus_per_run, address=address, overwrite=overwrite, reporter=ConsoleReporter())
    except KeyboardInterrupt:
        console.print(f"interrupted: finished runs are kept in {out}; rerun the same command to skip them and go on")
        sys.exit(130)
    counts = frame.status.value_counts()
    print(f"{len(frame)} runs: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("finished", "skipped", "failed"))
          + f" -> {out / 'sweep.md'}")
    if counts.get("failed", 0):
        sys.exit(1)


@app.command()
def validate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `circuits discover`."),
    top: int = typer.Option(40, "--top", help="Edges with the largest |score| to check."),
    random: int = typer.Option(60, "--random", help="Other edges, drawn at random, to check."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo an existing validation."),
) -> None:
    """Compare a run's scores with exact single-edge patching (Pearson, Spearman, scatter plot)."""
    from circuitfinder.runs.run import validate_run

    result = validate_run(run_dir, top=top, random=random, overwrite=overwrite, reporter=ConsoleReporter())
    parts = [f"{k}: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}" for k, v in result.items() if isinstance(v, dict)]
    print(f"{result['method']} vs exact edge effects ({result['edges']} edges) - " + "; ".join(parts))


def _reference_help() -> str:
    from circuitfinder.graphs.references import available

    return f"A published circuit: {', '.join(available())} (default: the one for the run's task)."


@app.command()
def evaluate(
    run_dir: Optional[Path] = typer.Argument(None, help="A run folder written by `circuits discover`, or a circuit.json."),
    reference: Optional[str] = typer.Option(None, "--reference", help=_reference_help()),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo an existing evaluation against this reference."),
    list_: bool = typer.Option(False, "--list", help="List the reference circuits and exit."),
) -> None:
    """Grade a run's circuit and scores against a published circuit (ROC-AUC, precision, recall)."""
    from circuitfinder.graphs.references import available, read

    if list_:
        for name in available():
            ref = read(name)
            auc = ref.get("published", {}).get("acdc_edge_roc_auc")
            print(f"{name}: {ref['title']} (task {ref['task']}, model {ref['model']}"
                  + (f"; published ACDC edge ROC-AUC {auc}" if auc is not None else "") + ")")
        return
    if run_dir is None:
        raise UserError("give a run folder (circuits evaluate RUN_DIR --reference NAME), or --list")
    from circuitfinder.graphs.evaluate import evaluate_run, format_table

    result = evaluate_run(run_dir, reference=reference, overwrite=overwrite)
    print(format_table(result))
    print(f"-> {result['out']}")


@app.command()
def render(
    source: Path = typer.Argument(..., help="A run folder or a circuit.json file."),
    fmt: str = typer.Option("svg", "--format", help="svg, pdf, png or dot (comma-separated for several)."),
    style: str = typer.Option("default", "--style", help="default, paper (print-safe, greyscale) or summary (default at node level)."),
    level: str = typer.Option("edge", "--level", help="edge (q/k/v inputs) or node (heads and MLPs as units)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output path without suffix (default: beside the circuit)."),
    max_edges: int = typer.Option(200, "--max-edges", help="Edge level: draw at most this many of the strongest edges."),
    max_nodes: int = typer.Option(30, "--max-nodes", help="Node level: draw the heaviest N heads and MLPs (and 2N links)."),
) -> None:
    """Draw a saved circuit (no model needed); head roles come from roles.csv beside it."""
    from circuitfinder.graphs.circuit import load_circuit

    circuit = load_circuit(source)
    path = source / "circuit.json" if source.is_dir() else source
    if not circuit.n_edges:
        raise UserError(f"{path} holds an empty circuit: nothing to draw")
    try:
        written = circuit.draw(out or path.with_suffix(""), formats=[f.strip() for f in fmt.split(",")],
                               style=style, max_edges=max_edges, level=level, max_nodes=max_nodes)
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    for p in written:
        print(p)


def _parse_bytes(text: str) -> int:
    """``80GB``, ``512MB``, ``1.5e9``: a number of bytes (decimal units)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kMGT]?B?)\s*", text)
    scale = {"": 1, "B": 1, "kB": 1e3, "k": 1e3, "MB": 1e6, "M": 1e6, "GB": 1e9, "G": 1e9, "TB": 1e12, "T": 1e12}
    try:
        return int(float(m.group(1)) * scale[m.group(2)])
    except (AttributeError, ValueError, KeyError):
        raise UserError(f"--memory {text!r} is not a size: write e.g. 80GB or 512MB") from None


@app.command()
def plan(
    model: str = typer.Option("smollm2-135m", "--model", help="Bundled name, Hugging Face id, local folder, a known configuration (llama-3-8b, gemma-2-2b, gpt2) or a shape by hand: layers=32,heads=32,groups=8,d_model=4096,d_mlp=14336,vocab=128256."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    positions: int = typer.Option(24, "--positions", help="Tokens per prompt (IOI's are about 15-20)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory to fit in, e.g. 80GB (default: the device's free memory)."),
    device: str = typer.Option("cpu", "--device", help="cpu (the tokenizer and the libraries share its memory), cuda, cuda:N or mps (they stay in host memory), or auto."),
) -> None:
    """Print a run's memory plan (weights, sender buffers, activations, scores) without loading weights."""
    from circuitfinder.engine.plan import format_bytes, free_memory, largest_batch, memory_plan, plan_shape, refereed_total
    from circuitfinder.engine.precision import HALF, dtype_name, parse_dtype

    torch_dtype = parse_dtype(dtype)
    if batch_size < 1 or positions < 1:
        raise UserError("--batch-size and --positions must be at least 1")
    from circuitfinder.engine.models import parse_device, resolve_device

    device = str((parse_device if memory else resolve_device)(device))  # free memory is read only where it exists
    budget = _parse_bytes(memory) if memory else free_memory(device)
    shape = plan_shape(model)
    p = memory_plan(shape, torch_dtype, batch_size, positions, device)
    print(f"{shape.name}: {shape.n_layers} layers, {shape.n_heads} heads, {shape.n_kv_groups} key/value groups, "
          f"d_model {shape.d_model}, d_mlp {shape.d_mlp}, vocab {shape.d_vocab:,}; {shape.n_params:,} parameters; "
          f"{shape.n_edges:,} edges ({shape.n_senders:,} senders × {shape.n_receivers:,} receivers)")
    print(f"memory plan on {device} in {dtype_name(torch_dtype)}, batches of {batch_size} prompts × {positions} positions "
          f"(attribution, the heaviest stage):")
    for name, size in p.rows():
        if size:
            print(f"  {name:<22} {format_bytes(size):>10}")
    fits = largest_batch(shape, budget, torch_dtype, positions, device=device)
    where = f"{memory}" if memory else f"the free {format_bytes(budget)} of {device}"
    print(f"largest batch that fits {where}: {fits}" if fits else f"does not fit {where}, not even one prompt per batch")
    if torch_dtype in HALF:
        refereed = refereed_total(shape, torch_dtype, batch_size, positions, device)
        print(f"a search in {dtype_name(torch_dtype)} refereed in float32 (the default; `--no-referee` runs it in "
              f"{dtype_name(torch_dtype)} alone): the float32 model's plan and this copy of the weights, "
              f"{format_bytes(refereed)}" + ("" if refereed <= budget else f", more than {where}"))


@app.command()
def methods() -> None:
    """List the methods: what each does, what it costs, and what it supports."""
    from circuitfinder.methods.registry import METHODS
    from circuitfinder.runs.run import DiscoverConfig

    for name, m in METHODS.items():
        supports = f"ablations: {', '.join(m.ablations)}" + ("" if m.post_norm else "; not on post-norm models")
        default = " (default)" if name == DiscoverConfig.method else ""
        print(f"{name + default:<20} {m.description}\n{'':<20} cost: {m.cost}; {supports}")


@app.command()
def models() -> None:
    """List the bundled models, whether they are cached, and their edge counts."""
    from circuitfinder.engine.adapter import ModelShape
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.engine.models import BUNDLED, DEFAULT_MODEL, is_cached

    for name, spec in BUNDLED.items():
        shape = ModelShape(*spec.shape)
        flag = "cached" if is_cached(name) else "not yet converted"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {spec.hf_id}, {shape.n_layers} layers, {shape.n_heads} heads, "
              f"{shape.n_kv_groups} kv group{'s' * (shape.n_kv_groups != 1)}, {EdgeGraph(shape).n_edges:,} edges; {flag}")


@tasks_app.command("list")
def tasks_list() -> None:
    """List the built-in tasks."""
    from circuitfinder.tasks import DESCRIPTIONS, TASKS

    for name in sorted(TASKS):
        print(f"{name}: {DESCRIPTIONS.get(name, '')}")


@tasks_app.command("show")
def tasks_show(
    name: str = typer.Argument(..., help="A task name or a .jsonl/.csv task file."),
    model: str = typer.Option("smollm2-135m", "--model", help="Model whose tokenizer builds the prompts and whose baseline is shown."),
    pairs: int = typer.Option(128, "--pairs", help="Prompt pairs."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and split."),
    examples: int = typer.Option(3, "--examples", help="Prompt pairs to print."),
) -> None:
    """Show a few prompt pairs of a task and the model's baseline on it."""
    from circuitfinder.engine.adapter import load_unchecked
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.tasks import build_task

    adapter = load_unchecked(model, ConsoleReporter().log)
    task = build_task(name, adapter.tokenizer, n_pairs=pairs, seed=seed)
    print(f"task {task.name}: {len(task)} pairs ({len(task.indices('discovery'))} discovery, "
          f"{len(task.indices('heldout'))} held-out), metric {task.metric_name}")
    for text in task.texts[:examples]:
        print(f"  clean:     {text['clean']!r}\n  corrupted: {text['corrupted']!r}\n"
              f"  answer: {text['answer']!r}   wrong: {text['wrong']!r}")
    b = CircuitEvaluator(adapter, EdgeGraph(adapter.shape), task, "heldout").baseline
    print(f"baseline on {model} (held-out): {b}")


@app.command()
def compare(
    a: Path = typer.Argument(..., help="Circuit A: a run folder or a circuit.json file."),
    b: Path = typer.Argument(..., help="Circuit B: a run folder or a circuit.json file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: outputs/compare-A-vs-B)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    bins: int = typer.Option(5, "--bins", help="Bins of relative depth for aligning models of different depth."),
    fmt: str = typer.Option("svg,png", "--format", help="Diff diagram formats: svg, pdf, png, dot (comma-separated)."),
    max_edges: int = typer.Option(150, "--max-edges", help="Same model: node links of the union to draw."),
) -> None:
    """Compare two circuits (same model: Jaccard and overlaps; any models: by relative depth and role)."""
    from circuitfinder.graphs.compare import compare as run_compare

    m = run_compare(a, b, out=out, overwrite=overwrite, bins=bins, formats=tuple(f.strip() for f in fmt.split(",")),
                    max_edges=max_edges)
    if m["same_model_shape"]:
        print(f"node Jaccard {m['node_jaccard']:.3f}, edge Jaccard {m['edge_jaccard']:.3f}, overlap at equal size "
              f"{m['overlap_at_equal_size']:.3f} (k={m['equal_size_k']}), weighted overlap {m['weighted_overlap']:.3f} -> {m['out']}")
    else:
        print(f"different model shapes: compared by relative depth ({bins} bins) and role -> {m['out']}")


@app.command()
def view(run_dir: Path = typer.Argument(..., help="A run folder (its circuit.html) or a compare folder (its compare.html).")) -> None:
    """Open a run's explorer page in the browser (or print its path where there is none)."""
    import webbrowser

    page = next((run_dir / n for n in ("circuit.html", "compare.html") if (run_dir / n).is_file()), None)
    if page is None:
        raise UserError(f"{run_dir} has no circuit.html or compare.html: pass a run or compare folder")
    graphical = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not (graphical and webbrowser.open(page.resolve().as_uri())):  # a terminal browser would block: print it
        print(page)


@app.command()
def roles(
    run_dir: Path = typer.Argument(..., help="A run folder written by `circuits discover`."),
    prompts: int = typer.Option(64, "--prompts", help="Clean prompts of the run's task to measure on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Measure again over an existing roles.csv."),
) -> None:
    """Score every head's role (previous-token, duplicate, induction, mover) on the run's prompts: roles.csv, and the circuit's heads' attention patterns in circuit.html."""
    from circuitfinder.graphs.circuit import load_circuit
    from circuitfinder.runs.run import roles_for_run

    if prompts < 1:
        raise UserError(f"--prompts must be at least 1, got {prompts}")
    table = roles_for_run(run_dir, max_prompts=prompts, overwrite=overwrite, reporter=ConsoleReporter())
    record = load_circuit(run_dir)
    labelled = {n: r["role"] for n, r in record.roles.items() if r.get("role")}
    print(f"{int(table.role.notna().sum())} of {len(table)} heads have a role; in the circuit: "
          + (", ".join(f"{n} ({r})" for n, r in sorted(labelled.items())) or "none") + f" -> {run_dir / 'roles.csv'}")


@app.command()
def tables(
    source: Path = typer.Argument(..., help="A run folder or a circuit.json file."),
    top: int = typer.Option(20, "--top", help="Edges in the top-edges table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write into (default: beside the circuit)."),
) -> None:
    """Write per-layer counts and the top edges with head roles, as CSV and Markdown."""
    from circuitfinder.graphs.circuit import load_circuit
    from circuitfinder.graphs.tables import write_tables

    if top < 1:
        raise UserError(f"--top must be at least 1, got {top}")
    record = load_circuit(source)
    folder = out or (source if source.is_dir() else source.parent)
    for p in write_tables(record, folder, top=top):
        print(p)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A run folder, a circuit.json, a .graphml written by this tool, or an EAP-IG/MIB graph JSON."),
    to: str = typer.Option(..., "--to", help="graphml, mib (EAP-IG/MIB graph JSON) or circuit (circuit.json)."),
    out: Path = typer.Option(..., "--out", help="File to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
    d_model: Optional[int] = typer.Option(None, "--d-model", help="mib: the model's width, if the tool cannot tell."),
) -> None:
    """Convert a circuit between circuit.json, GraphML and the EAP-IG/MIB graph format."""
    import json as _json

    from circuitfinder.graphs.circuit import load_circuit
    from circuitfinder.graphs.formats import from_mib, save_graphml, save_mib

    if to not in ("graphml", "mib", "circuit"):
        raise UserError(f"unknown --to {to!r}: use graphml, mib or circuit")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: choose another --out, or pass --overwrite")
    path = source / "circuit.json" if source.is_dir() else source
    try:
        data = _json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and "cfg" in data and "schema" not in data:
        record = from_mib(data, source=str(path))
    elif path.suffix == ".graphml":
        from circuitfinder.graphs.circuit import from_networkx
        from circuitfinder.graphs.formats import load_graphml

        record = from_networkx(load_graphml(path))
    else:
        record = load_circuit(source)
    scores = None
    if to == "mib" and (path.parent / "scores.parquet").is_file():
        import pandas as pd

        table = pd.read_parquet(path.parent / "scores.parquet", columns=["edge", "score"])
        scores = dict(zip(table["edge"], table["score"].astype(float)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if to == "graphml":
        save_graphml(record.to_networkx(), out)
    elif to == "mib":
        save_mib(record, out, scores=scores, d_model=d_model)
    else:
        record.save(out)
    extra = f" (all {len(scores):,} edge scores from scores.parquet)" if scores else ""
    print(f"{record.n_edges:,} circuit edges -> {out}{extra}")


INTERRUPTED = "interrupted: no results were written (a search's checkpoint is kept: rerun the same command to resume)"


def _terminate(signum, frame) -> None:
    """SIGTERM stops a run like Ctrl-C: cleanly, keeping any checkpoint."""
    raise KeyboardInterrupt


FLAGS = {"n_pairs": "--pairs"}  # arguments whose flag is not --the-name


def _flag(match: re.Match) -> str:
    name, _, value = match.group(1).partition("=")
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    return flag if value in ("", "True") else f"{flag} {value.strip(chr(39) + chr(34))}"


def as_flags(exc: BaseException | str) -> str:
    """A library error's message with each argument it names (`` `tau` ``, `` `overwrite=True` ``,
    `` `ablation='counterfactual'` ``) written as this command's flag (``--tau``, ``--overwrite``,
    ``--ablation counterfactual``)."""
    return re.sub(r"`([a-z][a-z0-9_]*(?:=[^`\s]*)?)`", _flag, str(exc))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one-line messages with exit status 2."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"error: {as_flags(exc)}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except KeyboardInterrupt:
        console.print(INTERRUPTED)
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        # by name: recent typer raises its own vendored copy of click's exceptions, not click's
        if any(kind.__name__ == "ClickException" for kind in type(exc).__mro__):
            exc.show()
            sys.exit(2)
        raise
    if code == 130:  # typer turns Ctrl-C (and so SIGTERM) in a command into status 130, returned, not raised
        console.print(INTERRUPTED)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
