"""Induction: continue a repeated sequence of random tokens.

Induction heads (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits";
Olsson et al. 2022, "In-context Learning and Induction Heads", arXiv:2209.11895) complete
``… A B … A`` with ``B``: they find the earlier occurrence of the current token and copy the
token that followed it. The task shows a sequence of random words twice and stops one token
before the end of the repeat::

    [BOS] apple river stone … cloud   apple river stone …   ->  " cloud"

The corrupted twin keeps the first half and replaces the second by other random words (none of
them from the first half), so there is nothing to copy. Words are the model's "safe" tokens:
lowercase alphabetic words with a leading space that re-encode to that one token, the most
common ones by default (random token ids give a much weaker induction signal). BOS is present
when the tokenizer adds it by default.

Metric: ``answer_logprob``, log p(the token to copy); higher is better. Conmy et al. 2023 (ACDC,
arXiv:2304.14997) measured their induction task with its negative (among other metrics). Unlike
a logit difference it needs no single contrasting token, which a copy task does not have. Accuracy (``logits[answer] >
logits[wrong]``) compares the answer with another word of the first half, a token that is just
as present in the context: a model that merely copies some earlier token does not pass it.

Positions: with ``positions="last"`` (default) each sequence gives one pair, read at its last
token. With ``positions="all"`` a sequence of half-length L gives L − 1 pairs, the second half
cut after each of its tokens but the last; with causal attention the logits at a position do not
depend on later tokens, so this reads the metric at every predictable position of the second
half without any change to the pipeline, at the cost of L − 1 prompts per sequence. All pairs of
one sequence share its split.
"""

from __future__ import annotations

import random

import torch

from circuitfinder.tasks.base import Task, TaskError, answer_logprob, pad_id_of, split_labels, stack_pairs


def safe_tokens(tokenizer, min_letters: int = 3) -> dict[int, str]:
    """The tokens that are a lowercase word with a leading space and re-encode to that one token.

    Args:
        tokenizer: a Hugging Face tokenizer (byte-level BPE ``Ġword`` or SentencePiece ``▁word``).
        min_letters: shortest word kept (very short tokens are often word pieces).

    Returns:
        Token id → its text (``" word"``), in increasing id order; special tokens excluded.
    """
    special = set(tokenizer.all_special_ids)
    words = {}
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        word = piece[1:] if piece and piece[0] in "Ġ▁" else ""
        if i not in special and len(word) >= min_letters and word.isascii() and word.isalpha() and word.islower():
            words[i] = " " + word
    encoded = tokenizer(list(words.values()), add_special_tokens=False)["input_ids"] if words else []
    return {i: t for (i, t), e in zip(words.items(), encoded) if e == [i]}


def make_induction(
    tokenizer,
    n_pairs: int = 128,
    seed: int = 0,
    heldout_fraction: float = 0.5,
    half_length: int = 10,
    positions: str = "last",
    n_words: int | None = 5000,
) -> Task:
    """Build the induction task for a tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer; its default special tokens (e.g. ``<bos>``) are kept.
        n_pairs: number of clean/corrupted pairs. With ``positions="all"``, the number of
            sequences is ``n_pairs // (half_length - 1)`` (at least one) and the task has that
            many times ``half_length - 1`` pairs.
        seed: seeds the words, the wrong answers and the split.
        heldout_fraction: share of sequences labelled ``"heldout"``.
        half_length: words in each half (the prompt has ``2 * half_length - 1`` of them).
        positions: ``"last"`` or ``"all"`` (see the module docstring).
        n_words: draw from the safe words with the lowest ids, this many (BPE and SentencePiece
            vocabularies give frequent tokens low ids); None for all of them. On SmolLM2 the
            5,000 most common words give a clearer signal than all 21,000 (held-out log p of
            the answer −1.9 against −3.4; corrupted −9.6 and −11.6).

    Returns:
        The task, metric ``answer_logprob``, with position ``END`` (the last token) per pair.

    Raises:
        TaskError: on bad arguments, if the tokenizer has fewer than ``2 * half_length - 1``
            safe words, or if joined words do not tokenize back to the same tokens.
    """
    if positions not in ("last", "all"):
        raise TaskError(f"induction positions must be 'last' or 'all'; got {positions!r}")
    if half_length < 2 or n_pairs < 1:
        raise TaskError(f"induction needs half_length ≥ 2 and n_pairs ≥ 1; got {half_length} and {n_pairs}")
    words, ids = _induction_words(tokenizer, half_length, n_words)
    cuts = [half_length - 1] if positions == "last" else list(range(1, half_length))
    n_seq = n_pairs if positions == "last" else max(1, n_pairs // len(cuts))
    seq_split = split_labels(n_seq, heldout_fraction, torch.Generator().manual_seed(seed))
    drawn = _induction_pairs(tokenizer, words, ids, half_length, cuts, seq_split, random.Random(seed))
    return _induction_task(tokenizer, drawn)


def _induction_words(tokenizer, half_length: int, n_words: int | None) -> tuple[dict[int, str], list[int]]:
    """The safe words (id → text) and the ids drawn from: the first ``n_words`` of them.

    Raises:
        TaskError: if there are fewer than ``2 * half_length - 1`` of them.
    """
    words = safe_tokens(tokenizer)
    ids = list(words)[:n_words]
    if len(ids) < 2 * half_length - 1:
        raise TaskError(
            f"induction needs {2 * half_length - 1} single-token lowercase words; tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} has {len(ids)}"
        )
    return words, ids


def _induction_pairs(
    tokenizer,
    words: dict[int, str],
    ids: list[int],
    half_length: int,
    cuts: list[int],
    seq_split: tuple[str, ...],
    rng: random.Random,
) -> dict[str, list]:
    """Draw one sequence per split label and cut its repeat after each of ``cuts`` tokens.

    Returns:
        Lists of the same length, one entry per pair: ``pairs`` (clean and corrupted token ids),
        ``texts``, ``answer``, ``wrong`` and ``split``.
    """
    out: dict[str, list] = {"pairs": [], "texts": [], "answer": [], "wrong": [], "split": []}
    for s in range(len(seq_split)):
        drawn = rng.sample(ids, 2 * half_length - 1)
        first, other = drawn[:half_length], drawn[half_length:]  # other: L − 1 fresh words
        for cut in cuts:  # the second half stops after `cut` tokens; answer = first[cut]
            clean_ids, corrupted_ids = first + first[:cut], first + other[:cut]
            (clean, clean_text), (corrupted, corrupted_text) = _tokenized(tokenizer, words, clean_ids, corrupted_ids)
            distractor = rng.choice([t for t in first if t != first[cut]])
            out["pairs"].append((clean, corrupted))
            out["answer"].append(first[cut])
            out["wrong"].append(distractor)
            out["split"].append(seq_split[s])
            out["texts"].append(
                {
                    "clean": clean_text,
                    "corrupted": corrupted_text,
                    "answer": words[first[cut]],
                    "wrong": words[distractor],
                    "sequence": s,
                }
            )
    return out


def _tokenized(tokenizer, words: dict[int, str], clean_ids: list[int], corrupted_ids: list[int]) -> tuple[tuple, tuple]:
    """The clean and the corrupted prompt, each as (token ids with special tokens, text).

    Raises:
        TaskError: if the joined words do not tokenize back to the same word tokens after one prefix.
    """
    clean_text, corrupted_text = "".join(words[t] for t in clean_ids), "".join(words[t] for t in corrupted_ids)
    clean, corrupted = tokenizer(clean_text)["input_ids"], tokenizer(corrupted_text)["input_ids"]
    prefix = clean[: len(clean) - len(clean_ids)]
    if clean != prefix + clean_ids or corrupted != prefix + corrupted_ids:
        raise TaskError(f"induction: {clean_text!r} does not tokenize back to its {len(clean_ids)} word tokens")
    return (clean, clean_text), (corrupted, corrupted_text)


def _induction_task(tokenizer, drawn: dict[str, list]) -> Task:
    """The task of the pairs drawn by :func:`_induction_pairs`, padded with the tokenizer's pad id."""
    pad_id = pad_id_of(tokenizer)
    clean_t, corrupted_t, lengths = stack_pairs(drawn["pairs"], pad_id)
    return Task(
        name="induction",
        clean=clean_t,
        corrupted=corrupted_t,
        lengths=lengths,
        answer=torch.tensor(drawn["answer"], device="cpu"),
        wrong=torch.tensor(drawn["wrong"], device="cpu"),
        split=tuple(drawn["split"]),
        metric=answer_logprob,
        metric_name="answer_logprob",
        pad_id=pad_id,
        texts=tuple(drawn["texts"]),
        positions={"END": lengths - 1},
    )
