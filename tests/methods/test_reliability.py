"""Reliability, the in-process part: bad input is a one-line error, numbers that would
make a result meaningless are errors, a failed write loses nothing, checkpoints survive damage,
runs are deterministic, and nothing unpickles what a user hands us.

The command line is driven in this process through ``circuitfinder.cli.main`` (the same function the
``circuits`` script calls), which keeps these tests fast; ``test_run.py`` runs a few of the same
errors through a real subprocess, and ``test_kill_resume.py`` kills real runs.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from helpers import tiny_ioi_model  # noqa: F401 (fixture)
from tiny_models import tiny_adapter, tiny_hf_model, tiny_task

from circuitfinder.checkpoint import Checkpoint
from circuitfinder.config import DiscoverConfig
from circuitfinder.engine.faithfulness import CircuitEvaluator, MetricError
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.errors import ModelNotFound, UserError
from circuitfinder.graphs.circuit import SCHEMA, VERSION, Circuit
from circuitfinder.runs.run import run_config
from circuitfinder.tasks import build_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(capsys):
    """Run the command line in this process: ``(exit status, stdout, stderr)``."""
    from circuitfinder import cli as cli_module

    def run(*args: str) -> tuple[int, str, str]:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            cli_module.main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            signal.signal(signal.SIGTERM, previous)  # main() installs its own SIGTERM handler
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err


def _circuit_doc(**changes) -> str:
    doc = {
        "schema": SCHEMA,
        "version": VERSION,
        "model": "m",
        "task": "ioi",
        "method": "eap",
        "n_layers": 2,
        "n_heads": 2,
        "n_kv_groups": 1,
        "metadata": {},
        "edges": [{"sender": "input", "receiver": "logits", "score": 1.0}],
    }
    return json.dumps(doc | changes)


# ---------------------------------------------------------------------------------------------
# 1. Input validation: one line on stderr, exit status 2, no traceback (unknown model and task,
#    a missing task file, --edges with --threshold and an existing --out: see test_run.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["discover", "--tau", "-1"], "--tau must be a number ≥ 0"),
        (["discover", "--target-faithfulness", "0"], "--target-faithfulness must be in (0, 1]"),
        (["discover", "--target-faithfulness", "1.5"], "--target-faithfulness must be in (0, 1]"),
        (["discover", "--edges", "0"], "--edges must be at least 1"),
        (["discover", "--threshold", "-1"], "--threshold must be a number ≥ 0"),
        (["discover", "--workers", "-1"], "--workers must be at least 0"),
        (["discover", "--chain", "0"], "--chain must be at least 1"),
        (["discover", "--pairs", "2"], "--pairs must be at least 4"),
        (["discover", "--method", "acdc", "--acdc-metric", "l2"], "--acdc-metric must be one of"),
        (["discover", "--edges", "many"], "Error: Invalid value for '--edges'"),
        (["discover", "--no-such-option"], "Error: No such option: --no-such-option"),
    ],
)
def test_out_of_range_options_are_one_line_errors(cli, args, message):
    code, out, err = cli(*args)
    if message.startswith("Error:"):  # usage errors: click's usage block and one error line, exit 2
        assert code == 2 and "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith(message), err
        return
    _one_line_error(code, err, message)
    assert err.strip().count("\n") == 0 and out == ""  # refused before anything was loaded or printed


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"cfg": {}, "edges": {}}', "is not a circuit file (schema must be"),
        (_circuit_doc(version=2), "has schema version 2"),
        (_circuit_doc(n_heads="two"), "'n_heads' must be a positive integer"),
        (_circuit_doc(edges=[{"sender": "a0.x9", "receiver": "logits", "score": 1}]), "not a node name"),
        (
            _circuit_doc(edges=[{"sender": "input", "receiver": "logits", "score": "high"}]),
            "score must be a finite number",
        ),
        ('{"schema": ', "is not valid JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (_circuit_doc(edges=[]), "holds an empty circuit: nothing to draw"),
    ],
)
def test_render_refuses_a_circuit_file_it_cannot_trust(cli, tmp_path, text, message):
    path = tmp_path / "circuit.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, out, err = cli("render", path, "--format", "dot")
    _one_line_error(code, err, message)
    assert out == "" and not list(tmp_path.glob("circuit.dot"))


def test_debug_shows_the_traceback(cli):
    with pytest.raises(UserError, match="`tau` must be a number"):
        cli("--debug", "discover", "--tau", "-1")


def test_a_run_folder_with_a_broken_config_is_a_one_line_error(cli, tmp_path):
    (tmp_path / "config.json").write_text('{"task": "ioi", "no_such_setting": 1}')
    code, _, err = cli("validate", tmp_path)
    _one_line_error(code, err, "is not a valid run configuration")


# ---------------------------------------------------------------------------------------------
# 7. Nothing unpickled: a model folder of pickled weights is refused, and never opened
# ---------------------------------------------------------------------------------------------


class _Booby:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_model_folder_of_pickled_weights_is_refused_unopened(cli, tmp_path, word_tokenizer):
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    tiny_hf_model("llama", vocab=len(word_tokenizer)).config.save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Booby(marker)}))
    code, out, err = cli("discover", "--model", folder, "--out", tmp_path / "run")
    _one_line_error(code, err, "holds pickled weights (pytorch_model.bin), which are never loaded")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_model_folder_without_weights_is_a_model_not_found(tmp_path, word_tokenizer):
    from circuitfinder.engine.models import load_pretrained

    tiny_hf_model("llama", vocab=len(word_tokenizer)).config.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFound, match="cannot load the model saved in"):
        load_pretrained(str(tmp_path))


PACKAGES = ("discovery", "tasks", "graphs")
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unpickling_calls(source: str, filename: str = "<source>") -> list[str]:
    """Places in Python source that can unpickle data: imports of pickling modules, ``torch.load``
    without ``weights_only=True``, ``numpy.load(allow_pickle=True)``, ``read_pickle``, and models'
    ``from_pretrained`` without ``use_safetensors=True`` (nor a GGUF file)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            last = name.rsplit(".", 1)[-1]
            if name == "torch.load" and not _is_true(kw.get("weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
            elif (
                name in ("np.load", "numpy.load")
                and "allow_pickle" in kw
                and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False)
            ):
                found.append(f"{where}: numpy.load with allow_pickle")
            elif last in ("read_pickle", "Unpickler", "load_pickle"):
                found.append(f"{where}: {name}")
            elif (
                last == "from_pretrained"
                and "Model" in name
                and not _is_true(kw.get("use_safetensors"))
                and "gguf_file" not in kw
            ):
                found.append(f"{where}: {name} without use_safetensors=True")
    return found


def test_the_scanner_finds_each_way_of_unpickling():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch\nimport numpy as np\nimport pandas as pd\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\npd.read_pickle(p)\n"
        "AutoModelForCausalLM.from_pretrained(p)\n"
    )
    assert len(unpickling_calls(bad)) == 7
    good = (
        "import torch\nimport numpy as np\ntorch.load(p, weights_only=True)\nnp.load(p)\n"
        "AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)\n"
        "AutoModelForCausalLM.from_pretrained(p, gguf_file=f)\n"
        "AutoTokenizer.from_pretrained(p)\n"
    )
    assert unpickling_calls(good) == []


def test_no_package_source_unpickles_anything():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    found = [hit for p in files for hit in unpickling_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "weights and results must be read as safetensors, JSON, CSV or Parquet only"


# ---------------------------------------------------------------------------------------------
# 2. Numbers that make a result meaningless are errors, and nothing is written
# ---------------------------------------------------------------------------------------------


def test_a_task_whose_corruption_changes_nothing_is_refused_before_anything_is_written(
    cli, tmp_path, word_tokenizer, tiny_model_dir
):
    texts = build_task("ioi", word_tokenizer, n_pairs=8, seed=0).texts
    task_file = tmp_path / "same.jsonl"
    task_file.write_text(
        "".join(
            json.dumps({"clean": t["clean"], "corrupted": t["clean"], "answer": t["answer"], "wrong": t["wrong"]})
            + "\n"
            for t in texts
        )
    )
    runs = tmp_path / "runs"
    code, out, err = cli(
        "discover",
        "--model",
        tiny_model_dir,
        "--task",
        task_file,
        "--method",
        "acdc",
        "--edges",
        "20",
        "--pairs",
        "8",
        "--batch-size",
        "8",
        "--force",
        "--out",
        runs / "run",
    )
    _one_line_error(code, err, "faithfulness is undefined")
    assert out == "" and not runs.exists()  # no run folder, no temporary folder, no checkpoint


def test_a_nan_metric_is_an_error(tmp_path):
    adapter = tiny_adapter("gpt2", tmp_path)
    task = dataclasses.replace(tiny_task(), metric=lambda logits, batch: logits[:, 0] * float("nan"))
    with pytest.raises(MetricError, match="metric is nan"):
        CircuitEvaluator(adapter, EdgeGraph(adapter.shape), task, "discovery")


# ---------------------------------------------------------------------------------------------
# 3. A run that fails while writing leaves nothing, and an overwritten run stays whole
# ---------------------------------------------------------------------------------------------


def test_an_interrupted_write_leaves_no_folder_and_an_old_run_intact(tiny_ioi_model, tmp_path, monkeypatch):
    import circuitfinder.runs.run as run_module

    config = DiscoverConfig.from_options(
        task="ioi", model="tiny-llama", method="eap", n_pairs=8, batch_size=8, edges=20, force=True, curve=False
    )
    out = tmp_path / "run"

    def interrupted(*_args, **_kwargs):
        # Ctrl-C after circuit.json, scores.parquet and prompts.jsonl were written to the temporary folder
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_render", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_config(config, out=out, adapter=tiny_ioi_model)
    assert list(tmp_path.iterdir()) == []  # neither the run folder nor its temporary folder

    run_config(config, out=out, adapter=tiny_ioi_model)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_render", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_config(config.replace(edges=30), out=out, overwrite=True, adapter=tiny_ioi_model)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old run, whole
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert json.loads((out / "summary.json").read_text())["finished"] is True


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints: a write cut short, stray temporary files and damaged files lose nothing
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_write_cut_short_keeps_the_previous_one(tmp_path, monkeypatch):
    import circuitfinder.checkpoint as checkpoint_module

    cp = Checkpoint(tmp_path, {"a": 1})
    cp.save_json("search", {"decided": "0101"})
    cp.save_tensors("seed", {"scores": torch.arange(6.0)})

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    for save in (
        lambda: cp.save_json("search", {"decided": "010111"}),
        lambda: cp.save_tensors("seed", {"scores": torch.zeros(6)}),
    ):
        with pytest.raises(KeyboardInterrupt):
            save()
    monkeypatch.undo()
    assert cp.load_json("search") == {"decided": "0101"}
    assert torch.equal(cp.load_tensors("seed")["scores"], torch.arange(6.0))
    assert sorted(p.name for p in cp.dir.iterdir()) == ["search.json", "seed.safetensors", "settings.json"]


def test_a_damaged_checkpoint_is_redone_not_a_crash(tmp_path):
    cp = Checkpoint(tmp_path, {"a": 1})
    cp.save_json("search", {"decided": "01"})
    cp.save_tensors("seed", {"scores": torch.arange(6.0)})
    (cp.dir / ".search.json.x1y2").write_text('{"decided": "01')  # what SIGKILL mid-write leaves: ignored
    assert cp.load_json("search") == {"decided": "01"}
    (cp.dir / "search.json").write_text('{"decided": "01')  # damaged outside our writes (disk, hands)
    (cp.dir / "seed.safetensors").write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    assert cp.load_json("search") is None and cp.load_tensors("seed") is None


def test_a_search_checkpoint_that_does_not_fit_is_redone(tiny_ioi_model, tmp_path):
    config = DiscoverConfig.from_options(
        task="ioi",
        model="tiny-llama",
        n_pairs=8,
        batch_size=8,
        method="acdc",
        seed_method="eap",
        edges=20,
        search_prompts=4,
        force=True,
        curve=False,
    )
    from circuitfinder.methods.registry import Problem, search_key

    reference = run_config(config, out=tmp_path / "a" / "run", adapter=tiny_ioi_model).summary
    Checkpoint(tmp_path / "b", search_key(Problem(tiny_ioi_model, None, None, config, None))).save_json(
        "search", {"decided": "7" * 999, "current": []}
    )
    again = run_config(config, out=tmp_path / "b" / "run", adapter=tiny_ioi_model).summary
    assert again.edges_kept == reference.edges_kept
    assert (tmp_path / "a" / "run" / "circuit.json").read_bytes() == (
        tmp_path / "b" / "run" / "circuit.json"
    ).read_bytes()


# ---------------------------------------------------------------------------------------------
# 6. Same inputs and seed: byte-identical circuit.json (eap-ig with its size search; acdc)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eap-ig", "acdc"])
def test_same_inputs_and_seed_give_a_byte_identical_circuit(tiny_ioi_model, tmp_path, method):
    extra = (
        {"seed_method": "eap", "edges": 30, "chain": 16, "search_prompts": 4} if method == "acdc" else {}
    )  # eap-ig: size search
    config = DiscoverConfig.from_options(
        task="ioi",
        model="tiny-llama",
        method=method,
        n_pairs=4 if method == "acdc" else 8,
        batch_size=8,
        force=True,
        curve=False,
        **extra,
    )
    for name in ("a", "b"):  # separate parents: the second run cannot resume from the first's checkpoint
        run_config(config, out=tmp_path / name / "run", adapter=tiny_ioi_model)
    a, b = ((tmp_path / n / "run" / "circuit.json").read_bytes() for n in ("a", "b"))
    assert a == b and Circuit.from_json(a.decode()).edges


def test_an_interrupted_command_exits_130_saying_how_to_resume(cli, monkeypatch):
    """Ctrl-C, or SIGTERM (turned into Ctrl-C), inside a command: status 130, not 0 (typer returns,
    rather than raises, the status of an interrupted command)."""
    import circuitfinder.runs.run

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(circuitfinder.runs.run, "run_config", interrupted)
    code, out, err = cli("discover", "--tau", "0.1")
    assert code == 130 and "rerun the same command to resume" in err and "Traceback" not in err and out == ""


def test_progress_in_a_log_file_is_a_line_per_tenth():
    from circuitfinder import cli

    with cli.console.capture() as captured:
        advance = cli._progress_lines("scoring", 40)
        for _ in range(40):
            advance()
    lines = captured.get().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"scoring: {n}/40 ({n / 40:.0%})" for n in range(4, 41, 4)]


def test_progress_jumps_print_one_line():
    from circuitfinder import cli

    with cli.console.capture() as captured:
        advance = cli._progress_lines("deciding", 100)
        advance(35)
        advance(65)
    assert [line.split(",")[0] for line in captured.get().splitlines()] == [
        "deciding: 35/100 (35%)",
        "deciding: 100/100 (100%)",
    ]


def test_only_temporary_folders_of_ended_processes_here_are_removed(tmp_path):
    import socket
    import subprocess

    from circuitfinder.folders import remove_stale_partials

    ended = subprocess.Popen(["true"])
    ended.wait()
    host = socket.gethostname()
    names = {
        "dead": f".run.partial-{ended.pid}@{host}-abc123",
        "alive": f".run.partial-{os.getpid()}@{host}-def456",
        "elsewhere": f".run.partial-{ended.pid}@not-{host}-ghi789",
        "other_run": f".runs.partial-{ended.pid}@{host}-x1",
        "old_style": ".run.partial-jkl012",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    assert remove_stale_partials(tmp_path / "run") == [tmp_path / names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
