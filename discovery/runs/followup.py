"""Work on a saved run folder: check its scores against exact single-edge patching
(:func:`validate_run`), and measure its model's head roles (:func:`roles_for_run`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from circuitfinder.engine.adapter import ModelAdapter, load_unchecked
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.errors import OutputExists, UserError
from circuitfinder.graphs.explorer import write_explorer
from circuitfinder.graphs.tables import read_scores
from circuitfinder.methods.registry import Reporter
from circuitfinder.runs.pipeline import build_run_task
from circuitfinder.runs.run import figure, load_run_config


def validate_run(
    run_dir: Path,
    top: int = 40,
    random: int = 60,
    overwrite: bool = False,
    reporter: Reporter = Reporter(),
    adapter: ModelAdapter | None = None,
) -> dict:
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
    edges, groups = pick_edges(graph, scores, top, random, seed=config.prompts.seed)
    with reporter.progress(
        f"exact effects of {len(edges)} edges",
        len(edges) * len(list(task.batches("discovery", config.execution.batch_size))),
    ) as advance:
        effects = exact_edge_effects(
            adapter,
            graph,
            task,
            edges,
            "discovery",
            config.execution.batch_size,
            progress=advance,
            ablation=config.size.ablation,
        )
    frame = pd.DataFrame(
        {
            "edge": [graph.edge_name(s, r) for s, r in edges],
            "group": groups,
            "score": [float(scores[s, r]) for s, r in edges],
            "exact_effect": effects.numpy(),
        }
    )
    result = {
        "method": config.method,
        "edges": len(edges),
        "all": correlations(torch.tensor(frame.score, device="cpu"), effects),
    }
    for group in ("top", "random"):
        part = frame[frame.group == group]
        if len(part) >= 3:
            result[group] = correlations(
                torch.tensor(part.score.to_numpy(), device="cpu"),
                torch.tensor(part.exact_effect.to_numpy(), device="cpu"),
            )
    _scatter(frame, result, run_dir / ".validation.png.tmp")
    frame.to_csv(run_dir / ".validation.csv.tmp", index=False)
    (run_dir / ".validation.json.tmp").write_text(json.dumps(result, indent=1) + "\n")
    for t in targets:
        os.replace(t.with_name(f".{t.name}.tmp"), t)
    reporter.log(
        f"{config.method} against exact single-edge patching on {len(edges)} edges: "
        f"Pearson {result['all']['pearson']:.3f}, Spearman {result['all']['spearman']:.3f}"
    )
    return result


def _scatter(frame: pd.DataFrame, result: dict, path: Path) -> None:
    fig, ax = figure(5, 5)
    for group, marker in (("random", "o"), ("top", "^")):
        part = frame[frame.group == group]
        ax.scatter(part.exact_effect, part.score, s=14, marker=marker, alpha=0.7, label=f"{group} ({len(part)})")
    low = min(frame.exact_effect.min(), frame.score.min())
    high = max(frame.exact_effect.max(), frame.score.max())
    ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--", label="score = effect")
    ax.set_xlabel("exact effect: m(edge patched) − m(clean)")
    ax.set_ylabel(f"{result['method']} score")
    ax.set_title(
        f"{result['method']}: Pearson {result['all']['pearson']:.2f}, Spearman {result['all']['spearman']:.2f}"
    )
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
    table = measure_roles(adapter, task, max_prompts=max_prompts, batch_size=config.execution.batch_size)
    table.to_csv(target, index=False)
    labelled = table[table.role.notna()]
    (run_dir / "roles.md").write_text(
        f"# Head roles: {config.task} on {config.model} ({min(max_prompts, len(task))} clean prompts)\n\n"
        + to_markdown(labelled, floatfmt=".3f")
        + "\n"
    )
    attention = attention_patterns(adapter, task, load_circuit(run_dir).heads())
    (run_dir / "attention.json").write_text(json.dumps(attention) + "\n")
    write_explorer(run_dir)
    return table
