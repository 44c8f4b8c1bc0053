"""Grading a method against a reference circuit: ROC-AUC of its score ranking, precision and recall.

As in the ACDC paper (Conmy et al. 2023, arXiv:2304.14997), a method is graded on how well
it recovers a published circuit (``circuitfinder.graphs.reference``), at two levels:

* **edges**: every edge of the graph, labelled by the reference edge mask, ranked by |score|;
* **nodes**: every head and MLP (``input`` and ``logits`` are in every circuit and left out),
  labelled by the node-level reference; a node's score is the **sum of |score| over the edges
  into and out of it**, the node weight of ``circuitfinder.graphs.circuit.summary_graph`` (a k/v group edge
  counts for every head of its group, whose input it is); the nodes of a circuit are those of
  ``circuitfinder.engine.masks.circuit_nodes``.

Measures, each level:

* ``roc_auc``: the area under the ROC curve of the |score| ranking, which is the probability
  that a reference item scores above a non-reference one, ties counting half: the Mann–Whitney U
  statistic over the two classes' average ranks, U / (n_pos · n_neg);
* ``precision``, ``recall``, ``f1`` of the found circuit (its edges; the heads and MLPs it
  touches) against the reference;
* ``top_k_precision`` / ``top_k_recall`` / ``top_k_f1``: the same for the k items of largest
  |score|, k the found circuit's size (ties broken by graph order, as ``scores.parquet``'s rank);
* ``r_precision``: precision of the top |reference| items (there precision equals recall).

A measure that is undefined (no scores; an empty circuit's precision; a class with no members
for ROC-AUC) is None.

Grading a run (``circuits grade``, ``Run.grade``): :func:`grade_circuit` grades a circuit, and its
scores when it knows every edge's, against a reference of :mod:`circuitfinder.graphs.reference`;
:func:`grade_run` reads a run folder's ``circuit.json`` and, when the folder has it,
``scores.parquet`` (every edge's score; for ``--method acdc`` the seed method's), grades both, and
writes ``grade-{reference}.json`` and ``grade-{reference}.csv`` (one row per level) beside the
circuit. Without ``scores.parquet`` only the circuit is graded (ROC-AUC needs every edge's score).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float

from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.errors import OutputExists, UserError
from circuitfinder.graphs.circuit import Circuit, load_circuit
from circuitfinder.graphs.reference import load_reference, node_mask, reference_mask
from circuitfinder.graphs.references import available
from circuitfinder.graphs.tables import read_scores
from circuitfinder.methods.registry import METHODS

Mask = Bool[torch.Tensor, "senders receivers"]
Scores = Float[torch.Tensor, "senders receivers"]


def average_ranks(values) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order, tied values sharing their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float | None:
    """ROC-AUC of ``scores`` for the binary ``labels``: P(score_pos > score_neg) + ½ P(tie).

    None when either class is empty. Scores must be finite.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of one length, got {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    u = average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def precision_recall(found, reference) -> dict:
    """Precision, recall and F1 of the boolean selection ``found`` against ``reference``."""
    f = np.asarray(found, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    tp = int((f & r).sum())
    precision = tp / int(f.sum()) if f.any() else None
    recall = tp / int(r.sum()) if r.any() else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "shared": tp}


def top_k(values, k: int) -> np.ndarray:
    """Boolean selection of the ``k`` largest ``values`` (ties: earlier index first)."""
    v = np.asarray(values, dtype=np.float64)
    chosen = np.zeros(len(v), dtype=bool)
    chosen[np.argsort(-v, kind="stable")[:k]] = True
    return chosen


def node_scores(graph: EdgeGraph, scores: Scores) -> torch.Tensor:
    """Per sender index: the sum of |score| over the edges into and out of that node (input: 0)."""
    a = scores.abs().double() * graph.allowed
    out = a.sum(1)
    incoming = a.sum(0)
    for r, nodes in enumerate(graph.receiver_node):
        out[list(nodes)] += incoming[r]
    out[0] = 0.0
    return out


def grade_level(labels, found=None, values=None) -> dict:
    """The measures of one level (see the module docstring) over aligned 1-D arrays.

    Args:
        labels: membership in the reference.
        found: membership in the found circuit, or None.
        values: a score per item (|score| or node score; larger = more important), or None.
    """
    labels = np.asarray(labels, dtype=bool)
    out = {"total": len(labels), "reference": int(labels.sum())}
    if found is not None:
        found = np.asarray(found, dtype=bool)
        out["circuit"] = int(found.sum())
        out |= precision_recall(found, labels)
    if values is None:
        out |= {"roc_auc": None, "top_k_precision": None, "top_k_recall": None, "top_k_f1": None, "r_precision": None}
        return out
    values = np.asarray(values, dtype=np.float64)
    out["roc_auc"] = roc_auc(values, labels)
    if found is not None:
        top = precision_recall(top_k(values, int(found.sum())), labels)
        out |= {"top_k_precision": top["precision"], "top_k_recall": top["recall"], "top_k_f1": top["f1"]}
    out["r_precision"] = precision_recall(top_k(values, int(labels.sum())), labels)["precision"]
    return out


def grade(graph: EdgeGraph, reference: Mask, circuit: Mask | None = None, scores: Scores | None = None) -> dict:
    """Grade a found circuit and/or a method's edge scores against a reference edge mask.

    Args:
        graph: the model's edge graph.
        reference: ``[senders, receivers]`` reference edges (``circuitfinder.graphs.reference.reference_mask``).
        circuit: the found circuit's edges, or None.
        scores: every edge's score (signed; ranked by |score|), or None.

    Returns:
        ``{"edges": {...}, "nodes": {...}}``, each with ``total``, ``reference``, and the measures
        of the module docstring (``circuit``, ``shared``, ``precision`` … when ``circuit`` is given).
    """
    allowed = graph.allowed
    if scores is not None and not torch.isfinite(scores[allowed]).all():
        raise ValueError("edge scores must be finite")
    edge_found = None if circuit is None else circuit[allowed].numpy()
    edge_values = None if scores is None else scores[allowed].abs().double().numpy()
    nodes = slice(1, graph.n_senders)  # heads and MLPs (sender 0 is the input)
    node_found = None if circuit is None else node_mask(graph, circuit)[nodes].numpy()
    node_values = None if scores is None else node_scores(graph, scores)[nodes].numpy()
    return {
        "edges": grade_level(reference[allowed].numpy(), edge_found, edge_values),
        "nodes": grade_level(node_mask(graph, reference)[nodes].numpy(), node_found, node_values),
    }


COLUMNS = (
    "reference",
    "circuit",
    "shared",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "top_k_precision",
    "top_k_recall",
    "top_k_f1",
    "r_precision",
)


def default_reference(task: str) -> str:
    """The reference for a run's task (the one named after it, else one whose ``task`` it is), else
    a UserError listing them."""
    if task in available():
        return task
    for name in available():
        if load_reference(name).task == task:
            return name
    raise UserError(f"no reference circuit for task {task!r}: choose one with `reference` ({', '.join(available())})")


def grade_circuit(circuit: Circuit, reference: str | None = None, scored_by: str | None = None) -> dict:
    """Grade a circuit, and its scores when it knows every edge's, against a reference circuit.

    Args:
        circuit: the circuit (a run's ``run.circuit`` knows every score; one read from
            ``circuit.json`` only its own edges').
        reference: a name from :func:`circuitfinder.graphs.references.available`; default: the one
            for the circuit's task.
        scored_by: the method whose scores rank the edges (default: the circuit's method).

    Returns:
        edge- and node-level precision, recall, F1, and with every score ROC-AUC and top-k
        measures (the module docstring), with the reference's published figures.

    Raises:
        UserError: unknown reference, or a model of another shape.
    """
    ref = load_reference(reference or default_reference(circuit.task))
    graph = circuit.graph
    known = not circuit.scores[graph.allowed].isnan().any()
    scores, scores_name = (
        (torch.nan_to_num(circuit.scores) if known else None),
        f"scores.parquet ({scored_by or circuit.method})",
    )
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
        "reference": ref.name,
        "reference_title": ref.title,
        "citation": ref.citation,
        "model": circuit.model,
        "task": circuit.task,
        "method": circuit.method,
        "scores": scores_name if known else None,
        **grade(graph, reference_mask(ref, graph), circuit.mask, scores),
        "published": ref.published,
        "notes": notes,
    }


def grade_run(source: Path, reference: str | None = None, overwrite: bool = False) -> dict:
    """Grade the circuit (and scores) of a run folder or ``circuit.json`` against a reference
    (:func:`grade_circuit`), and write ``grade-{reference}.json`` and ``.csv`` beside it.

    Returns:
        The grade as written (with ``out``: its path).

    Raises:
        UserError: unknown reference, a model of another shape, unreadable scores;
        OutputExists: the grade exists and ``overwrite`` is off.
    """
    source = Path(source)
    circuit = load_circuit(source)
    folder = source if source.is_dir() else source.parent
    name = load_reference(reference or default_reference(circuit.task)).name
    targets = [folder / f"grade-{name}.{x}" for x in ("json", "csv")]
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
    graded = grade_circuit(circuit, name, scored_by)
    result = {k: graded[k] for k in ("reference", "reference_title", "citation")} | {"run": str(folder)} | graded
    rows = [{"level": level} | {k: result[level].get(k) for k in ("total",) + COLUMNS} for level in ("edges", "nodes")]
    tmp = [t.with_name(f".{t.name}.tmp") for t in targets]
    tmp[0].write_text(json.dumps(result, indent=1) + "\n")
    pd.DataFrame(rows).to_csv(tmp[1], index=False)
    for t, final in zip(tmp, targets):
        os.replace(t, final)
    return result | {"out": str(targets[0])}


def format_table(result: dict) -> str:
    """The grade as a small text table (what ``circuits grade`` prints)."""
    shown = {
        "reference": "reference",
        "circuit": "circuit",
        "shared": "shared",
        "precision": "precision",
        "recall": "recall",
        "f1": "F1",
        "roc_auc": "ROC-AUC",
        "top_k_precision": "top-k P",
        "top_k_recall": "top-k R",
        "r_precision": "R-prec",
    }
    heads = ("level", *shown.values())

    def cell(v) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else f"{v:,}")

    rows = [[level] + [cell(result[level].get(k)) for k in shown] for level in ("edges", "nodes")]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    e, n = result["edges"], result["nodes"]
    top = (
        f"{result['reference']} ({result['reference_title']}): {e['reference']:,} of {e['total']:,} edges, "
        f"{n['reference']} of {n['total']} heads and MLPs"
    )
    published = result["published"].get("acdc_edge_roc_auc")
    tail = [f"published for comparison: ACDC edge ROC-AUC {published}"] if published is not None else []
    return "\n".join([top, *lines, *tail, *(f"note: {x}" for x in result["notes"])])
