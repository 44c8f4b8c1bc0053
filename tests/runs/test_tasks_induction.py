"""Tests of the induction task, on the small byte-level BPE tokenizer of conftest.py (it adds <bos>)."""

from __future__ import annotations

import pytest
import torch

from circuitfinder.tasks import build_task
from circuitfinder.tasks.base import TaskBatch, TaskError, answer_logprob
from circuitfinder.tasks.induction import make_induction, safe_tokens

N, L = 12, 6


@pytest.fixture(scope="module")
def task(word_tokenizer):
    return make_induction(word_tokenizer, n_pairs=N, seed=0, half_length=L)


def _words(tokenizer, ids) -> list[int]:
    return [int(t) for t in ids if int(t) not in tokenizer.all_special_ids]


def test_safe_tokens_are_lowercase_words_that_round_trip(word_tokenizer):
    words = safe_tokens(word_tokenizer)
    assert len(words) >= 2 * L
    for i, text in words.items():
        assert text[0] == " " and text[1:].isalpha() and text[1:].islower()
        assert word_tokenizer(text, add_special_tokens=False)["input_ids"] == [i]
        assert i not in word_tokenizer.all_special_ids
    assert " store" in words.values() and " Mary" not in words.values()  # names are capitalised


def test_same_seed_same_task_other_seed_differs(word_tokenizer, task):
    again = make_induction(word_tokenizer, n_pairs=N, seed=0, half_length=L)
    for name in ("clean", "corrupted", "lengths", "answer", "wrong"):
        assert torch.equal(getattr(task, name), getattr(again, name)), name
    assert task.split == again.split and task.texts == again.texts
    assert make_induction(word_tokenizer, n_pairs=N, seed=1, half_length=L).texts != task.texts


def test_clean_repeats_the_first_half_and_stops_before_its_last_word(word_tokenizer, task):
    assert task.name == "induction" and len(task) == N and task.metric is answer_logprob
    assert task.clean.shape == (N, 2 * L)  # <bos> + L words + L − 1 words
    for k, d in enumerate(task.texts):
        assert int(task.clean[k, 0]) == word_tokenizer.bos_token_id
        words = _words(word_tokenizer, task.clean[k])
        first, second = words[:L], words[L:]
        assert len(set(first)) == L and second == first[:-1]
        assert int(task.answer[k]) == first[-1] and d["answer"] == word_tokenizer.decode([first[-1]])
        assert int(task.wrong[k]) in first[:-1]  # another word of the context, for accuracy
        assert word_tokenizer(d["clean"])["input_ids"] == task.clean[k].tolist()
        assert word_tokenizer(d["corrupted"])["input_ids"] == task.corrupted[k].tolist()


def test_corrupted_second_half_has_nothing_to_copy(word_tokenizer, task):
    for k in range(N):
        assert torch.equal(task.clean[k, : L + 1], task.corrupted[k, : L + 1])  # <bos> + first half
        first, other = set(task.clean[k, 1 : L + 1].tolist()), task.corrupted[k, L + 1 :].tolist()
        assert len(set(other)) == L - 1 and not first & set(other)


def test_all_positions_gives_every_cut_of_the_second_half(word_tokenizer):
    task = make_induction(word_tokenizer, n_pairs=3 * (L - 1), seed=0, half_length=L, positions="all")
    assert len(task) == 3 * (L - 1)
    for s in range(3):
        rows = [k for k, d in enumerate(task.texts) if d["sequence"] == s]
        assert len(rows) == L - 1 and len({task.split[k] for k in rows}) == 1  # one split per sequence
        assert sorted(int(task.lengths[k]) for k in rows) == list(range(L + 2, 2 * L + 1))
        for k in rows:
            n = int(task.lengths[k])
            words = _words(word_tokenizer, task.clean[k, :n])
            cut = len(words) - L
            assert words[L:] == words[:cut] and int(task.answer[k]) == words[cut]


def test_bad_arguments_and_small_vocabularies_are_refused(word_tokenizer):
    with pytest.raises(TaskError, match="'last' or 'all'"):
        make_induction(word_tokenizer, n_pairs=4, positions="every")
    with pytest.raises(TaskError, match="half_length"):
        make_induction(word_tokenizer, n_pairs=4, half_length=1)
    with pytest.raises(TaskError, match="single-token lowercase words"):
        make_induction(word_tokenizer, n_pairs=4, half_length=500)


def test_answer_logprob_is_the_log_probability_of_the_answer():
    logits = torch.randn(3, 9)
    batch = TaskBatch(
        clean=torch.zeros(3, 2, dtype=torch.long),
        corrupted=torch.zeros(3, 2, dtype=torch.long),
        last=torch.tensor([1, 1, 1]),
        answer=torch.tensor([0, 4, 8]),
        wrong=torch.tensor([1, 1, 1]),
    )
    expected = logits.softmax(-1)[[0, 1, 2], [0, 4, 8]].log()
    assert torch.allclose(answer_logprob(logits, batch), expected, atol=1e-6)


def test_registered_and_baseline_runs_on_a_tiny_model(word_tokenizer):
    from tiny_models import tiny_hf_model

    from circuitfinder.engine.adapter import ModelAdapter
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph

    task = build_task("induction", word_tokenizer, n_pairs=8, seed=0)
    assert task.clean.shape == (8, 20)  # default half-length 10, plus <bos>
    adapter = ModelAdapter.from_hf(
        tiny_hf_model("gpt2", vocab=len(word_tokenizer)),
        word_tokenizer,
        name="tiny-gpt2",
        hf_id="gpt2",
        dtype=torch.float64,
    )
    baseline = CircuitEvaluator(adapter, EdgeGraph(adapter.shape), task, "heldout").baseline
    assert baseline.clean < 0 and baseline.corrupted < 0 and baseline.n_prompts == 4
