"""Tests of the IOI task, on a small byte-level BPE tokenizer trained offline (no pretrained model)."""

from __future__ import annotations

import pytest
import torch

import circuitfinder.tasks.ioi as ioi
from circuitfinder.tasks.base import TaskError
from circuitfinder.tasks.ioi import TEMPLATES, make_ioi

N = 40


@pytest.fixture(scope="module")
def task(word_tokenizer):
    return make_ioi(word_tokenizer, n_pairs=N, seed=0)


def _tok(tokenizer, word: str) -> int:
    (tid,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    return tid


def test_templates_follow_wang_et_al():
    assert len(TEMPLATES) >= 15
    assert len(set(TEMPLATES)) == len(TEMPLATES)
    for t in TEMPLATES:
        assert t.count("[A]") == 1 and t.count("[B]") == 2, t
        assert t.index("[A]") < t.index("[B]"), t  # written ABBA; BABA is derived


def test_same_seed_same_task_other_seed_differs(word_tokenizer, task):
    again = make_ioi(word_tokenizer, n_pairs=N, seed=0)
    for name in ("clean", "corrupted", "lengths", "answer", "wrong"):
        assert torch.equal(getattr(task, name), getattr(again, name)), name
    assert task.split == again.split and task.texts == again.texts
    assert all(torch.equal(task.positions[k], again.positions[k]) for k in task.positions)
    other = make_ioi(word_tokenizer, n_pairs=N, seed=1)
    assert other.texts != task.texts
    assert other.clean.shape != task.clean.shape or not torch.equal(other.clean, task.clean)


def test_shapes_and_metadata(word_tokenizer, task):
    assert task.name == "ioi" and len(task) == N
    assert task.clean.shape == task.corrupted.shape
    assert task.metric_name == "logit_difference"
    assert task.pad_id == word_tokenizer.pad_token_id
    assert set(task.positions) == {"IO", "S1", "S2", "END"}
    assert all(p.shape == (N,) for p in task.positions.values())
    assert all(set(d) >= {"clean", "corrupted", "answer", "wrong", "template"} for d in task.texts)


def test_texts_match_tokens(word_tokenizer, task):
    for k, d in enumerate(task.texts):
        n = int(task.lengths[k])
        assert word_tokenizer(d["clean"])["input_ids"] == task.clean[k, :n].tolist()
        assert word_tokenizer(d["corrupted"])["input_ids"] == task.corrupted[k, :n].tolist()
        assert (task.clean[k, n:] == task.pad_id).all()


def test_corrupted_differs_from_clean_exactly_at_s2(word_tokenizer, task):
    names = {_tok(word_tokenizer, " " + n) for n in ioi._single_tokens(word_tokenizer, ioi.NAMES)}
    for k in range(N):
        diff = (task.clean[k] != task.corrupted[k]).nonzero().flatten().tolist()
        assert diff == [int(task.positions["S2"][k])]
        c = int(task.corrupted[k, diff[0]])
        assert c in names and c not in (int(task.answer[k]), int(task.wrong[k]))


def test_answer_and_wrong_are_io_and_s(word_tokenizer, task):
    for k, d in enumerate(task.texts):
        assert word_tokenizer.decode([int(task.answer[k])]) == d["answer"]
        assert word_tokenizer.decode([int(task.wrong[k])]) == d["wrong"]
        assert d["answer"] != d["wrong"]
        assert d["clean"].count(d["wrong"]) == 2 and d["clean"].count(d["answer"]) == 1
        assert d["clean"].endswith(" to")  # stops right before the indirect object


def test_positions_point_at_names(word_tokenizer, task):
    rows = torch.arange(N)
    pos = task.positions
    assert torch.equal(task.clean[rows, pos["IO"]], task.answer)
    assert torch.equal(task.clean[rows, pos["S1"]], task.wrong)
    assert torch.equal(task.clean[rows, pos["S2"]], task.wrong)
    assert torch.equal(pos["END"], task.lengths - 1)
    assert (pos["S1"] < pos["S2"]).all() and (pos["IO"] < pos["S2"]).all() and (pos["S2"] < pos["END"]).all()
    assert (task.clean[:, 0] == word_tokenizer.bos_token_id).all()  # default special tokens kept
    assert (pos["IO"] >= 1).all()


def test_both_orders_in_equal_numbers(task):
    abba = (task.positions["IO"] < task.positions["S1"]).sum().item()
    assert abba == N // 2
    orders = [d["order"] for d in task.texts]
    assert orders.count("ABBA") == orders.count("BABA") == N // 2
    for d, io_first in zip(task.texts, (task.positions["IO"] < task.positions["S1"]).tolist()):
        assert (d["order"] == "ABBA") == io_first
    assert len({d["template"] for d in task.texts}) > 5


def test_split_has_both_labels(word_tokenizer, task):
    assert set(task.split) == {"discovery", "heldout"}
    assert task.split.count("heldout") == N // 2
    quarter = make_ioi(word_tokenizer, n_pairs=N, seed=0, heldout_fraction=0.25)
    assert quarter.split.count("heldout") == N // 4


def test_multi_token_words_are_never_used(word_tokenizer, task):
    used = ioi._single_tokens(word_tokenizer, ioi.NAMES)
    unused = [n for n in ioi.NAMES if n not in used]
    assert unused, "the test tokenizer should leave some names multi-token"
    assert not any(f" {n}" in d["clean"] + d["corrupted"] for d in task.texts for n in unused)
    bad_nouns = [w for w in ioi.PLACES + ioi.OBJECTS if w not in ioi._single_tokens(word_tokenizer, (w,))]
    assert bad_nouns and not any(f" {w}" in d["clean"] for d in task.texts for w in bad_nouns)


def test_metric_is_io_minus_s_logit_difference(word_tokenizer, task):
    batch = next(task.batches("heldout", batch_size=8))
    logits = torch.zeros(batch.size, len(word_tokenizer))
    logits[torch.arange(batch.size), batch.answer] = 3.0
    logits[torch.arange(batch.size), batch.wrong] = 1.0
    assert torch.allclose(task.metric(logits, batch), torch.full((batch.size,), 2.0))


def test_too_few_single_token_names_raise(word_tokenizer, monkeypatch):
    multi = [n for n in ioi.NAMES if n not in ioi._single_tokens(word_tokenizer, ioi.NAMES)]
    monkeypatch.setattr(ioi, "NAMES", ("Mary", "John", *multi))
    with pytest.raises(TaskError, match="at least 3 first names"):
        make_ioi(word_tokenizer, n_pairs=4)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_odd_or_empty_n_pairs_raise(word_tokenizer, n):
    with pytest.raises(TaskError, match="even"):
        make_ioi(word_tokenizer, n_pairs=n)


@pytest.mark.slow
def test_real_smollm2_tokenizer():
    """On the bundled SmolLM2's tokenizer (converted on first use): prompts tokenize as stored."""
    from circuitfinder.engine.models import load_pretrained

    _, tok, _ = load_pretrained("smollm2-135m")
    task = make_ioi(tok, n_pairs=16)
    for k, d in enumerate(task.texts):  # SmolLM2 adds no special tokens
        assert tok(d["clean"], add_special_tokens=False)["input_ids"] == task.clean[k, : task.lengths[k]].tolist()
        assert tok.decode([int(task.answer[k])]) == d["answer"]
