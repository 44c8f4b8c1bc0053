"""The ``circuits`` command: a thin layer over the library's functions.

Bad input is reported in one line on stderr with exit status 2 and no traceback (``--debug``
shows it).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import signal
import sys
import time
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from circuitfinder.config import SECTIONS, DiscoverConfig, flat_fields
from circuitfinder.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find, check and draw the circuits behind a language model's behaviours.",
)
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
        columns = [
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
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


def config_options(leave_out: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One command-line option per field of :class:`~circuitfinder.config.DiscoverConfig` (but
    ``leave_out``), with the field's help text, grouped by section in ``--help``."""
    params = []
    for name, (section, f) in flat_fields().items():
        if name in leave_out:
            continue
        owner = SECTIONS[section] if section else DiscoverConfig
        kind = typing.get_type_hints(owner)[name]
        flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
        flags = (f"{flag}/--no-{flag[2:]}",) if kind in (bool, Optional[bool]) else (flag,)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        panel = owner.title if section else "Task, model and method"
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=kind,
                default=typer.Option(default, *flags, help=f.metadata["help"], rich_help_panel=panel),
            )
        )
    return params


def _with_options(params: list[inspect.Parameter]):
    """Give a command the signature ``params`` (typer reads its options from the signature)."""

    def decorate(command):
        command.__signature__ = inspect.Signature(params)
        return command

    return decorate


def _option(name: str, default, *flags: str, help: str, annotation=str) -> inspect.Parameter:  # noqa: A002
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(default, *flags, help=help, rich_help_panel="Outputs"),
    )


@app.command()
@_with_options(
    config_options()
    + [
        _option(
            "match_published",
            False,
            "--match-published",
            annotation=bool,
            help="Every choice the published EAP-IG code makes (--bos always and its --ig-rule): its scores, divided "
            "by the prompt count.",
        ),
        _option(
            "out",
            None,
            "--out",
            annotation=Optional[Path],
            help="Run folder (default: outputs/TASK-MODEL-METHOD-TIME).",
        ),
        _option("overwrite", False, "--overwrite", annotation=bool, help="Replace an existing run folder."),
    ]
)
def discover(match_published: bool = False, out: Optional[Path] = None, overwrite: bool = False, **options) -> None:
    """Find the circuit of a task in a model and check it by exact patching."""
    from circuitfinder.runs.pipeline import default_out_dir
    from circuitfinder.runs.run import run_config

    config = DiscoverConfig.from_options(**options)
    if match_published:
        config = config.matching_published()
    summary = run_config(
        config, out=out or default_out_dir(config), overwrite=overwrite, reporter=ConsoleReporter()
    ).summary
    print(summary_line(summary))


def summary_line(summary) -> str:
    """The one line ``circuits discover`` prints: the circuit, its faithfulness and where it is."""
    precision = summary.precision or {}
    found = precision.get("found_faithfulness")
    return (
        f"{summary.task} on {summary.model} ({summary.method}): "
        f"clean {summary.metric_clean:.3f}, corrupted {summary.metric_corrupted:.3f}; "
        f"{summary.edges_kept:,}/{summary.edges_total:,} edges, {summary.nodes_kept} nodes; "
        f"faithfulness {summary.faithfulness:.3f} (held-out, {summary.dtype}"
        + (f"; {found:.3f} in {precision['passes']}, where it was found" if found is not None else "")
        + _refereed(precision)
        + ("" if summary.meets_target else f"; BELOW the target {summary.target_faithfulness}")
        + f") -> {summary.out}"
    )


def _refereed(precision: dict) -> str:
    """What the summary line says of a half-precision search refereed in float32."""
    decisions = precision.get("referee_decisions")
    if not decisions:
        return ""
    if decisions["passes_dtype"] == "float32":
        return f"; searched in float32: {decisions['why_float32']}"
    return (
        f"; searched in {precision['passes']}, {decisions['decided']:,} removals decided again in float32, "
        f"{decisions['overruled']:,} of them overruled"
    )


SWEEP_OWN = ("task", "model", "method", "workers", "address")  # sweep's own options (lists; runs at once)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


@app.command()
@_with_options(
    [
        _option("tasks", ..., "--tasks", help="Comma-separated tasks (names or task files)."),
        _option("models", ..., "--models", help="Comma-separated models (bundled names, Hugging Face ids, folders)."),
        _option("methods", "eap-ig", "--methods", help="Comma-separated methods."),
        _option(
            "out",
            Path("outputs/sweep"),
            "--out",
            annotation=Path,
            help="Sweep folder: one run folder per task-model-method, and sweep.csv/sweep.md.",
        ),
        _option(
            "workers",
            0,
            "--workers",
            annotation=int,
            help="Runs at once, as Ray tasks (0: one after another in this process; each run already uses every core).",
        ),
        _option(
            "cpus_per_run",
            1,
            "--cpus-per-run",
            annotation=int,
            help="With --workers: CPUs (torch threads) Ray gives each run.",
        ),
        _option(
            "address",
            None,
            "--address",
            annotation=Optional[str],
            help="With --workers: join an existing Ray cluster (its machines must see --out).",
        ),
        _option("overwrite", False, "--overwrite", annotation=bool, help="Redo runs that already finished."),
    ]
    + config_options(leave_out=SWEEP_OWN)
)
def sweep(
    tasks: str,
    models: str,
    methods: str = "eap-ig",
    out: Path = Path("outputs/sweep"),
    workers: int = 0,
    cpus_per_run: int = 1,
    address: Optional[str] = None,
    overwrite: bool = False,
    **options,
) -> None:
    """Discover every task × model × method (skipping finished runs) and write one comparison table."""
    from circuitfinder.runs.sweep import sweep as run_sweep

    base = DiscoverConfig.from_options(method="eap-ig", **options)
    try:
        frame = run_sweep(
            _names(tasks),
            _names(models),
            _names(methods),
            out=out,
            base=base,
            workers=workers,
            cpus=cpus_per_run,
            address=address,
            overwrite=overwrite,
            reporter=ConsoleReporter(),
        )
    except KeyboardInterrupt:
        console.print(f"interrupted: finished runs are kept in {out}; rerun the same command to skip them and go on")
        sys.exit(130)
    counts = frame.status.value_counts()
    print(
        f"{len(frame)} runs: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("finished", "skipped", "failed"))
        + f" -> {out / 'sweep.md'}"
    )
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
    from circuitfinder.runs.followup import validate_run

    result = validate_run(run_dir, top=top, random=random, overwrite=overwrite, reporter=ConsoleReporter())
    parts = [
        f"{k}: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}"
        for k, v in result.items()
        if isinstance(v, dict)
    ]
    print(f"{result['method']} vs exact edge effects ({result['edges']} edges) - " + "; ".join(parts))


def _reference_help() -> str:
    from circuitfinder.graphs.references import available

    return f"A published circuit: {', '.join(available())} (default: the one for the run's task)."


@app.command()
def grade(
    run_dir: Optional[Path] = typer.Argument(
        None, help="A run folder written by `circuits discover`, or a circuit.json."
    ),
    reference: Optional[str] = typer.Option(None, "--reference", help=_reference_help()),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo an existing grading against this reference."),
    list_: bool = typer.Option(False, "--list", help="List the reference circuits and exit."),
) -> None:
    """Grade a run's circuit and scores against a published circuit (ROC-AUC, precision, recall)."""
    from circuitfinder.graphs.references import available, read

    if list_:
        for name in available():
            ref = read(name)
            auc = ref.get("published", {}).get("acdc_edge_roc_auc")
            print(
                f"{name}: {ref['title']} (task {ref['task']}, model {ref['model']}"
                + (f"; published ACDC edge ROC-AUC {auc}" if auc is not None else "")
                + ")"
            )
        return
    if run_dir is None:
        raise UserError("give a run folder (circuits grade RUN_DIR --reference NAME), or --list")
    from circuitfinder.graphs.grading import format_table, grade_run

    result = grade_run(run_dir, reference=reference, overwrite=overwrite)
    print(format_table(result))
    print(f"-> {result['out']}")


@app.command()
def render(
    source: Path = typer.Argument(..., help="A run folder or a circuit.json file."),
    fmt: str = typer.Option("svg", "--format", help="svg, pdf, png or dot (comma-separated for several)."),
    style: str = typer.Option(
        "default", "--style", help="default, paper (print-safe, greyscale) or summary (default at node level)."
    ),
    level: str = typer.Option("edge", "--level", help="edge (q/k/v inputs) or node (heads and MLPs as units)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output path without suffix (default: beside the circuit)."),
    max_edges: int = typer.Option(
        200, "--max-edges", help="Edge level: draw at most this many of the strongest edges."
    ),
    max_nodes: int = typer.Option(
        30, "--max-nodes", help="Node level: draw the heaviest N heads and MLPs (and 2N links)."
    ),
) -> None:
    """Draw a saved circuit (no model needed); head roles come from roles.csv beside it."""
    from circuitfinder.graphs.circuit import load_circuit

    circuit = load_circuit(source)
    path = source / "circuit.json" if source.is_dir() else source
    if not circuit.n_edges:
        raise UserError(f"{path} holds an empty circuit: nothing to draw")
    try:
        written = circuit.draw(
            out or path.with_suffix(""),
            formats=[f.strip() for f in fmt.split(",")],
            style=style,
            max_edges=max_edges,
            level=level,
            max_nodes=max_nodes,
        )
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
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        help="Bundled name, Hugging Face id, local folder, a known configuration (llama-3-8b, gemma-2-2b, gpt2) or a "
        "shape by hand: layers=32,heads=32,groups=8,d_model=4096,d_mlp=14336,vocab=128256.",
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or float64."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    positions: int = typer.Option(24, "--positions", help="Tokens per prompt (IOI's are about 15-20)."),
    memory: Optional[str] = typer.Option(
        None, "--memory", help="Memory to fit in, e.g. 80GB (default: the device's free memory)."
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="cpu (the tokenizer and the libraries share its memory), cuda, cuda:N or mps (they stay in host memory), "
        "or auto.",
    ),
) -> None:
    """Print a run's memory plan (weights, sender buffers, activations, scores) without loading weights."""
    from circuitfinder.engine.plan import (
        format_bytes,
        free_memory,
        largest_batch,
        memory_plan,
        plan_shape,
        refereed_total,
    )
    from circuitfinder.engine.precision import HALF, dtype_name, parse_dtype

    torch_dtype = parse_dtype(dtype)
    if batch_size < 1 or positions < 1:
        raise UserError("--batch-size and --positions must be at least 1")
    from circuitfinder.engine.models import parse_device, resolve_device

    device = str((parse_device if memory else resolve_device)(device))  # free memory is read only where it exists
    budget = _parse_bytes(memory) if memory else free_memory(device)
    shape = plan_shape(model)
    p = memory_plan(shape, torch_dtype, batch_size, positions, device)
    print(
        f"{shape.name}: {shape.n_layers} layers, {shape.n_heads} heads, {shape.n_kv_groups} key/value groups, "
        f"d_model {shape.d_model}, d_mlp {shape.d_mlp}, vocab {shape.d_vocab:,}; {shape.n_params:,} parameters; "
        f"{shape.n_edges:,} edges ({shape.n_senders:,} senders × {shape.n_receivers:,} receivers)"
    )
    print(
        f"memory plan on {device} in {dtype_name(torch_dtype)}, batches of {batch_size} prompts × {positions} "
        f"positions (attribution, the heaviest stage):"
    )
    for name, size in p.rows():
        if size:
            print(f"  {name:<22} {format_bytes(size):>10}")
    fits = largest_batch(shape, budget, torch_dtype, positions, device=device)
    where = f"{memory}" if memory else f"the free {format_bytes(budget)} of {device}"
    print(
        f"largest batch that fits {where}: {fits}" if fits else f"does not fit {where}, not even one prompt per batch"
    )
    if torch_dtype in HALF:
        refereed = refereed_total(shape, torch_dtype, batch_size, positions, device)
        print(
            f"a search in {dtype_name(torch_dtype)} refereed in float32 (the default; `--no-referee` runs it in "
            f"{dtype_name(torch_dtype)} alone): the float32 model's plan and this copy of the weights, "
            f"{format_bytes(refereed)}" + ("" if refereed <= budget else f", more than {where}")
        )


@app.command()
def methods() -> None:
    """List the methods: what each does, what it costs, and what it supports."""
    from circuitfinder.config import DEFAULT_METHOD
    from circuitfinder.methods.registry import METHODS

    for name, m in METHODS.items():
        supports = f"ablations: {', '.join(m.ablations)}" + ("" if m.post_norm else "; not on post-norm models")
        default = " (default)" if name == DEFAULT_METHOD else ""
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
        print(
            f"{name}{default}: {spec.hf_id}, {shape.n_layers} layers, {shape.n_heads} heads, "
            f"{shape.n_kv_groups} kv group{'s' * (shape.n_kv_groups != 1)}, {EdgeGraph(shape).n_edges:,} edges; {flag}"
        )


@tasks_app.command("list")
def tasks_list() -> None:
    """List the built-in tasks."""
    from circuitfinder.tasks import DESCRIPTIONS, TASKS

    for name in sorted(TASKS):
        print(f"{name}: {DESCRIPTIONS.get(name, '')}")


@tasks_app.command("show")
def tasks_show(
    name: str = typer.Argument(..., help="A task name or a .jsonl/.csv task file."),
    model: str = typer.Option(
        "smollm2-135m", "--model", help="Model whose tokenizer builds the prompts and whose baseline is shown."
    ),
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
    print(
        f"task {task.name}: {len(task)} pairs ({len(task.indices('discovery'))} discovery, "
        f"{len(task.indices('heldout'))} held-out), metric {task.metric_name}"
    )
    for text in task.texts[:examples]:
        print(
            f"  clean:     {text['clean']!r}\n  corrupted: {text['corrupted']!r}\n"
            f"  answer: {text['answer']!r}   wrong: {text['wrong']!r}"
        )
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

    m = run_compare(
        a,
        b,
        out=out,
        overwrite=overwrite,
        bins=bins,
        formats=tuple(f.strip() for f in fmt.split(",")),
        max_edges=max_edges,
    )
    if m["same_model_shape"]:
        print(
            f"node Jaccard {m['node_jaccard']:.3f}, edge Jaccard {m['edge_jaccard']:.3f}, overlap at equal size "
            f"{m['overlap_at_equal_size']:.3f} (k={m['equal_size_k']}), weighted overlap {m['weighted_overlap']:.3f} "
            f"-> {m['out']}"
        )
    else:
        print(f"different model shapes: compared by relative depth ({bins} bins) and role -> {m['out']}")


@app.command()
def view(
    run_dir: Path = typer.Argument(..., help="A run folder (its circuit.html) or a compare folder (its compare.html)."),
) -> None:
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
    """Score every head's role (previous-token, duplicate, induction, mover) on the run's prompts: roles.csv, and
    the circuit's heads' attention patterns in circuit.html."""
    from circuitfinder.graphs.circuit import load_circuit
    from circuitfinder.runs.followup import roles_for_run

    if prompts < 1:
        raise UserError(f"--prompts must be at least 1, got {prompts}")
    table = roles_for_run(run_dir, max_prompts=prompts, overwrite=overwrite, reporter=ConsoleReporter())
    record = load_circuit(run_dir)
    labelled = {n: r["role"] for n, r in record.roles.items() if r.get("role")}
    print(
        f"{int(table.role.notna().sum())} of {len(table)} heads have a role; in the circuit: "
        + (", ".join(f"{n} ({r})" for n, r in sorted(labelled.items())) or "none")
        + f" -> {run_dir / 'roles.csv'}"
    )


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
    source: Path = typer.Argument(
        ..., help="A run folder, a circuit.json, a .graphml written by this tool, or an EAP-IG/MIB graph JSON."
    ),
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


def _flag(match: re.Match) -> str:
    name, _, value = match.group(1).partition("=")
    field = flat_fields().get(name)
    flag = (field[1].metadata.get("flag") if field else None) or "--" + name.replace("_", "-")
    if value == "False":
        return "--no-" + flag.removeprefix("--")
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


def __getattr__(name: str):
    """``click_app``: the click command underneath the typer app (for the documentation's CLI page)."""
    if name == "click_app":
        return typer.main.get_command(app)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
