"""A discovery run: model + task → edge scores → circuit → exact held-out faithfulness → run folder.

:func:`run_config` reads as the list of the run's stages (``circuitfinder.runs.pipeline``); :class:`Run`
holds what they produce and writes it as a run folder, whole or not at all: files go to a hidden
temporary folder beside the target, which is renamed into place at the end. :data:`RUN_FILES` is
the one list of the folder's files, which :meth:`Run.save` writes and :meth:`Run.load` reads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.adapter import ModelAdapter
from circuitfinder.engine.faithfulness import Baseline, Curve
from circuitfinder.errors import UserError
from circuitfinder.folders import atomic_dir, check_out_dir
from circuitfinder.graphs.circuit import Circuit, load_circuit
from circuitfinder.graphs.explorer import write_explorer
from circuitfinder.graphs.tables import nodes_table, read_scores, scores_table
from circuitfinder.methods.registry import METHODS, Reporter
from circuitfinder.methods.search import decisions_table
from circuitfinder.runs import pipeline as stage
from circuitfinder.runs.summary import Summary
from circuitfinder.tasks import Task


def run_config(
    config: DiscoverConfig,
    out: Path | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    adapter: ModelAdapter | None = None,
    task: Task | None = None,
) -> "Run":
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
    stage.check_config(config, task_given=task is not None)
    if out is not None:
        check_out_dir(Path(out), overwrite)
    started = time.perf_counter()
    torch.manual_seed(config.prompts.seed)
    precision, adapter = stage.load(config, adapter, reporter)
    prepared = stage.prepare(config, adapter, precision, task, reporter)
    del adapter  # the stages hold it (a re-measure in float32 releases it)
    found = stage.find(config, prepared, reporter, Path(out).parent if out is not None else Path("outputs"))
    measured = stage.measure(config, prepared, found, reporter)
    run = Run.made(config, prepared, found, measured, stage.summarise(config, prepared, found, measured, started))
    if config.outputs.roles:
        run.roles(prepared.adapter, reporter=reporter)
    run.summary.seconds = round(time.perf_counter() - started, 2)
    if out is not None:
        run.save(out, overwrite=overwrite, reporter=reporter)
    if found.checkpoint is not None:  # the search is saved in the run folder (or returned): its checkpoint goes
        found.checkpoint.clear()
    return run


def discover(
    model: "str | ModelAdapter" = "smollm2-135m",
    task: "str | Task" = "ioi",
    method: str = DiscoverConfig.method,
    *,
    out: Path | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    **options,
) -> "Run":
    """Find the circuit of ``task`` in ``model`` and check it by exact patching on held-out prompts.

    Args:
        model: a bundled model's name, a Hugging Face id, a local folder, or a model already
            loaded with :func:`circuitfinder.load_model`.
        task: a task name (``circuitfinder.tasks.TASKS``), a ``.jsonl``/``.csv`` task file, or a
            :class:`~circuitfinder.tasks.Task` already built for this model's tokenizer.
        method: a name of :data:`circuitfinder.methods.registry.METHODS` (``circuits methods`` lists them).
        out: a run folder to write (see :meth:`Run.save`); nothing is written when None.
        overwrite: replace ``out`` if it holds results.
        reporter: receives messages and progress (silent when None).
        **options: any field of :class:`~circuitfinder.config.DiscoverConfig` or of its sections,
            by name (``edges``, ``target_faithfulness``, ``ig_steps``, ``tau``, ``n_pairs``,
            ``batch_size``, ``dtype``, ...).

    Returns:
        the :class:`Run`: scores, circuit, baseline, faithfulness, curve and the search's log.

    Example::

        run = discover("smollm2-135m", "ioi")
        run.circuit.top(200).prune().draw()
    """
    adapter = None if isinstance(model, str) else model
    built = None if isinstance(task, str) else task
    config = DiscoverConfig.from_options(
        model=model if adapter is None else adapter.name,
        task=task if built is None else built.name,
        method=method,
        **options,
    )
    return run_config(config, out=out, overwrite=overwrite, reporter=reporter, adapter=adapter, task=built)


@dataclass(frozen=True)
class RunFile:
    """A file of the run folder: what it holds, how :meth:`Run.save` writes it (None: not written
    by the run; skipped when the run has nothing for it) and how :meth:`Run.load` reads it back
    into the run's parts (None: not read)."""

    name: str
    holds: str
    write: Callable[["Run", Path], Any] | None
    read: Callable[[Path, dict], Any] | None = None


def _table(name: str, kind: str, holds: str) -> RunFile:
    """One of the run's ``tables``, saved as ``name.kind`` (``json`` or ``csv``) when present."""

    def write(run: "Run", path: Path) -> None:
        if name in run.tables:
            if kind == "csv":
                run.tables[name].to_csv(path, index=False)
            else:
                path.write_text(json.dumps(run.tables[name], indent=1 if name == "certificate" else None) + "\n")

    def read(path: Path, parts: dict) -> None:
        parts["tables"][name] = pd.read_csv(path) if kind == "csv" else json.loads(path.read_text())

    return RunFile(f"{name}.{kind}", holds, write, read)


def _read_summary(path: Path, parts: dict) -> None:
    try:
        parts["summary"] = Summary.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path.parent} has no readable summary.json ({exc})") from None


def _read_scores(path: Path, parts: dict) -> None:
    circuit = parts["circuit"]
    parts["circuit"] = circuit.replace(
        scores=torch.where(circuit.mask, circuit.scores, read_scores(path, circuit.graph))
    )


def _write_curve(run: "Run", path: Path) -> None:
    if run.curve is not None:
        pd.DataFrame(run.curve.rows()).to_csv(path, index=False)
        plot_curve(run.curve, f"{run.config.task} · {run.config.model} · {run.config.method}", path.with_suffix(".png"))


def _read_curve(path: Path, parts: dict) -> None:
    rows = pd.read_csv(path)
    parts["curve"] = Curve(
        tuple((float(r.percent), int(r.top_n), int(r.edges_kept), float(r.faithfulness)) for r in rows.itertuples()),
        parts["summary"].cpr,
        parts["summary"].cmd,
    )


def _write_prompts(run: "Run", path: Path) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in run.prompts)


def _read_prompts(path: Path, parts: dict) -> None:
    parts["prompts"] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RUN_FILES: tuple[RunFile, ...] = (  # in the order written and read; circuit.html last, from the files before it
    RunFile(
        "config.json",
        "the configuration (DiscoverConfig, in sections)",
        lambda run, path: path.write_text(json.dumps(run.config.to_json(), indent=1) + "\n"),
        lambda path, parts: parts.update(config=load_run_config(path.parent)),
    ),
    RunFile(
        "summary.json",
        "the figures: size, held-out faithfulness, baseline, precision, cost (Summary)",
        lambda run, path: path.write_text(json.dumps(run.summary.to_json(), indent=1) + "\n"),
        _read_summary,
    ),
    RunFile(
        "circuit.json",
        "the circuit: edges, scores of its edges, node roles",
        lambda run, path: run.circuit.save(path),
        lambda path, parts: parts.update(circuit=load_circuit(path.parent)),
    ),
    RunFile(
        "scores.parquet",
        "every edge's score and rank",
        lambda run, path: scores_table(run.circuit).to_parquet(path, index=False),
        _read_scores,
    ),
    RunFile(
        "nodes.csv",
        "the circuit's nodes with their weights",
        lambda run, path: nodes_table(run.circuit).to_csv(path, index=False),
    ),
    RunFile("prompts.jsonl", "every prompt pair as text, with its split", _write_prompts, _read_prompts),
    RunFile(
        "circuit.svg",
        "the diagram (circuit.dot without Graphviz)",
        lambda run, path: _render(run.circuit, path.with_suffix("")),
    ),
    RunFile(
        "curve.csv",
        "with a curve: held-out faithfulness at the MIB edge fractions (and curve.png)",
        _write_curve,
        _read_curve,
    ),
    _table("certificate", "json", "after a search: its rule, τ, floor, cost and referee"),
    _table("necessity", "csv", "after a search: each kept edge's metric drop when it alone is removed"),
    _table("decisions", "csv", "after a search: every candidate in the order decided"),
    _table("roles", "csv", "every head's role scores (previous-token, duplicate, induction, mover)"),
    _table("attention", "json", "the circuit's heads' attention patterns on three clean prompts"),
    RunFile("circuit.html", "the explorer page, from the files above", lambda run, path: write_explorer(path.parent)),
)


@dataclass(eq=False)
class Run:
    """The result of a discovery run, in memory; :meth:`save` writes it as a folder, :meth:`load` reads one.

    Attributes:
        config: what was run (:class:`~circuitfinder.config.DiscoverConfig`).
        circuit: the circuit found, with every edge's score (a :class:`~circuitfinder.graphs.circuit.Circuit`).
        summary: the figures (:class:`~circuitfinder.runs.summary.Summary`, saved as ``summary.json``).
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
    summary: Summary
    baseline: Baseline
    curve: Curve | None = None
    prompts: list[dict] = dataclasses.field(default_factory=list)
    tables: dict = dataclasses.field(default_factory=dict)
    task: Task | None = None
    out: Path | None = None

    @classmethod
    def made(
        cls, config: DiscoverConfig, prepared: "stage.Prepared", found, measured: "stage.Measured", summary: Summary
    ) -> "Run":
        """The run the stages produced."""
        circuit = Circuit(
            prepared.graph,
            found.circuit,
            found.scores,
            model=config.model,
            task=config.task,
            method=config.method,
            metadata={"faithfulness": measured.faithfulness, "edges_total": prepared.graph.n_edges},
        )
        tables = {}
        if found.search is not None:
            tables = {
                "certificate": certificate(summary, found.search),
                "necessity": pd.DataFrame(found.search.necessity),
                "decisions": decisions_table(prepared.graph, found.search, found.scores),
            }
        return cls(
            config,
            circuit,
            summary,
            prepared.baseline,
            measured.curve,
            stage.prompt_rows(prepared.task),
            tables,
            prepared.task,
        )

    @property
    def scores(self) -> torch.Tensor:
        """Every edge's score, ``[senders, receivers]`` (float64; NaN off the graph's edges)."""
        return self.circuit.scores

    @property
    def faithfulness(self) -> float:
        """The circuit's exact faithfulness on the held-out prompts."""
        return self.summary.faithfulness

    def grade(self, reference: str | None = None) -> dict:
        """Grade the circuit and its scores against a published circuit (default: the task's;
        ``circuitfinder.graphs.grading.grade_circuit``): precision, recall, ROC-AUC."""
        from circuitfinder.graphs.grading import grade_circuit

        seeded = METHODS[self.config.method].seeded
        return grade_circuit(self.circuit, reference, self.config.search.seed_method if seeded else self.config.method)

    def roles(self, model: ModelAdapter, max_prompts: int = 64, reporter: Reporter | None = None) -> pd.DataFrame:
        """Measure every head's role on the run's prompts (``circuitfinder.graphs.roles``): the
        circuit takes the roles of its heads, ``tables["roles"]`` the table of every head (returned),
        and ``summary.heads_by_role`` the circuit's heads by role."""
        from circuitfinder.graphs.roles import attention_patterns, measure_roles

        reporter = reporter or Reporter()
        task = self.task if self.task is not None else stage.build_run_task(self.config, model.tokenizer)
        with reporter.progress("head roles (clean prompts)", 0):
            table = measure_roles(model, task, max_prompts=max_prompts, batch_size=self.config.execution.batch_size)
        self.circuit = self.circuit.with_roles(table)
        self.tables["roles"] = table
        self.tables["attention"] = attention_patterns(model, task, self.circuit.heads())
        self.summary.heads_by_role = heads_by_role(self.circuit)
        reporter.log(
            "heads by role: "
            + ("; ".join(f"{r} {', '.join(h)}" for r, h in self.summary.heads_by_role.items()) or "none labelled")
        )
        return table

    def __repr__(self) -> str:
        where = f", {self.out}" if self.out else ""
        return (
            f"Run({self.config.task} · {self.config.model} · {self.config.method}: {self.circuit.n_edges:,} of "
            f"{self.circuit.graph.n_edges:,} edges, faithfulness {self.faithfulness:.3f} held-out{where})"
        )

    def save(self, out: Path, overwrite: bool = False, reporter: Reporter | None = None) -> Path:
        """Write the run folder whole or not at all (``circuitfinder.folders.atomic_dir``): the files
        of :data:`RUN_FILES` that the run has.

        Raises:
            OutputExists: ``out`` holds results and ``overwrite`` is off.
        """
        reporter = reporter or Reporter()
        out = Path(out)
        check_out_dir(out, overwrite)
        if not shutil.which("dot"):
            reporter.log("Graphviz's dot program is missing: wrote circuit.dot only (install graphviz for SVG)")
        with atomic_dir(out, overwrite) as tmp:
            for file in RUN_FILES:
                try:
                    file.write(self, tmp / file.name)
                except ValueError as exc:  # a diagram too large to draw
                    reporter.log(f"no {file.name}: {exc}")
        self.out = out
        self.summary.out = str(out)
        reporter.log(f"wrote {out}")
        return out

    @classmethod
    def load(cls, run_dir: Path) -> "Run":
        """Read a run folder written by :meth:`save` (or by ``circuits discover``).

        Raises:
            UserError: not a run folder, or one whose files do not fit together.
        """
        run_dir = Path(run_dir)
        parts: dict[str, Any] = {"tables": {}, "prompts": [], "curve": None}
        for file in RUN_FILES:
            path = run_dir / file.name
            if file.read is not None and (
                path.is_file() or file.name in ("config.json", "summary.json", "circuit.json")
            ):
                file.read(path, parts)
        summary = parts["summary"]
        summary.out = str(run_dir)
        baseline = Baseline(
            summary.metric_clean, summary.metric_corrupted, summary.accuracy_clean, summary.prompts_heldout
        )
        return cls(
            parts["config"],
            parts["circuit"],
            summary,
            baseline,
            parts["curve"],
            parts["prompts"],
            parts["tables"],
            None,
            run_dir,
        )


def certificate(summary: Summary, outcome) -> dict:
    """``certificate.json``: what the circuit is certified to do: exact faithfulness, size, and each edge's
    necessity."""
    return {
        "model": summary.model,
        "task": summary.task,
        "method": summary.method,
        "faithfulness_heldout": summary.faithfulness,
        "prompts_heldout": summary.prompts_heldout,
        "edges": summary.edges_kept,
        "nodes": summary.nodes_kept,
        "search": summary.search,
        "necessity": sorted(outcome.necessity, key=lambda e: -abs(e["metric_drop"])),
    }


def heads_by_role(circuit: Circuit) -> dict[str, list[str]]:
    """The circuit's heads grouped by role label (a head with two labels is listed under each),
    in layer order; heads with no role are left out."""
    out: dict[str, list[str]] = {}
    for head in circuit.heads():
        role = (circuit.roles.get(head) or {}).get("role")
        for label in role.split(", ") if role else ():
            out.setdefault(label, []).append(head)
    return dict(sorted(out.items()))


def _render(circuit: Circuit, path: Path) -> None:
    """Draw ``circuit.svg``; without the ``dot`` program, ``circuit.dot``."""
    formats = ("svg",) if shutil.which("dot") else ("dot",)
    circuit.draw(path, formats=formats, max_edges=300)  # a minimal circuit (≤ 300 edges) whole


def load_run_config(run_dir: Path) -> DiscoverConfig:
    """The configuration a run folder was made with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    try:
        return DiscoverConfig.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, AttributeError, UserError) as exc:
        raise UserError(f"{path} is not a valid run configuration ({exc})") from None


def figure(width: float, height: float):
    """A figure drawn without pyplot: no backend is switched, so a notebook's inline plots keep working."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150)
    return fig, fig.subplots()


def plot_curve(curve, title: str, path: Path) -> None:
    fig, ax = figure(5, 3.5)
    xs = [p for p, *_ in curve.points]
    ax.plot(xs, [f for *_, f in curve.points], marker="o")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of all, top by |score|)")
    ax.set_ylabel("faithfulness (held-out, exact)")
    ax.set_title(f"{title}: CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
