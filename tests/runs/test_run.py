"""The discovery run end to end on a tiny model, its run folder, and the command line's handling of bad input."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from helpers import tiny_ioi_model  # noqa: F401 (fixture)

from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.errors import OutputExists, UserError
from circuitfinder.graphs.circuit import Circuit
from circuitfinder.methods.registry import Reporter
from circuitfinder.runs.pipeline import check_config, wants_curve
from circuitfinder.runs.run import run_config

ROOT = Path(__file__).resolve().parents[2]


def test_discover_writes_a_complete_run_folder(tiny_ioi_model, tmp_path):
    out = tmp_path / "run"
    config = DiscoverConfig.from_options(
        task="ioi", model="tiny-llama", method="eap-ig", n_pairs=16, batch_size=8, edges=40, force=True
    )
    summary = run_config(config, out=out, adapter=tiny_ioi_model).summary
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "summary.json",
        "scores.parquet",
        "circuit.json",
        "circuit.svg",
        "circuit.html",
        "prompts.jsonl",
    } <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    saved = json.loads((out / "summary.json").read_text())
    for key in (
        "model",
        "task",
        "method",
        "edges_total",
        "edges_kept",
        "nodes_kept",
        "faithfulness",
        "metric_clean",
        "metric_corrupted",
        "seconds",
        "forward_passes",
        "curve",
        "cpr",
        "cmd",
    ):
        assert key in saved
    assert saved["curve"][-1] == [1.0, pytest.approx(1.0, abs=1e-5)] and len(saved["curve"]) == 10
    assert {"curve.csv", "curve.png"} <= names
    assert saved["finished"] is True and saved["edges_total"] == 190 and saved["edges_kept"] <= 40
    assert json.loads((out / "config.json").read_text())["size"]["edges"] == 40
    table = pd.read_parquet(out / "scores.parquet")
    assert len(table) == 190 and table["in_circuit"].sum() == saved["edges_kept"]
    nodes = pd.read_csv(out / "nodes.csv")
    assert len(nodes) == 16 and list(nodes.columns) == ["node", "score", "rank", "in_circuit"]
    by_sender = table.groupby("sender")["score"].sum()
    assert nodes.set_index("node")["score"].to_dict() == pytest.approx(by_sender.to_dict(), abs=1e-6)
    assert sorted(nodes["rank"]) == list(range(1, 17))
    assert (
        Circuit.load(out / "circuit.json").edges
        and len(Circuit.load(out / "circuit.json").edges) == saved["edges_kept"]
    )
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]) == {"clean", "corrupted", "answer", "wrong", "split"}
    ET.parse(out / "circuit.svg")
    assert summary.faithfulness == pytest.approx(saved["faithfulness"])
    assert saved["target_faithfulness"] == 0.8 and saved["meets_target"] == (saved["faithfulness"] >= 0.8)


def test_group_acdc_run_logs_each_decision_and_says_when_it_misses_the_target(tiny_ioi_model, tmp_path):
    class Log(Reporter):
        lines: list = []

        def log(self, message):
            self.lines.append(message)

    config = DiscoverConfig.from_options(
        task="ioi",
        model="tiny-llama",
        method="acdc-groups",
        n_pairs=16,
        batch_size=8,
        edges=60,
        force=True,
        search_prompts=4,
        target_faithfulness=0.9,
    )
    summary = run_config(config, out=tmp_path / "a", adapter=tiny_ioi_model, reporter=Log()).summary
    assert summary.curve is None and not (tmp_path / "a" / "curve.csv").exists()  # no curve after a search by default
    assert wants_curve(DiscoverConfig.from_options(method="eap-ig")) and wants_curve(
        DiscoverConfig.from_options(method="acdc-groups", curve=True)
    )
    search = summary.search
    assert search["rule"] == "acdc-groups" and search["candidates"] <= 60
    decisions = pd.read_csv(tmp_path / "a" / "decisions.csv")  # one row per candidate, with the trial that decided it
    tried = decisions[decisions.decision != "dead receiver"]
    stands = (tried.distance_removed - tried.distance_before < search["tau"]) & (
        tried.metric_removed >= search["metric_floor"]
    )
    assert (stands == (tried.decision == "removed")).all()  # ACDC's τ and the floor (the target on the search prompts)
    assert not ((tried.distance_removed - tried.distance_before < search["tau"]) == (tried.decision == "removed")).all()
    removed = tried[tried.decision == "removed"]
    assert removed.duplicated(["distance_removed", "distance_before"]).any()  # some edges went in one group
    assert json.loads((tmp_path / "a" / "certificate.json").read_text())["edges"] == summary.edges_kept
    assert summary.meets_target is (summary.faithfulness >= 0.9)
    if not summary.meets_target:
        assert any(line.startswith("below target:") and "`n_pairs`" in line for line in Log.lines)


@pytest.mark.parametrize("ablation, method", [("mean", "eap"), ("zero", "eap-ig-activations")])
def test_discover_uses_the_chosen_ablation_throughout(tiny_ioi_model, tmp_path, ablation, method):
    """The run's baseline m(∅) is the every-edge-ablated metric of that ablation, not the corrupted run."""
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.tasks import build_task

    config = DiscoverConfig.from_options(
        task="ioi", n_pairs=16, batch_size=8, edges=30, ablation=ablation, method=method, ig_steps=2, force=True
    )
    summary = run_config(config, out=tmp_path / "run", adapter=tiny_ioi_model).summary
    assert summary.ablation == ablation
    assert json.loads((tmp_path / "run" / "config.json").read_text())["size"]["ablation"] == ablation
    task = build_task("ioi", tiny_ioi_model.tokenizer, n_pairs=16, seed=0)
    graph = EdgeGraph(tiny_ioi_model.shape)
    expected = CircuitEvaluator(tiny_ioi_model, graph, task, "heldout", 8, ablation=ablation).baseline.corrupted
    counterfactual = CircuitEvaluator(tiny_ioi_model, graph, task, "heldout", 8).baseline.corrupted
    assert summary.metric_corrupted == pytest.approx(expected, abs=1e-5)
    assert abs(summary.metric_corrupted - counterfactual) > 1e-3
    assert summary.curve[-1][1] == 1.0


def test_discover_refuses_to_overwrite_unless_asked(tiny_ioi_model, tmp_path):
    out = tmp_path / "run"
    config = DiscoverConfig.from_options(
        task="ioi", model="tiny-llama", method="eap-ig", n_pairs=8, batch_size=8, edges=20, force=True
    )
    run_config(config, out=out, adapter=tiny_ioi_model)
    before = (out / "summary.json").read_text()
    with pytest.raises(OutputExists, match="overwrite=True"):
        run_config(config, out=out, adapter=tiny_ioi_model)
    assert (out / "summary.json").read_text() == before
    run_config(config, out=out, overwrite=True, adapter=tiny_ioi_model)


def test_same_seed_gives_byte_identical_circuit(tiny_ioi_model, tmp_path):
    config = DiscoverConfig.from_options(
        task="ioi", model="tiny-llama", method="eap-ig", n_pairs=8, batch_size=8, edges=20, force=True
    )
    run_config(config, out=tmp_path / "a", adapter=tiny_ioi_model)
    run_config(config, out=tmp_path / "b", adapter=tiny_ioi_model)
    assert (tmp_path / "a" / "circuit.json").read_bytes() == (tmp_path / "b" / "circuit.json").read_bytes()


@pytest.mark.parametrize(
    "config, message",
    [
        (DiscoverConfig.from_options(task="nope"), "unknown task"),
        (DiscoverConfig.from_options(method="nope"), "unknown method"),
        (DiscoverConfig.from_options(ablation="nope"), "unknown ablation"),
        (DiscoverConfig.from_options(edges=10, threshold=0.1), "not both"),
        (DiscoverConfig.from_options(edges=0), "at least 1"),
        (DiscoverConfig.from_options(target_faithfulness=1.5), "`target_faithfulness` must be in"),
        (DiscoverConfig.from_options(threshold=float("nan")), "threshold"),
        (
            DiscoverConfig.from_options(method="acdc-groups", acdc_metric="prompts"),
            "`acdc_metric` must be one of kl, task, prompt",
        ),
        (
            DiscoverConfig.from_options(method="acdc-groups", ablation="mean"),
            "patches from the counterfactual run only",
        ),
        (
            DiscoverConfig.from_options(seed_faithfulness=0.7),
            r"`seed_faithfulness` must be at least `target_faithfulness` \(0.8\) and at most 1",
        ),
        (
            DiscoverConfig.from_options(method="eap-ig", seed_faithfulness=0.9),
            "`seed_faithfulness` is for the seeded searches",
        ),
    ],
)
def test_bad_configurations_are_user_errors(config, message):
    with pytest.raises(UserError, match=message):
        check_config(config)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "circuitfinder.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["discover", "--task", "nope"], "unknown task 'nope'"),
        (["discover", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["discover", "--edges", "5", "--threshold", "1"], "not both"),
        (["discover", "--ablation", "nope"], "unknown ablation 'nope'"),
        (["render", "/no/such/run"], "no circuit file"),
        (["discover", "--task", "/no/such/task.jsonl"], "no task file at /no/such/task.jsonl"),
        (["validate", "/no/such/run"], "not a run folder"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_no_traceback(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_cli_refuses_an_existing_output_folder(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    result = _cli("discover", "--out", str(tmp_path))
    assert result.returncode == 2 and "already holds results" in result.stderr and "Traceback" not in result.stderr


def test_a_run_s_prompts_file_is_a_task_file(tiny_ioi_model, tmp_path):
    """prompts.jsonl of one run drives another run through --task FILE, with the same split."""
    first = run_config(
        DiscoverConfig.from_options(task="ioi", method="eap-ig", n_pairs=8, batch_size=8, edges=20, force=True),
        out=tmp_path / "a",
        adapter=tiny_ioi_model,
    ).summary
    task_file = str(tmp_path / "a" / "prompts.jsonl")
    second = run_config(
        DiscoverConfig.from_options(task=task_file, method="eap-ig", n_pairs=8, batch_size=8, edges=20, force=True),
        out=tmp_path / "b",
        adapter=tiny_ioi_model,
    ).summary
    assert second.metric_clean == pytest.approx(first.metric_clean, abs=1e-5)
    assert second.faithfulness == pytest.approx(first.faithfulness, abs=1e-5)


def test_a_behaviour_the_model_lacks_is_refused_unless_forced(tiny_ioi_model, tmp_path):
    """A random tiny model does not do IOI: the run stops with a clear message, and --force runs it."""
    from circuitfinder.engine.faithfulness import Baseline
    from circuitfinder.runs.pipeline import MIN_ACCURACY, check_behaviour

    lacking = Baseline(clean=0.1, corrupted=0.2, accuracy=0.5, n_prompts=8)
    with pytest.raises(UserError, match="does not show the behaviour.*force=True"):
        check_behaviour(lacking, DiscoverConfig(), "m")
    check_behaviour(lacking, DiscoverConfig.from_options(force=True), "m")
    check_behaviour(Baseline(clean=2.0, corrupted=0.0, accuracy=MIN_ACCURACY, n_prompts=8), DiscoverConfig(), "m")
    with pytest.raises(UserError, match="accuracy"):
        check_behaviour(
            Baseline(clean=2.0, corrupted=0.0, accuracy=MIN_ACCURACY - 0.01, n_prompts=8), DiscoverConfig(), "m"
        )


def test_a_task_file_with_a_bad_row_is_refused_unless_bad_rows_are_skipped(tiny_ioi_model, tmp_path):
    from circuitfinder.tasks.base import TaskError

    run_config(
        DiscoverConfig.from_options(task="ioi", method="eap-ig", n_pairs=8, batch_size=8, edges=20, force=True),
        out=tmp_path / "a",
        adapter=tiny_ioi_model,
    )
    rows = (tmp_path / "a" / "prompts.jsonl").read_text().splitlines()
    bad = json.loads(rows[0]) | {"corrupted": "too short"}
    task_file = tmp_path / "task.jsonl"
    task_file.write_text("\n".join([json.dumps(bad)] + rows[1:]) + "\n")
    config = DiscoverConfig.from_options(
        task=str(task_file), method="eap-ig", n_pairs=8, batch_size=8, edges=20, force=True
    )
    with pytest.raises(TaskError, match=r"task.jsonl:1:"):
        run_config(config, out=tmp_path / "b", adapter=tiny_ioi_model)
    assert not (tmp_path / "b").exists()
    skipped = run_config(config.replace(skip_bad_rows=True), out=tmp_path / "c", adapter=tiny_ioi_model).summary
    assert skipped.prompts_discovery + skipped.prompts_heldout == 7


def test_acdc_run_writes_a_certificate_and_reuses_its_attribution(tiny_ioi_model, tmp_path):
    config = DiscoverConfig.from_options(
        task="ioi",
        model="tiny-llama",
        method="acdc",
        floor=False,
        n_pairs=16,
        batch_size=8,
        edges=40,
        force=True,
        curve=False,
        search_prompts=4,
        chain=4,
    )
    summary = run_config(config, out=tmp_path / "a", adapter=tiny_ioi_model).summary
    search = summary.search
    assert search["rule"] == "acdc" and search["distance"] == "task" and search["candidates"] <= 40
    assert (tmp_path / "a" / "roles.csv").is_file()  # a search's run keeps its roles table beside its log
    assert summary.edges_kept <= search["candidates"]
    certificate = json.loads((tmp_path / "a" / "certificate.json").read_text())
    assert certificate["edges"] == summary.edges_kept == len(certificate["necessity"])
    assert certificate["faithfulness_heldout"] == pytest.approx(summary.faithfulness)
    assert len(pd.read_csv(tmp_path / "a" / "necessity.csv")) == summary.edges_kept
    decisions = pd.read_csv(tmp_path / "a" / "decisions.csv")  # ACDC's log, one row per candidate
    assert list(decisions.step) == list(range(1, search["candidates"] + 1))
    tried = decisions[decisions.decision != "dead receiver"]
    rise = tried.distance_removed - tried.distance_before
    assert ((rise < search["tau"]) == (tried.decision == "removed")).all()
    after = tried.distance_removed.where(tried.decision == "removed", tried.distance_before)
    assert list(after[:-1]) == list(tried.distance_before[1:])  # each decision starts where the last one left
    circuit = {
        f"{e['sender']}->{e['receiver']}" for e in json.loads((tmp_path / "a" / "circuit.json").read_text())["edges"]
    }
    assert circuit <= set(tried.edge[tried.decision == "kept"])
    kept = [p.name for p in (tmp_path / ".checkpoints").iterdir()]
    assert len(kept) == 1  # the search's checkpoint is gone; the attribution is kept for reuse

    class Log(Reporter):
        lines: list = []

        def log(self, message):
            self.lines.append(message)

    again = run_config(config.replace(tau=0.0), out=tmp_path / "b", adapter=tiny_ioi_model, reporter=Log()).summary
    assert again.search["tau"] == 0.0
    assert any(line.startswith("reusing eap-ig scores") for line in Log.lines)


def test_unseeded_acdc_tries_every_edge_of_the_graph_in_graph_order(tiny_ioi_model, tmp_path):
    config = DiscoverConfig.from_options(
        task="ioi",
        model="tiny-llama",
        method="acdc",
        floor=False,
        seed_method="none",
        n_pairs=8,
        batch_size=8,
        force=True,
        search_prompts=4,
        chain=4,
    )
    summary = run_config(config, out=tmp_path / "a", adapter=tiny_ioi_model).summary
    graph = EdgeGraph(tiny_ioi_model.shape)
    assert summary.search["candidates"] == graph.n_edges  # nothing removed up front
    assert summary.search["seed_top_n_same_size"] is None and summary.cpr is None  # no ranking to compare
    assert 0 < summary.edges_kept < graph.n_edges
    with pytest.raises(UserError, match="is for the seeded methods"):
        check_config(DiscoverConfig.from_options(method="eap", seed_method="none"))


def test_seed_faithfulness_sizes_the_seed_and_the_floor_stays_the_target(tiny_ioi_model):
    """A search's seed is attribution's smallest top N reaching ``seed_faithfulness`` (by default
    halfway from the target to 1) on the discovery prompts, while every removal still keeps the target."""

    def run(**options):
        config = DiscoverConfig.from_options(
            task="ioi",
            model="tiny-llama",
            method="acdc-groups",
            seed_method="eap",
            n_pairs=16,
            batch_size=8,
            force=True,
            search_prompts=4,
            target_faithfulness=0.5,
            roles=False,
            **options,
        )
        return run_config(config, adapter=tiny_ioi_model).summary

    plain, roomy = run(), run(seed_faithfulness=0.95)
    for summary, seed_target in ((plain, 0.75), (roomy, 0.95)):  # by default halfway from the target to 1
        reached = {p["top_n"]: p["faithfulness_discovery"] for p in summary.size_search}
        smaller = [f for n, f in reached.items() if n < summary.edges_selected]
        assert reached[summary.edges_selected] >= seed_target > max(smaller, default=-1)
        assert summary.size_search_target == seed_target
    assert roomy.edges_selected > plain.edges_selected
    assert roomy.search["target_faithfulness"] == 0.5  # the floor is the target, not the seed's
