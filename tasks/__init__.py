"""Tasks: clean/corrupted prompt pairs with a metric. ``TASKS`` maps a name to its builder.

:func:`build_task` also takes the path of a task file (``.jsonl`` or ``.csv``; see
:mod:`circuitfinder.tasks.from_file`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from circuitfinder.compiled import compiled_programs
from circuitfinder.tasks.base import Task, TaskError
from circuitfinder.tasks.from_file import load_task_file
from circuitfinder.tasks.greater_than import make_greater_than
from circuitfinder.tasks.induction import make_induction
from circuitfinder.tasks.ioi import make_ioi
from circuitfinder.tasks.tracr import make_tracr

TaskBuilder = Callable[..., Task]  # (tokenizer, n_pairs, seed) -> Task

TASKS: dict[str, TaskBuilder] = {"ioi": make_ioi, "induction": make_induction, "greater-than": make_greater_than}
COMPILED = list(compiled_programs())  # the compiled tracr programs
TASKS |= {name: partial(make_tracr, program=name) for name in COMPILED}
DESCRIPTIONS = {
    "ioi": "Indirect object identification (Wang et al. 2022): logit(IO) − logit(S), ABC corruption",
    "induction": "Repeated random words (Olsson et al. 2022): log p(the token to copy); second half not repeated",
    "greater-than": "Years (Hanna et al. 2023): p(later years) − p(earlier years); start year XX01",
} | {
    name: f"tracr program {name[6:]} on its compiled model (--model {name}): its output at the last position"
    for name in COMPILED
}
FILE_SUFFIXES = (".jsonl", ".csv")


def is_task_file(name: str) -> bool:
    """Whether ``name`` names a task file (by its suffix) rather than a registered task."""
    return Path(name).suffix.lower() in FILE_SUFFIXES


def build_task(name: str, tokenizer, n_pairs: int = 128, seed: int = 0, skip_bad_rows: bool = False) -> Task:
    """Build a registered task, or read a task file, for a tokenizer.

    Args:
        name: a key of :data:`TASKS`, or the path of a ``.jsonl``/``.csv`` task file.
        tokenizer: the model's Hugging Face tokenizer, or the loaded model (its tokenizer is used).
        n_pairs: number of prompt pairs (for a file: at most this many rows).
        seed: seeds generation, sampling and the split.
        skip_bad_rows: for a task file, drop invalid rows (counted in ``Task.notes``) instead of refusing the file.

    Raises:
        TaskError: for an unknown name, a missing file, or a task that cannot be built.
    """
    if hasattr(tokenizer, "shape") and hasattr(tokenizer, "tokenizer"):  # a loaded model (ModelAdapter)
        tokenizer = tokenizer.tokenizer
    if is_task_file(name):
        if not Path(name).is_file():
            raise TaskError(f"no task file at {name}")
        return load_task_file(name, tokenizer, n_pairs=n_pairs, seed=seed, skip_bad_rows=skip_bad_rows)
    if name not in TASKS:
        hint = "; task files must end in .jsonl or .csv" if Path(name).exists() else ""
        known = ", ".join(sorted(TASKS))
        raise TaskError(f"unknown task {name!r}: use one of {known}, or a .jsonl or .csv task file{hint}")
    return TASKS[name](tokenizer, n_pairs=n_pairs, seed=seed)


__all__ = ["DESCRIPTIONS", "TASKS", "Task", "TaskError", "build_task", "is_task_file", "load_task_file"]
