"""Greater-than, after Hanna, Liu & Variengien 2023.

Hanna, Liu and Variengien, "How does GPT-2 compute greater-than?: Interpreting mathematical
abilities in a pre-trained language model" (arXiv:2305.00586). A prompt gives a start year and
stops where the end year's last two digits should follow::

    The war lasted from the year 1732 to the year 17   ->  any of 33 … 99

The model should put its probability on years later than the start year. The metric is the
paper's probability difference: Σ p(greater) − Σ p(smaller or equal). The corrupted twin is the
paper's "01" prompt: the start year becomes XX01 (``... from the year 1701 ...``), so nothing
in the prompt says which years are later.

How the answer is read depends on the tokenizer, and is detected by tokenizing:

- **Two-digit year tokens** (GPT-2: ``" 17"`` ``"32"``): the answer is the YY token. Correct
  answers are the tokens ``YY+1 … 99``, wrong answers ``00 … YY``; YY is drawn from 02–98 as in
  the paper. The single ``answer``/``wrong`` ids (used for accuracy) are ``YY+1`` and ``YY``.
- **Single-digit tokens** (SmolLM2, Gemma-3: ``"1"`` ``"7"`` ``"3"`` ``"2"``): the model predicts
  the end year's tens digit. With start tens digit d, correct answers are the digits ``d+1 … 9``
  and wrong answers ``0 … d−1``. The digit d itself counts as neither: an end year with the same
  tens digit may be later or not, depending on the next digit. YY is drawn from 10–89 so both
  sets are non-empty. The single ``answer``/``wrong`` ids are the nearest digits ``d+1`` and
  ``d−1``, so accuracy asks whether the model ranks the next decade above the previous one.

Nouns are from the paper's list; centuries XX are 11–17. Every prompt is checked by tokenizing:
the start year must split as ``XX`` then the YY token(s), and appending an answer to the prompt
must add exactly that answer token. Draws that fail the check (a tokenizer merging some year
differently) are redrawn.
"""

from __future__ import annotations

import random

import torch

from circuitfinder.tasks.base import (
    Task,
    TaskError,
    pad_id_of,
    pad_sets,
    probability_difference,
    split_labels,
    stack_pairs,
)

TEMPLATE = "The {noun} lasted from the year {xx}{yy} to the year {xx}"
# Hanna et al.'s event nouns (a selection of their cache/potential_nouns.txt), and their example "war".
NOUNS: tuple[str, ...] = (
    "war", "abduction", "accord", "affair", "agreement", "attack", "campaign", "captivity",
    "challenge", "clash", "collaboration", "competition", "conspiracy", "construction", "contract",
    "convention", "deal", "decline", "dispute", "dynasty", "effort", "expansion", "expedition",
    "friendship", "invasion", "investigation", "journey", "kingdom", "marriage", "operation",
    "pilgrimage", "plague", "project", "quest", "reign", "relationship", "riot", "rivalry",
    "siege", "study", "tour", "trial", "voyage",
)  # fmt: skip
CENTURIES: tuple[int, ...] = tuple(range(11, 18))
CORRUPT_YY = "01"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _single(tokenizer, text: str) -> int | None:
    ids = _ids(tokenizer, text)
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def year_mode(tokenizer) -> str:
    """``"two-digit"`` when every ``"00"``–``"99"`` is one token, ``"digit"`` when every ``"0"``–``"9"`` is.

    Raises:
        TaskError: if neither holds, so no answer token can be read.
    """
    if all(_single(tokenizer, f"{y:02d}") is not None for y in range(100)):
        return "two-digit"
    if all(_single(tokenizer, str(d)) is not None for d in range(10)):
        return "digit"
    raise TaskError(
        f"greater-than needs the digits 0-9, or every two-digit number 00-99, as single tokens; "
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither"
    )


def _answer_sets(tok: list[int], mode: str, yy: int) -> tuple[list[int], list[int], int, int]:
    """(correct ids, wrong ids, single answer id, single wrong id) for a start year ending in ``yy``.

    ``tok`` holds the ids of ``"00"``–``"99"`` (two-digit mode) or of ``"0"``–``"9"`` (digit mode).
    """
    if mode == "two-digit":
        return tok[yy + 1 :], tok[: yy + 1], tok[yy + 1], tok[yy]
    d = yy // 10
    return tok[d + 1 :], tok[:d], tok[d + 1], tok[d - 1]


def make_greater_than(tokenizer, n_pairs: int = 128, seed: int = 0, heldout_fraction: float = 0.5) -> Task:
    """Build the greater-than task for a tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer; its default special tokens are kept.
        n_pairs: number of clean/corrupted pairs.
        seed: seeds the choice of nouns, years and the split.
        heldout_fraction: share of pairs labelled ``"heldout"``.

    Returns:
        The task, with answer sets, metric ``probability_difference``, and positions ``YY`` (first
        token of the start year's last two digits) and ``END`` (the last token) per pair.

    Raises:
        TaskError: if ``n_pairs`` < 1, the tokenizer has no single-token digits (see
            :func:`year_mode`), or too few prompts tokenize as expected.
    """
    if n_pairs < 1:
        raise TaskError(f"greater-than needs n_pairs ≥ 1; got {n_pairs}")
    mode = year_mode(tokenizer)
    if mode == "two-digit":
        yy_range, tok = range(2, 99), [_single(tokenizer, f"{y:02d}") for y in range(100)]
    else:
        yy_range, tok = range(10, 90), [_single(tokenizer, str(d)) for d in range(10)]
    rng = random.Random(seed)
    pairs, texts, answer, wrong, good_sets, bad_sets, yy_at, rejected = [], [], [], [], [], [], [], []
    while len(pairs) < n_pairs:
        if len(rejected) > 10 * n_pairs + 100:
            raise TaskError(
                f"greater-than: only {len(pairs)} of {n_pairs} prompts tokenize with the year split as "
                f"XX then YY for tokenizer {getattr(tokenizer, 'name_or_path', '?')!r}; e.g. {rejected[0]!r}"
            )
        noun, xx, yy = rng.choice(NOUNS), rng.choice(CENTURIES), rng.choice(yy_range)
        clean_text = TEMPLATE.format(noun=noun, xx=xx, yy=f"{yy:02d}")
        corrupted_text = TEMPLATE.format(noun=noun, xx=xx, yy=CORRUPT_YY)
        clean = tokenizer(clean_text)["input_ids"]
        corrupted = tokenizer(corrupted_text)["input_ids"]
        prefix = tokenizer(clean_text.split(f"{xx}{yy:02d}")[0] + str(xx))["input_ids"]
        yy_ids, corrupt_ids = _ids(tokenizer, f"{yy:02d}"), _ids(tokenizer, CORRUPT_YY)
        good, bad, a, w = _answer_sets(tok, mode, yy)
        at, end = len(prefix), len(prefix) + len(yy_ids)
        if (
            len(yy_ids) != len(corrupt_ids)
            or clean[:end] != prefix + yy_ids
            or corrupted != clean[:at] + corrupt_ids + clean[end:]
            or tokenizer(clean_text + tokenizer.decode([a]))["input_ids"] != clean + [a]
        ):
            rejected.append(clean_text)
            continue
        pairs.append((clean, corrupted))
        answer.append(a)
        wrong.append(w)
        good_sets.append(good)
        bad_sets.append(bad)
        yy_at.append(at)
        texts.append({
            "clean": clean_text, "corrupted": corrupted_text,
            "answer": [tokenizer.decode([t]) for t in good], "wrong": [tokenizer.decode([t]) for t in bad],
            "noun": noun, "year": xx * 100 + yy,
        })  # fmt: skip

    pad_id = pad_id_of(tokenizer)
    clean_t, corrupted_t, lengths = stack_pairs(pairs, pad_id)
    return Task(
        name="greater-than",
        clean=clean_t,
        corrupted=corrupted_t,
        lengths=lengths,
        answer=torch.tensor(answer, device="cpu"),
        wrong=torch.tensor(wrong, device="cpu"),
        split=split_labels(n_pairs, heldout_fraction, torch.Generator().manual_seed(seed)),
        metric=probability_difference,
        metric_name="probability_difference",
        pad_id=pad_id,
        texts=tuple(texts),
        positions={"YY": torch.tensor(yy_at, device="cpu"), "END": lengths - 1},
        answer_sets=pad_sets(good_sets),
        wrong_sets=pad_sets(bad_sets),
    )
