"""Tests of the greater-than task and the answer-set machinery, on tiny hand-built tokenizers.

Two word-level tokenizers mimic the two cases: single-digit tokens with a separate space and a
BOS token (SmolLM2/Gemma-3 style: " 1732" -> " ", "1", "7", "3", "2") and two-digit year tokens
(GPT-2 style: " 1732" -> " 17", "32").
"""

from __future__ import annotations

import pytest
import torch

from circuitfinder.tasks import build_task
from circuitfinder.tasks.base import Task, TaskBatch, TaskError, probability_difference
from circuitfinder.tasks.greater_than import CENTURIES, NOUNS, make_greater_than, year_mode

N = 24
WORDS = ["The", " lasted", " from", " the", " year", " to", " "] + [" " + n for n in NOUNS]


def _word_tokenizer(folder, vocab: list[str], pattern: str, bos: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>"
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def digit_tokenizer(tmp_path_factory):
    return _word_tokenizer(
        tmp_path_factory.mktemp("digits"), WORDS + [str(d) for d in range(10)], r" ?[A-Za-z]+|\d| ", bos=True
    )


@pytest.fixture(scope="module")
def year_tokenizer(tmp_path_factory):
    vocab = WORDS + [f" {xx}" for xx in CENTURIES] + [f"{y:02d}" for y in range(100)]
    return _word_tokenizer(tmp_path_factory.mktemp("years"), vocab, r" ?[A-Za-z]+| ?\d\d", bos=False)


@pytest.fixture(scope="module")
def digit_task(digit_tokenizer):
    return make_greater_than(digit_tokenizer, n_pairs=N, seed=0)


@pytest.fixture(scope="module")
def year_task(year_tokenizer):
    return make_greater_than(year_tokenizer, n_pairs=N, seed=0)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenizers_split_years_as_intended(digit_tokenizer, year_tokenizer):
    assert [digit_tokenizer.decode([t]) for t in digit_tokenizer(" 1732")["input_ids"]] == [
        "<bos>",
        " ",
        "1",
        "7",
        "3",
        "2",
    ]
    assert [year_tokenizer.decode([t]) for t in year_tokenizer(" 1732")["input_ids"]] == [" 17", "32"]
    assert year_mode(digit_tokenizer) == "digit" and year_mode(year_tokenizer) == "two-digit"


def test_a_tokenizer_without_digit_tokens_is_refused(tmp_path):
    letters = _word_tokenizer(tmp_path, WORDS, r" ?[A-Za-z]+| ", bos=False)  # digits are <unk>
    with pytest.raises(TaskError, match="digits 0-9"):
        make_greater_than(letters, n_pairs=4)


def test_same_seed_same_task_other_seed_differs(digit_tokenizer, year_tokenizer, digit_task, year_task):
    for tokenizer, task in ((digit_tokenizer, digit_task), (year_tokenizer, year_task)):
        again = make_greater_than(tokenizer, n_pairs=N, seed=0)
        for name in ("clean", "corrupted", "lengths", "answer", "wrong", "answer_sets", "wrong_sets"):
            assert torch.equal(getattr(task, name), getattr(again, name)), name
        assert task.split == again.split and task.texts == again.texts
        assert make_greater_than(tokenizer, n_pairs=N, seed=1).texts != task.texts


def test_prompts_follow_hanna_et_al(digit_tokenizer, digit_task):
    assert digit_task.name == "greater-than" and len(digit_task) == N
    assert digit_task.metric is probability_difference and digit_task.metric_name == "probability_difference"
    for k, d in enumerate(digit_task.texts):
        xx, yy = divmod(d["year"], 100)
        assert d["clean"] == f"The {d['noun']} lasted from the year {xx}{yy:02d} to the year {xx}"
        assert d["corrupted"] == f"The {d['noun']} lasted from the year {xx}01 to the year {xx}"
        assert xx in CENTURIES and 10 <= yy <= 89  # digit mode: both sets non-empty
        n = int(digit_task.lengths[k])
        assert digit_tokenizer(d["clean"])["input_ids"] == digit_task.clean[k, :n].tolist()
        assert digit_tokenizer(d["corrupted"])["input_ids"] == digit_task.corrupted[k, :n].tolist()
        assert digit_task.clean[k, 0] == digit_tokenizer.bos_token_id  # default special tokens kept


def test_corruption_changes_only_the_start_year_digits(digit_tokenizer, year_tokenizer, digit_task, year_task):
    for tokenizer, task, width in ((digit_tokenizer, digit_task, 2), (year_tokenizer, year_task, 1)):
        for k in range(N):
            at = int(task.positions["YY"][k])
            diff = (task.clean[k] != task.corrupted[k]).nonzero().flatten().tolist()
            assert diff and set(diff) <= set(range(at, at + width))
            assert task.corrupted[k, at : at + width].tolist() == _ids(tokenizer, "01")
            assert int(task.positions["END"][k]) == int(task.lengths[k]) - 1


def _digits(tokenizer, ids: torch.Tensor) -> list[int]:
    return [int(tokenizer.decode([t])) for t in ids.tolist() if t >= 0]


def test_digit_mode_answers_are_later_tens_digits(digit_tokenizer, digit_task):
    for k, d in enumerate(digit_task.texts):
        tens = d["year"] % 100 // 10
        assert _digits(digit_tokenizer, digit_task.answer_sets[k]) == list(range(tens + 1, 10))
        assert _digits(digit_tokenizer, digit_task.wrong_sets[k]) == list(range(0, tens))  # equal tens: neither
        assert _digits(digit_tokenizer, digit_task.answer[k : k + 1]) == [tens + 1]
        assert _digits(digit_tokenizer, digit_task.wrong[k : k + 1]) == [tens - 1]
        assert d["answer"] == [str(x) for x in range(tens + 1, 10)]
        # the answer is the very next token: appending it to the prompt adds exactly that token
        n = int(digit_task.lengths[k])
        assert digit_tokenizer(d["clean"] + str(tens + 1))["input_ids"] == digit_task.clean[k, :n].tolist() + [
            int(digit_task.answer[k])
        ]


def test_two_digit_mode_answers_are_later_years(year_tokenizer, year_task):
    for k, d in enumerate(year_task.texts):
        yy = d["year"] % 100
        assert 2 <= yy <= 98
        assert _digits(year_tokenizer, year_task.answer_sets[k]) == list(range(yy + 1, 100))
        assert _digits(year_tokenizer, year_task.wrong_sets[k]) == list(range(0, yy + 1))
        assert _digits(year_tokenizer, year_task.answer[k : k + 1]) == [yy + 1]
        assert _digits(year_tokenizer, year_task.wrong[k : k + 1]) == [yy]


def test_batches_and_to_carry_answer_sets(digit_task):
    order = sorted(digit_task.indices("heldout"), key=lambda i: (int(digit_task.lengths[i]), i))  # as batches() does
    batches = [b.to("cpu") for b in digit_task.batches("heldout", batch_size=5)]
    for name in ("answer_sets", "wrong_sets"):
        got = [row for b in batches for row in getattr(b, name).tolist()]
        assert got == getattr(digit_task, name)[order].tolist()


def test_probability_difference_sums_over_sets_and_skips_padding():
    logits = torch.randn(2, 7, requires_grad=True)
    batch = TaskBatch(
        clean=torch.zeros(2, 3, dtype=torch.long),
        corrupted=torch.zeros(2, 3, dtype=torch.long),
        last=torch.tensor([2, 2]),
        answer=torch.tensor([1, 4]),
        wrong=torch.tensor([0, 6]),
        answer_sets=torch.tensor([[1, 2, 3], [4, -1, -1]]),
        wrong_sets=torch.tensor([[0, -1], [5, 6]]),
    )
    p = logits.softmax(-1)
    expected = torch.stack([p[0, 1:4].sum() - p[0, 0], p[1, 4] - p[1, 5:7].sum()])
    value = probability_difference(logits, batch)
    assert torch.allclose(value, expected)
    value.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    single = TaskBatch(batch.clean, batch.corrupted, batch.last, batch.answer, batch.wrong)  # no sets
    assert torch.allclose(probability_difference(logits, single), p[[0, 1], [1, 4]] - p[[0, 1], [0, 6]])


def test_task_validates_answer_sets():
    base = dict(
        name="t",
        clean=torch.ones(2, 3, dtype=torch.long),
        corrupted=torch.ones(2, 3, dtype=torch.long),
        lengths=torch.tensor([3, 3]),
        answer=torch.tensor([1, 2]),
        wrong=torch.tensor([3, 4]),
        split=("discovery", "heldout"),
    )
    ok = Task(**base, answer_sets=torch.tensor([[1, -1], [2, 5]]), wrong_sets=torch.tensor([[3], [4]]))
    assert next(ok.batches("heldout")).answer_sets.tolist() == [[2, 5]]
    with pytest.raises(TaskError, match="both"):
        Task(**base, answer_sets=torch.tensor([[1], [2]]))
    with pytest.raises(TaskError, match="single id"):
        Task(**base, answer_sets=torch.tensor([[1], [7]]), wrong_sets=torch.tensor([[3], [4]]))
    with pytest.raises(TaskError, match="LongTensor"):
        Task(**base, answer_sets=torch.tensor([1, 2]), wrong_sets=torch.tensor([[3], [4]]))


def test_registered_and_built_by_name(digit_tokenizer):
    task = build_task("greater-than", digit_tokenizer, n_pairs=6, seed=3)
    assert task.name == "greater-than" and len(task) == 6
    assert set(task.split) == {"discovery", "heldout"}


def test_baseline_and_eap_run_on_a_tiny_model(digit_tokenizer, digit_task):
    """The answer-set metric goes through the evaluator and a backward pass on a random model."""
    from tiny_models import tiny_hf_model

    from circuitfinder.engine.adapter import ModelAdapter
    from circuitfinder.engine.faithfulness import CircuitEvaluator
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.methods.attribution import eap

    adapter = ModelAdapter.from_hf(
        tiny_hf_model("llama", vocab=len(digit_tokenizer)),
        digit_tokenizer,
        name="tiny-llama",
        hf_id="llama",
        dtype=torch.float64,
    )
    graph = EdgeGraph(adapter.shape)
    baseline = CircuitEvaluator(adapter, graph, digit_task, "heldout", batch_size=8).baseline
    assert -1 <= baseline.clean <= 1 and -1 <= baseline.corrupted <= 1 and 0 <= baseline.accuracy <= 1
    scores = eap(adapter, graph, digit_task, batch_size=8)
    assert torch.isfinite(scores).all() and scores.abs().sum() > 0


def test_prompts_read_back_as_a_task_file_with_answer_sets(tmp_path, digit_tokenizer, digit_task):
    """A run's prompts.jsonl rows (answers as lists) load back as the same task."""
    import json

    from circuitfinder.tasks.from_file import load_task_file

    path = tmp_path / "gt.jsonl"
    path.write_text(
        "".join(
            json.dumps({k: t[k] for k in ("clean", "corrupted", "answer", "wrong")} | {"split": s}) + "\n"
            for t, s in zip(digit_task.texts, digit_task.split)
        )
    )
    task = load_task_file(path, digit_tokenizer)
    assert task.metric is probability_difference and task.split == digit_task.split
    for name in ("clean", "corrupted", "lengths", "answer_sets", "wrong_sets"):
        assert torch.equal(getattr(task, name), getattr(digit_task, name)), name
