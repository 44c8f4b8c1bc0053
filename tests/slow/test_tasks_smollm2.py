"""Slow tests: each task shows a clear gap between clean and corrupted metric on SmolLM2-135M.

Measured on held-out prompts (seed 0; see the module docstrings of the tasks for the definitions).
"""

from __future__ import annotations

import json

import pytest

from circuitfinder.engine.faithfulness import CircuitEvaluator
from circuitfinder.engine.graph import EdgeGraph
from circuitfinder.tasks import build_task

pytestmark = pytest.mark.slow  # the fixture converts SmolLM2 when it is not cached yet (about 40 s)


@pytest.fixture(scope="module")
def smollm2():
    from circuitfinder.engine.adapter import load_unchecked

    return load_unchecked("smollm2-135m")


def _baseline(adapter, task):
    return CircuitEvaluator(adapter, EdgeGraph(adapter.shape), task, "heldout").baseline


def test_induction_gap(smollm2):
    b = _baseline(smollm2, build_task("induction", smollm2.tokenizer, n_pairs=32, seed=0))
    assert b.clean > -3.0 and b.clean - b.corrupted > 4.0 and b.accuracy > 0.8, b


def test_greater_than_gap(smollm2):
    task = build_task("greater-than", smollm2.tokenizer, n_pairs=32, seed=0)
    assert task.answer_sets.shape[1] <= 9  # SmolLM2 has single-digit tokens: the tens digit is read
    b = _baseline(smollm2, task)
    assert b.clean > 0.2 and b.clean - b.corrupted > 0.5 and b.accuracy > 0.7, b


def test_task_file_gap(smollm2, tmp_path):
    """A user's file (here IOI prompts written out, answers as one-element lists) behaves like IOI."""
    ioi = build_task("ioi", smollm2.tokenizer, n_pairs=32, seed=0)
    path = tmp_path / "ioi.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "clean": t["clean"],
                    "corrupted": t["corrupted"],
                    "answer": [t["answer"]],
                    "wrong": t["wrong"],
                    "split": s,
                }
            )
            + "\n"
            for t, s in zip(ioi.texts, ioi.split)
        )
    )
    task = build_task(str(path), smollm2.tokenizer, n_pairs=32)
    assert task.metric_name == "logit_difference" and len(task) == 32
    b = _baseline(smollm2, task)
    assert b.clean > 2.0 and abs(b.corrupted) < 1.0 and b.accuracy > 0.8, b
