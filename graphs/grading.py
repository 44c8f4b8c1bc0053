"""Grading a method against a reference circuit: ROC-AUC of its score ranking, precision and recall.

As in the ACDC evaluation (Conmy et al. 2023, arXiv:2304.14997), a method is graded on how well
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
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Bool, Float

from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.graphs.reference import node_mask

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

