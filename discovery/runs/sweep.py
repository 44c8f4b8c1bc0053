"""Sweeps: one discovery run per (task, model, method), and one table comparing them.

Each run is :func:`circuitfinder.runs.run.run_config`, written to ``OUT/TASK-MODEL-METHOD/`` exactly as
``circuits discover --out`` writes it. Runs go one after another in this process (``workers=0``,
the default: one run already keeps two CPU cores busy, so on a small machine two runs at once
only share the same cores and double the memory), or as Ray tasks (Moritz et al. 2018), at most
``workers`` at a time with ``cpus`` CPUs (torch threads) each, on a local Ray instance or an
existing cluster (``address``). A folder whose ``summary.json`` says ``finished`` for the same
settings is skipped, so rerunning a sweep only does what is missing. A run that fails is a row
with status ``failed`` and its one-line error; the others go on. The table (``sweep.csv``,
``sweep.md``) is read from the runs' summaries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator

import pandas as pd

from circuitfinder.config import DiscoverConfig
from circuitfinder.errors import UserError
from circuitfinder.graphs.tables import to_markdown
from circuitfinder.methods.registry import Reporter
from circuitfinder.runs.pipeline import check_config, run_name
from circuitfinder.runs.run import run_config

COLUMNS = (
    "task",
    "model",
    "method",
    "status",
    "metric",
    "metric_clean",
    "metric_corrupted",
    "accuracy_clean",
    "edges_total",
    "edges_kept",
    "edges_pct",
    "nodes_kept",
    "faithfulness",
    "cpr",
    "cmd",
    "seconds",
    "run",
    "error",
)
FROM_SUMMARY = (
    "metric",
    "metric_clean",
    "metric_corrupted",
    "accuracy_clean",
    "edges_total",
    "edges_kept",
    "nodes_kept",
    "faithfulness",
    "cpr",
    "cmd",
    "seconds",
)
INTEGERS = ("edges_total", "edges_kept", "nodes_kept")
NOT_SETTINGS = ("workers", "address")  # where a run executes, not what it computes


def plan(base: DiscoverConfig, tasks: list[str], models: list[str], methods: list[str]) -> list[DiscoverConfig]:
    """The runs of a sweep, task by task, then model, then method; each checked before any runs."""
    for option, names in (("tasks", tasks), ("models", models), ("methods", methods)):
        if not names:
            raise UserError(f"`{option}` needs at least one name", option)
        if len(set(names)) < len(names):
            raise UserError(f"`{option}` names something twice: {', '.join(names)}", option)
    configs = [dataclasses.replace(base, task=t, model=m, method=k) for t in tasks for m in models for k in methods]
    names = [run_name(c) for c in configs]
    if len(set(names)) < len(names):
        raise UserError("two runs would share one folder name (names differing only in punctuation); rename one")
    for config in configs:
        check_config(config)
    return configs


def _settings(config: DiscoverConfig) -> dict:
    return {k: v for k, v in json.loads(json.dumps(config.flat())).items() if k not in NOT_SETTINGS}


def finished_summary(run_dir: Path, config: DiscoverConfig) -> dict | None:
    """The summary of a finished run of ``config`` in ``run_dir``, or None if there is none.

    Raises:
        UserError: the folder holds a finished run made with other settings.
    """
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(summary, dict) and summary.get("finished") is True and isinstance(saved, dict)):
        return None
    try:
        have = _settings(DiscoverConfig.from_json(saved))
    except (UserError, TypeError):
        have = {}
    want = _settings(config)
    if want != have:
        differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise UserError(
            f"{run_dir} holds a finished run with other settings ({', '.join(differ)}): "
            "use another `out`, or pass `overwrite=True`"
        )
    return summary


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def run_one(config: DiscoverConfig, out: Path, overwrite: bool = False, threads: int | None = None) -> dict:
    """One run; returns its summary, or ``{"error": one line}`` if it failed (Ctrl-C still stops it)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        return run_config(config, out=out, overwrite=overwrite).summary.to_json()
    except Exception as exc:  # a failed run is a row of the table, not the end of the sweep
        return {"error": one_line(exc)}


def _in_process(jobs, overwrite, started) -> Iterator[tuple[DiscoverConfig, Path, dict]]:
    for config, path in jobs:
        started(path)
        yield config, path, run_one(config, path, overwrite)


def _on_ray(
    jobs, overwrite, started, workers: int, cpus: int, address: str | None
) -> Iterator[tuple[DiscoverConfig, Path, dict]]:
    import ray

    own = not ray.is_initialized()
    if own:
        kwargs = (
            {"address": address}
            if address
            else {"address": "local", "num_cpus": workers * cpus, "include_dashboard": False}
        )
        ray.init(log_to_driver=False, configure_logging=False, **kwargs)
    remote = ray.remote(num_cpus=cpus)(run_one)
    queue, pending = list(jobs), {}
    try:
        while queue or pending:
            while queue and len(pending) < workers:  # at most `workers` runs in flight
                config, path = queue.pop(0)
                started(path)
                pending[remote.remote(config, path, overwrite, cpus)] = (config, path)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            config, path = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the worker itself died
                result = {"error": one_line(exc)}
            yield config, path, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if own:
            ray.shutdown()


def row(config: DiscoverConfig, status: str, result: dict) -> dict:
    """One line of the table: the run's settings, status and the figures of its summary."""
    values = {k: result.get(k) for k in FROM_SUMMARY}
    kept, total = values["edges_kept"], values["edges_total"]
    return (
        {"task": config.task, "model": config.model, "method": config.method, "status": status}
        | values
        | {
            "edges_pct": 100 * kept / total if kept is not None and total else None,
            "run": run_name(config),
            "error": result.get("error", ""),
        }
    )


def table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype(
        {k: "Int64" for k in INTEGERS}
        | {
            k: "float64"
            for k in (
                "metric_clean",
                "metric_corrupted",
                "accuracy_clean",
                "edges_pct",
                "faithfulness",
                "cpr",
                "cmd",
                "seconds",
            )
        }
    )


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def write_table(frame: pd.DataFrame, out: Path, base: DiscoverConfig) -> tuple[Path, Path]:
    """``sweep.csv`` and ``sweep.md`` (the table, the shared settings, links to each run's diagram)."""
    shared = {k: v for k, v in base.flat().items() if k not in ("task", "model", "method") + NOT_SETTINGS}
    links = []
    for r in frame.itertuples():
        files = [
            f"[{label}]({r.run}/{name})"
            for name, label in (("circuit.svg", "diagram"), ("circuit.dot", "diagram (dot)"), ("curve.png", "curve"))
            if r.status != "failed" and (out / r.run / name).is_file()
        ]
        if files:
            links.append(f"- {r.run}: {', '.join(files)}")
    md = (
        f"# Sweep (tasks × models × methods: {frame.task.nunique()} × {frame.model.nunique()} × "
        f"{frame.method.nunique()})\n\n"
        f"Settings of every run: {', '.join(f'{k}={v}' for k, v in shared.items())}.\n"
        "faithfulness, cpr and cmd are held-out and exact; edges_pct is edges_kept / edges_total in %.\n\n"
        f"{to_markdown(frame)}\n\n## Diagrams\n\n" + ("\n".join(links) or "(none)") + "\n"
    )
    csv, markdown = out / "sweep.csv", out / "sweep.md"
    frame.to_csv(out / ".sweep.csv.tmp", index=False)
    (out / ".sweep.md.tmp").write_text(md)
    os.replace(out / ".sweep.csv.tmp", csv)
    os.replace(out / ".sweep.md.tmp", markdown)
    return csv, markdown


def sweep(
    tasks: list[str],
    models: list[str],
    methods: list[str] = ("eap-ig",),
    out: Path = Path("outputs/sweep"),
    base: DiscoverConfig = DiscoverConfig(),
    workers: int = 0,
    cpus: int = 1,
    address: str | None = None,
    overwrite: bool = False,
    reporter: Reporter = Reporter(),
) -> pd.DataFrame:
    """Run discovery for every (task, model, method) and write the comparison table.

    Args:
        tasks, models, methods: what to run; every combination is one run folder under ``out``.
        out: the sweep's folder.
        base: the other settings of every run (pairs, seed, size choice, curve, …).
        workers: runs at once on Ray; 0 runs them one after another in this process.
        cpus: CPUs (and torch threads) per Ray run.
        address: an existing Ray cluster to join (its machines must see ``out``).
        overwrite: redo runs that already finished.
        reporter: receives one line per run started, finished, skipped or failed.

    Returns:
        The table also written to ``out/sweep.csv`` and ``out/sweep.md``, in plan order.
    """
    if workers < 0 or cpus < 1:
        raise UserError(f"`workers` must be ≥ 0 and `cpus_per_run` ≥ 1, got {workers} and {cpus}", "workers")
    configs = plan(base, list(tasks), list(models), list(methods))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    stamp = lambda: f"[{_clock(time.perf_counter() - begun)}]"  # noqa: E731
    rows: dict[str, dict] = {}
    jobs = []
    for config in configs:
        path = out / run_name(config)
        try:
            summary = None if overwrite else finished_summary(path, config)
        except UserError as exc:
            rows[path.name] = row(config, "failed", {"error": one_line(exc)})
            reporter.log(f"{stamp()} failed   {path.name}: {exc}")
            continue
        if summary is not None:
            rows[path.name] = row(config, "skipped", summary)
            reporter.log(
                f"{stamp()} skipped  {path.name}: finished earlier (faithfulness {summary['faithfulness']:.3f})"
            )
        else:
            jobs.append((config, path))
    count = iter(range(1, len(jobs) + 1))
    started_at: dict[str, float] = {}

    def started(path: Path) -> None:
        started_at[path.name] = time.perf_counter()
        reporter.log(f"{stamp()} started  {path.name} ({next(count)}/{len(jobs)})")

    runs = (
        _on_ray(jobs, overwrite, started, workers, cpus, address) if workers else _in_process(jobs, overwrite, started)
    )
    for config, path, result in runs:
        took = _clock(time.perf_counter() - started_at[path.name])
        if "error" in result:
            rows[path.name] = row(config, "failed", result)
            reporter.log(f"{stamp()} failed   {path.name} after {took}: {result['error']}")
        else:
            rows[path.name] = row(config, "finished", result)
            reporter.log(
                f"{stamp()} finished {path.name} in {took}: faithfulness {result['faithfulness']:.3f}, "
                f"{result['edges_kept']:,} of {result['edges_total']:,} edges"
            )
    frame = table([rows[run_name(c)] for c in configs])
    csv, md = write_table(frame, out, base)
    reporter.log(f"{stamp()} wrote {csv} and {md}")
    return frame
