"""Sweeps over tasks × models on a tiny model folder: the table, skipping finished runs, failures, Ray."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from circuitfinder.config import DiscoverConfig
from circuitfinder.errors import UserError
from circuitfinder.methods.registry import Reporter
from circuitfinder.runs.pipeline import run_name
from circuitfinder.runs.sweep import FROM_SUMMARY, sweep

ROOT = Path(__file__).resolve().parents[2]
BASE = DiscoverConfig.from_options(
    n_pairs=8, batch_size=8, edges=20, ig_steps=2, force=True, dtype="float32"
)  # Ray tasks: conftest's patch does not reach them


class Log(Reporter):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def _mtimes(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}


def _same(a, b) -> bool:
    if a is None or a is pd.NA or (isinstance(a, float) and math.isnan(a)):
        return b is None
    return a == b


@pytest.fixture(scope="module")
def first(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    log = Log()
    frame = sweep(["ioi", "induction"], [str(tiny_model_dir)], ["eap-ig"], out=out, base=BASE, reporter=log)
    return out, frame, log


def test_in_process_sweep_writes_one_run_per_task_and_a_table_of_their_summaries(first, tiny_model_dir):
    out, frame, log = first
    assert list(frame.task) == ["ioi", "induction"] and set(frame.model) == {str(tiny_model_dir)}
    assert list(frame.status) == ["finished", "finished"] and list(frame.method) == ["eap-ig"] * 2
    for r in frame.to_dict("records"):
        run = out / run_name(DiscoverConfig.from_options(task=r["task"], model=r["model"], method=r["method"]))
        assert r["run"] == run.name
        assert {"config.json", "summary.json", "circuit.json", "circuit.svg", "scores.parquet", "prompts.jsonl"} <= {
            p.name for p in run.iterdir()
        }
        summary = json.loads((run / "summary.json").read_text())
        for key in FROM_SUMMARY:
            assert _same(r[key], summary[key]), key
        assert summary["cpr"] is not None and summary["cmd"] is not None  # the curve ran: columns filled
        assert r["edges_pct"] == pytest.approx(100 * summary["edges_kept"] / summary["edges_total"])
        assert (
            json.loads((run / "config.json").read_text())["prompts"]["n_pairs"] == 8
        )  # the shared settings reached the run
    saved = pd.read_csv(out / "sweep.csv", keep_default_na=False)
    assert list(saved.columns) == list(frame.columns) and list(saved.task) == ["ioi", "induction"]
    assert saved.faithfulness.tolist() == pytest.approx(frame.faithfulness.tolist(), rel=1e-12)
    md = (out / "sweep.md").read_text()
    assert md.count("| finished |") == 2
    for name in frame.run:
        assert f"({name}/circuit.svg)" in md and f"({name}/curve.png)" in md
    started = [line for line in log.lines if " started " in line]
    finished = [line for line in log.lines if " finished " in line]
    assert len(started) == len(finished) == 2 and all(line.startswith("[0:") for line in started + finished)


def test_a_rerun_skips_finished_runs_without_touching_them(first, tiny_model_dir):
    out, frame, _ = first
    before = {name: _mtimes(out / name) for name in frame.run}
    log = Log()
    again = sweep(["ioi", "induction"], [str(tiny_model_dir)], ["eap-ig"], out=out, base=BASE, reporter=log)
    assert {name: _mtimes(out / name) for name in frame.run} == before
    assert list(again.status) == ["skipped", "skipped"]
    assert len([line for line in log.lines if " skipped " in line]) == 2 and not any(
        " started " in line for line in log.lines
    )
    columns = [c for c in frame.columns if c != "status"]
    assert again[columns].astype(object).fillna("").equals(frame[columns].astype(object).fillna(""))
    # the check can fail: --overwrite redoes a finished run, and its files are new
    sweep(["ioi"], [str(tiny_model_dir)], ["eap-ig"], out=out, base=BASE, overwrite=True)
    assert _mtimes(out / frame.run[0]) != before[frame.run[0]]


def test_a_failed_run_is_a_row_and_the_others_go_on(tiny_model_dir, tmp_path):
    out = tmp_path / "s"
    log = Log()
    frame = sweep(["ioi"], ["no-such-model", str(tiny_model_dir)], ["eap"], out=out, base=BASE, reporter=log)
    failed, done = frame.iloc[0], frame.iloc[1]
    assert failed.status == "failed" and "unknown model 'no-such-model'" in failed.error and "\n" not in failed.error
    assert failed.faithfulness != failed.faithfulness and failed.edges_kept is pd.NA  # empty, not made up
    assert not (out / failed.run).exists()
    assert done.status == "finished" and done.error == "" and (out / done.run / "summary.json").is_file()
    assert "| failed |" in (out / "sweep.md").read_text()
    assert any(" failed " in line and "no-such-model" in line for line in log.lines)


def test_a_finished_run_with_other_settings_is_not_reused(tmp_path):
    out = tmp_path / "s"
    config = DiscoverConfig.from_options(task="ioi", model="no-such-model", method="eap")
    run = out / run_name(config)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"finished": True, "faithfulness": 0.5}))
    (run / "config.json").write_text(json.dumps(config.replace(n_pairs=64, workers=3).to_json()))
    frame = sweep(["ioi"], ["no-such-model"], ["eap"], out=out, base=DiscoverConfig.from_options(n_pairs=128))
    assert frame.status[0] == "failed" and "other settings (n_pairs)" in frame.error[0]
    (run / "config.json").write_text(json.dumps(config.replace(workers=3).to_json()))  # where it ran does not matter
    assert sweep(["ioi"], ["no-such-model"], ["eap"], out=out).status[0] == "skipped"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": ["ioi", "nope"]}, "unknown task 'nope'"),
        ({"methods": ["eap", "eap"]}, "twice"),
        ({"models": []}, "at least one"),
        ({"workers": -1}, "`workers` must be ≥ 0"),
    ],
)
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, kwargs, message):
    args = {"tasks": ["ioi"], "models": ["m"], "methods": ["eap"]} | kwargs
    with pytest.raises(UserError, match=message):
        sweep(**args, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_ray_sweep_with_one_worker_gives_the_in_process_table(first, tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    _, want, _ = first
    log = Log()
    got = sweep(
        ["ioi", "induction"], [str(tiny_model_dir)], ["eap-ig"], out=tmp_path / "s", base=BASE, workers=1, reporter=log
    )
    assert list(got.status) == ["finished", "finished"], got.error.tolist()
    for column in ("task", "model", "method", "metric", "edges_total", "edges_kept", "nodes_kept", "run"):
        assert got[column].tolist() == want[column].tolist(), column
    for column in ("metric_clean", "metric_corrupted", "accuracy_clean", "edges_pct", "faithfulness", "cpr", "cmd"):
        assert got[column].tolist() == pytest.approx(want[column].tolist(), rel=1e-5, abs=1e-6), column
    assert len([line for line in log.lines if " finished " in line]) == 2


def test_cli_sweep_reports_each_run_and_exits_1_when_one_failed(tiny_model_dir, tmp_path):
    out = tmp_path / "s"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "circuitfinder.cli",
            "sweep",
            "--tasks",
            "ioi",
            "--models",
            f"{tiny_model_dir},no-such-model",
            "--methods",
            "eap",
            "--pairs",
            "8",
            "--batch-size",
            "8",
            "--edges",
            "20",
            "--force",
            "--no-curve",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    assert "2 runs: 1 finished, 0 skipped, 1 failed" in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.count(" started ") == 2 and " finished " in result.stderr and " failed " in result.stderr
    table = pd.read_csv(out / "sweep.csv")
    assert table.status.tolist() == ["finished", "failed"] and math.isnan(table.cpr[0])  # no curve: CPR empty
