"""``circuits evaluate``: grade a run's circuit and scores against a published reference circuit.

Reads ``circuit.json`` (the found circuit and the model's shape) and, when the run folder has it,
``scores.parquet`` (every edge's score; for ``--method acdc`` the seed method's), grades both
with :func:`circuitfinder.graphs.grading.grade` against :mod:`circuitfinder.graphs.reference`, and writes
``evaluation-{reference}.json`` and ``evaluation-{reference}.csv`` (one row per level) beside the
circuit. Without ``scores.parquet`` only the circuit is graded (ROC-AUC needs every edge's score).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from circuitfinder.errors import OutputExists, UserError
from circuitfinder.methods.registry import METHODS
from circuitfinder.graphs.circuit import Circuit, load_circuit
from circuitfinder.graphs.tables import read_scores
from circuitfinder.graphs.grading import grade
from circuitfinder.graphs.reference import load_reference, reference_mask
from circuitfinder.graphs.references import available

COLUMNS = ("reference", "circuit", "shared", "precision", "recall", "f1", "roc_auc", "top_k_precision", "top_k_recall",
           "top_k_f1", "r_precision")


def default_reference(task: str) -> str:
    """The reference for a run's task (the one named after it, else one whose ``task`` it is), else
    a UserError listing them."""
    if task in available():
        return task
    for name in available():
        if load_reference(name).task == task:
            return name
    raise UserError(f"no reference circuit for task {task!r}: choose one with `reference` ({', '.join(available())})")


def evaluate_circuit(circuit: Circuit, reference: str | None = None, scored_by: str | None = None) -> dict:
    """Grade a circuit, and its scores when it knows every edge's, against a reference circuit.

    Args:
        circuit: the circuit (a run's ``run.circuit`` knows every score; one read from
            ``circuit.json`` only its own edges').
        reference: a name from :func:`circuitfinder.graphs.references.available`; default: the one
            for the circuit's task.
        scored_by: the method whose scores rank the edges (default: the circuit's method).

    Returns:
        edge- and node-level precision, recall, F1, and with every score ROC-AUC and top-k
        measures (``circuitfinder.graphs.grading``), with the reference's published figures.

    Raises:
        UserError: unknown reference, or a model of another shape.
    """
    ref = load_reference(reference or default_reference(circuit.task))
    graph = circuit.graph
    known = not circuit.scores[graph.allowed].isnan().any()
    scores, scores_name = (torch.nan_to_num(circuit.scores) if known else None), f"scores.parquet ({scored_by or circuit.method})"
    notes = []
    if not known:
        notes.append("no scores.parquet: the circuit is graded, ROC-AUC and top-k need every edge's score")
    elif bool((scores[graph.allowed] == scores[graph.allowed][0]).all()):  # e.g. ACDC over the whole graph
        scores, scores_name = circuit.mask.double(), "the circuit itself (no ranking scores: a one-point ROC)"
        notes.append("the run's scores are all equal: ROC-AUC ranks the circuit's edges first, (TPR + TNR) / 2")
    if circuit.task != ref.task:
        notes.append(f"the run's task is {circuit.task!r}, the reference's {ref.task!r}")
    if ref.model not in circuit.model.lower():
        notes.append(f"the run's model is {circuit.model!r}; the reference is for {ref.model} (same shape)")
    return {
        "reference": ref.name, "reference_title": ref.title, "citation": ref.citation,
        "model": circuit.model, "task": circuit.task, "method": circuit.method,
        "scores": scores_name if known else None,
        **grade(graph, reference_mask(ref, graph), circuit.mask, scores),
        "published": ref.published, "notes": notes,
    }


def evaluate_run(source: Path, reference: str | None = None, overwrite: bool = False) -> dict:
    """Grade the circuit (and scores) of a run folder or ``circuit.json`` against a reference
    (:func:`evaluate_circuit`), and write ``evaluation-{reference}.json`` and ``.csv`` beside it.

    Returns:
        The evaluation as written (with ``out``: its path).

    Raises:
        UserError: unknown reference, a model of another shape, unreadable scores;
        OutputExists: the evaluation exists and ``overwrite`` is off.
    """
    source = Path(source)
    circuit = load_circuit(source)
    folder = source if source.is_dir() else source.parent
    name = load_reference(reference or default_reference(circuit.task)).name
    targets = [folder / f"evaluation-{name}.{x}" for x in ("json", "csv")]
    if any(t.exists() for t in targets) and not overwrite:
        raise OutputExists(f"{targets[0]} already exists: pass `overwrite=True` to redo it")
    if (folder / "scores.parquet").is_file():
        scores = read_scores(folder / "scores.parquet", circuit.graph)
        circuit = circuit.replace(scores=torch.where(circuit.mask, circuit.scores, scores))
    config = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError:
            config = {}
    method = METHODS.get(circuit.method)
    scored_by = config.get("seed_method") if method is not None and method.seeded else circuit.method
    evaluation = evaluate_circuit(circuit, name, scored_by)
    result = {k: evaluation[k] for k in ("reference", "reference_title", "citation")} | {"run": str(folder)} | evaluation
    rows = [{"level": level} | {k: result[level].get(k) for k in ("total",) + COLUMNS} for level in ("edges", "nodes")]
    tmp = [t.with_name(f".{t.name}.tmp") for t in targets]
    tmp[0].write_text(json.dumps(result, indent=1) + "\n")
    pd.DataFrame(rows).to_csv(tmp[1], index=False)
    for t, final in zip(tmp, targets):
        os.replace(t, final)
    return result | {"out": str(targets[0])}


def format_table(result: dict) -> str:
    """The evaluation as a small text table (what ``circuits evaluate`` prints)."""
    shown = {"reference": "reference", "circuit": "circuit", "shared": "shared", "precision": "precision", "recall": "recall",
             "f1": "F1", "roc_auc": "ROC-AUC", "top_k_precision": "top-k P", "top_k_recall": "top-k R", "r_precision": "R-prec"}
    heads = ("level", *shown.values())

    def cell(v) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else f"{v:,}")

    rows = [[level] + [cell(result[level].get(k)) for k in shown] for level in ("edges", "nodes")]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    e, n = result["edges"], result["nodes"]
    top = (f"{result['reference']} ({result['reference_title']}): {e['reference']:,} of {e['total']:,} edges, "
           f"{n['reference']} of {n['total']} heads and MLPs")
    published = result["published"].get("acdc_edge_roc_auc")
    tail = [f"published for comparison: ACDC edge ROC-AUC {published}"] if published is not None else []
    return "\n".join([top, *lines, *tail, *(f"note: {x}" for x in result["notes"])])
