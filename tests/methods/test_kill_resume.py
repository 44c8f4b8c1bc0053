"""Reliability, real processes: runs of ``circuits discover`` stopped by SIGTERM and by
SIGKILL, then run again.

Each run is a subprocess on a tiny random Llama saved as a model folder (``--model FOLDER``),
with an ACDC search long enough (``--chain 1``: one candidate per chain, about 18 chains) for a
signal to land mid-search. What must hold:

- SIGTERM mid-search: exit status 130, a message saying how to resume, no run folder, the
  checkpoint kept.
- The same command, killed by SIGKILL at a random moment (start-up, mid-search or while writing
  the run folder; the seed is printed on failure and ``KILL_SEED`` replays it): nothing at
  ``--out`` that looks finished (only hidden temporary folders may remain), no saved progress lost.
- The same command once more: it says it resumes, and ends with a ``circuit.json`` byte-identical
  to that of an uninterrupted run.
- SIGKILL after the run folder's files are written but before it is renamed into place: no run
  folder, only a hidden temporary one without ``summary.json``.

The reference run is made in this process (same settings, same model folder), so the comparison
also checks that separate processes give byte-identical results.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuitfinder.checkpoint import Checkpoint
from circuitfinder.config import DiscoverConfig
from circuitfinder.methods.registry import Problem, search_key
from circuitfinder.runs.run import run_config

ROOT = Path(__file__).resolve().parents[2]
# float32 named: in a subprocess, auto would follow this CPU's bfloat16 support (conftest.no_native_bfloat16)
SEARCH = dict(
    task="ioi",
    method="acdc",
    edges=40,
    chain=1,
    search_prompts=4,
    n_pairs=8,
    batch_size=8,
    force=True,
    curve=False,
    dtype="float32",
)
ARGS = [
    "--task",
    "ioi",
    "--method",
    "acdc",
    "--edges",
    "40",
    "--chain",
    "1",
    "--search-prompts",
    "4",
    "--pairs",
    "8",
    "--batch-size",
    "8",
    "--force",
    "--no-curve",
    "--dtype",
    "float32",
]
TIMEOUT = 300  # seconds for one run on a busy machine


def _env() -> dict:
    return os.environ | {
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _command(model_dir: Path, out: Path, args: list[str] = ARGS) -> list[str]:
    return [sys.executable, "-m", "circuitfinder.cli", "discover", *args, "--model", str(model_dir), "--out", str(out)]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _decided(checkpoint: Path) -> int:
    """Candidates decided in a checkpoint's search state (0 when there is none yet)."""
    try:
        return len(json.loads((checkpoint / "search.json").read_text())["decided"])
    except (OSError, ValueError):
        return 0


def _finished(folder: Path) -> bool:
    try:
        return json.loads((folder / "summary.json").read_text())["finished"] is True
    except (OSError, ValueError, KeyError):
        return False


def _visible(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if not p.name.startswith(".")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The parent folder of every run here: they share its ``.checkpoints``."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(runs, tiny_model_dir) -> dict:
    """An uninterrupted run (in this process): its circuit.json, candidate count and checkpoint folder."""
    from circuitfinder.engine.adapter import load_unchecked

    config = DiscoverConfig.from_options(model=str(tiny_model_dir), **SEARCH)
    adapter = load_unchecked(str(tiny_model_dir))
    summary = run_config(config, out=runs / "reference", adapter=adapter).summary
    checkpoint = Checkpoint(runs, search_key(Problem(adapter, None, None, config, None))).dir
    assert not checkpoint.exists()  # cleared once the results were written
    assert summary.search["chains"] >= 12 and summary.edges_kept > 0  # room for a signal mid-search
    return {
        "circuit": (runs / "reference" / "circuit.json").read_bytes(),
        "candidates": summary.search["candidates"],
        "checkpoint": checkpoint,
        "decisions": (runs / "reference" / "decisions.csv").read_bytes(),
        "search": summary.search,
    }


def test_sigterm_then_sigkill_at_a_random_moment_then_the_same_command_resumes_to_the_same_circuit(
    runs, reference, tiny_model_dir
):
    """One search, stopped twice: SIGTERM mid-search, then SIGKILL at a random moment of the
    resumed run; the third run of the same command resumes and gives the reference circuit."""
    out, log, checkpoint, candidates = runs / "run", runs / ".run.log", reference["checkpoint"], reference["candidates"]
    command = _command(tiny_model_dir, out)

    # 1. SIGTERM once the checkpoint holds some progress: status 130, how to resume, no run folder
    proc = _start(command, log)
    assert _wait_for(lambda: _decided(checkpoint) >= 3, proc, "search progress"), log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 130, log.read_text()
    message = log.read_text()
    assert "interrupted" in message and "rerun the same command to resume" in message and "Traceback" not in message
    saved = _decided(checkpoint)
    assert not out.exists() and 3 <= saved < candidates  # the checkpoint is kept, mid-search

    # 2. The same command, killed by SIGKILL at a random moment: start-up, mid-search or while
    #    writing the run folder. Nothing at --out may look finished.
    seed = int(os.environ.get("KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    stage = rng.choice(["start-up", "search", "writing"])
    proc = _start(command, log)
    if stage == "start-up":  # importing, loading the model, reading the checkpoint
        time.sleep(rng.uniform(0, 5))
    elif stage == "search":
        target = rng.randint(saved + 1, max(saved + 1, candidates - 1))
        _wait_for(lambda: _decided(checkpoint) >= target, proc, "search progress")
        time.sleep(rng.uniform(0, 0.3))
    else:
        _wait_for(
            lambda: any(p.name.startswith(".run.partial-") for p in runs.iterdir()), proc, "the run folder's writing"
        )
        time.sleep(rng.uniform(0, 0.05))
    proc.kill()
    proc.wait(TIMEOUT)
    completed = out.exists()
    note = (
        f"KILL_SEED={seed} (stage {stage}, {_decided(checkpoint)} of {candidates} decided at the kill, "
        f"{saved} after SIGTERM); the run had {'completed' if completed else 'not completed'}"
    )
    print(note)
    note += "\n" + log.read_text()
    assert not completed or _finished(out), note  # a run folder exists only when whole
    assert all(_finished(p) for p in _visible(runs)), note  # anything else is hidden and temporary
    assert completed or _decided(checkpoint) >= saved, note  # the kill lost no saved progress

    # 3. The same command again: it resumes and ends with the circuit of the uninterrupted run
    if not completed:
        progress = _decided(checkpoint)
        rerun = _run(command)
        assert rerun.returncode == 0, note + rerun.stderr
        assert (
            f"resuming from checkpoint {checkpoint}: {progress} of {candidates} candidates decided" in rerun.stderr
        ), note + rerun.stderr
    assert (out / "circuit.json").read_bytes() == reference["circuit"], note
    assert (out / "decisions.csv").read_bytes() == reference["decisions"], note  # every decision, with its trial
    search, ref = json.loads((out / "summary.json").read_text())["search"], reference["search"]
    # sittings that saved progress, and the last: a kill at start-up saves nothing
    assert ref["sittings"] == 1 and search["sittings"] in ((2,) if completed else (2, 3)), note
    assert search["circuits_evaluated"] == ref["circuits_evaluated"] and search["chains"] == ref["chains"], note
    assert search["forward_passes"] >= ref["forward_passes"] and search["seconds"] > 0, note
    assert _finished(out) and (completed or not checkpoint.exists()), note  # a finished run deletes its checkpoint


def test_sigkill_while_the_run_folder_is_written_leaves_only_a_hidden_folder_the_next_run_removes(
    tmp_path, tiny_model_dir
):
    out = tmp_path / "run"
    args = [
        "--task",
        "ioi",
        "--method",
        "eap",
        "--edges",
        "20",
        "--pairs",
        "8",
        "--batch-size",
        "8",
        "--force",
        "--no-curve",
    ]
    killed_mid_write = (  # every file is in the temporary folder; the kill comes before it is renamed to --out
        "import os, signal, sys\n"
        "import circuitfinder.folders\n"
        "circuitfinder.folders.make_readable = lambda folder: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from circuitfinder.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", killed_mid_write, *_command(tiny_model_dir, out, args)[3:]],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists() and _visible(tmp_path) == []
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".run.partial-")
    assert (partial / "circuit.json").is_file() and (partial / "summary.json").is_file()
    rerun = subprocess.run(
        _command(tiny_model_dir, out, args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert rerun.returncode == 0, rerun.stderr
    assert _finished(out) and list(tmp_path.iterdir()) == [out]  # the killed run's folder is gone
