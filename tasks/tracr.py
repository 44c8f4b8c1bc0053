"""Tasks for the tracr programs compiled to GPT-2 (``--model tracr-<program>``).

Each prompt is BOS and 4 tokens of the program's vocabulary; the metric reads the program's
output at the last position, where the causal programs compute it over the whole sequence. The
outputs come from tracr itself (``program.json``, written by ``scripts/tracr_compile.py``):

* numerical programs (frac_prevs, pair_balance): the output's logit (token ``=``) minus the pad
  token's, whose unembedding row is zero: the program's value. Each pair's clean value is larger
  than its corrupted twin's (pairs of equal value are not drawn), so the clean and corrupted
  means differ and faithfulness is well defined.
* categorical programs (reverse): logit(clean output) − logit(corrupted output); the two differ.

The true circuits are the references ``tracr-<program>`` (``circuits grade --reference``).
"""

from __future__ import annotations

import random

import torch

from circuitfinder.compiled import program_data
from circuitfinder.tasks.base import Task, TaskError, logit_difference, split_labels, stack_pairs

LENGTH = 4  # tokens after BOS


def make_tracr(tokenizer, n_pairs: int = 128, seed: int = 0, heldout_fraction: float = 0.5, *, program: str) -> Task:
    """Clean/corrupted pairs for the compiled program ``program`` (e.g. ``tracr-frac_prevs``).

    Raises:
        TaskError: when the tokenizer is not the compiled program's model's.
    """
    data = program_data(program)
    vocab = tokenizer.get_vocab()
    tokens = ["BOS", "compiler_pad", *data["vocabulary"], *data["output_tokens"]]
    if any(t not in vocab for t in tokens):
        raise TaskError(f"task {program} runs on its compiled model: use --model {program}")
    rows = [r for r in data["tracr"] if len(r["input"]) == LENGTH]
    numerical = data["output"] == "numerical"
    value = (lambda r: r["outputs"]["="][-1]) if numerical else (lambda r: r["decoded"][-1])
    rng = random.Random(seed)
    pairs, answer, wrong, texts = [], [], [], []
    while len(pairs) < n_pairs:
        a, b = rng.choice(rows), rng.choice(rows)
        if numerical:
            if abs(value(a) - value(b)) < 1e-6:
                continue
            a, b = (a, b) if value(a) > value(b) else (b, a)
        elif value(a) == value(b):
            continue
        ids = lambda r: [vocab["BOS"], *(vocab[t] for t in r["input"])]  # noqa: E731
        pairs.append((ids(a), ids(b)))
        answer.append(vocab["="] if numerical else vocab[value(a)])
        wrong.append(vocab["compiler_pad"] if numerical else vocab[value(b)])
        texts.append(
            {
                "clean": " ".join(["BOS", *a["input"]]),
                "corrupted": " ".join(["BOS", *b["input"]]),
                "answer": str(value(a)),
                "wrong": str(value(b)),
            }
        )
    clean, corrupted, lengths = stack_pairs(pairs, vocab["compiler_pad"])
    split = split_labels(len(pairs), heldout_fraction, torch.Generator().manual_seed(seed))
    return Task(
        name=program,
        clean=clean,
        corrupted=corrupted,
        lengths=lengths,
        answer=torch.tensor(answer, device="cpu"),
        wrong=torch.tensor(wrong, device="cpu"),
        split=split,
        metric=logit_difference,
        metric_name="output difference" if not numerical else "program output",
        pad_id=vocab["compiler_pad"],
        texts=tuple(texts),
        positions={"END": lengths - 1},
        ranks_answers=not numerical,
    )
