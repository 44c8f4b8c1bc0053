"""Tests of tasks read from JSONL and CSV files: valid files, one bad file per problem, skipping bad rows."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLEAN, CORRUPTED, ROW, task_rows

from circuitfinder.tasks import build_task
from circuitfinder.tasks.base import TaskError, logit_difference, probability_difference
from circuitfinder.tasks.from_file import load_task_file
from circuitfinder.tasks.ioi import make_ioi


def _jsonl(tmp_path, lines: list, name: str = "task.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _csv(tmp_path, text: str, name: str = "task.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path, tokenizer, **kwargs) -> str:
    with pytest.raises(TaskError) as info:
        load_task_file(path, tokenizer, **kwargs)
    return str(info.value)


def test_valid_jsonl(tmp_path, word_tokenizer):
    path = _jsonl(tmp_path, task_rows(6), "my-task.jsonl")
    task = load_task_file(path, word_tokenizer, seed=0)
    assert task.name == "my-task" and len(task) == 6 and task.notes == ()
    assert task.metric is logit_difference and task.answer_sets is None
    assert task.clean.shape == task.corrupted.shape
    assert (
        word_tokenizer.decode([int(task.answer[0])]) == " Kate"
        and word_tokenizer.decode([int(task.wrong[0])]) == " John"
    )
    assert task.clean[0].tolist() == word_tokenizer(CLEAN)["input_ids"]  # default special tokens (<bos>)
    assert [d["line"] for d in task.texts] == [1, 2, 3, 4, 5, 6]
    assert set(task.split) == {"discovery", "heldout"}
    assert load_task_file(path, word_tokenizer, seed=0).split == task.split  # seeded split
    assert build_task(str(path), word_tokenizer, n_pairs=4, seed=0).clean.shape[0] == 4  # capped, sampled
    assert torch.equal(
        build_task(str(path), word_tokenizer, n_pairs=4, seed=0).clean,
        build_task(str(path), word_tokenizer, n_pairs=4, seed=0).clean,
    )


def test_valid_csv_with_answer_lists_and_split(tmp_path, word_tokenizer):
    path = _csv(
        tmp_path,
        "clean,corrupted,answer,wrong,split\n"
        f'"{CLEAN}","{CORRUPTED}", Kate| Amy, John,discovery\n'
        f'"{CLEAN}","{CORRUPTED.replace("Tom", "Dan")}","["" Kate""]", John| Tom,heldout\n',
    )
    task = load_task_file(path, word_tokenizer)
    assert len(task) == 2 and task.split == ("discovery", "heldout")
    assert task.metric is probability_difference and task.metric_name == "probability_difference"
    decode = lambda ids: [word_tokenizer.decode([t]) for t in ids if t >= 0]  # noqa: E731
    assert decode(task.answer_sets[0].tolist()) == [" Kate", " Amy"] and decode(task.answer_sets[1].tolist()) == [
        " Kate"
    ]
    assert decode(task.wrong_sets[0].tolist()) == [" John"] and decode(task.wrong_sets[1].tolist()) == [" John", " Tom"]
    assert [d["line"] for d in task.texts] == [2, 3]


def test_a_runs_prompts_read_back_as_a_task_file(tmp_path, word_tokenizer):
    ioi = make_ioi(word_tokenizer, n_pairs=8, seed=0)
    rows = [
        {k: t[k] for k in ("clean", "corrupted", "answer", "wrong")} | {"split": s}
        for t, s in zip(ioi.texts, ioi.split)
    ]
    task = load_task_file(_jsonl(tmp_path, rows), word_tokenizer)
    for name in ("clean", "corrupted", "lengths", "answer", "wrong"):
        assert torch.equal(getattr(task, name), getattr(ioi, name)), name
    assert task.split == ioi.split


def test_unequal_token_lengths(tmp_path, word_tokenizer):
    bad = dict(ROW, corrupted=CORRUPTED.replace("Tom", "Tom and Amy"))
    n_clean, n_bad = (len(word_tokenizer(bad[k])["input_ids"]) for k in ("clean", "corrupted"))
    assert n_clean != n_bad
    message = _error(_jsonl(tmp_path, [ROW, "", bad]), word_tokenizer)  # a blank line still counts
    assert message.startswith(f"{tmp_path / 'task.jsonl'}:3: clean has {n_clean} tokens, corrupted {n_bad}")


def test_answer_not_a_single_token(tmp_path, word_tokenizer):
    n = len(word_tokenizer(" Victoria", add_special_tokens=False)["input_ids"])
    assert n > 1
    message = _error(_jsonl(tmp_path, task_rows(2) + [dict(ROW, answer=[" Kate", " Victoria"])]), word_tokenizer)
    assert f"task.jsonl:3: answer ' Victoria' is {n} tokens" in message


def test_empty_files(tmp_path, word_tokenizer):
    assert "task.jsonl:1: the file has no rows" in _error(_jsonl(tmp_path, ["", "  "]), word_tokenizer)
    assert "task.csv:1: the file has no rows" in _error(
        _csv(tmp_path, "clean,corrupted,answer,wrong\n"), word_tokenizer
    )
    assert "the file has no rows" in _error(_csv(tmp_path, "", "empty.csv"), word_tokenizer, skip_bad_rows=True)


def test_duplicate_rows(tmp_path, word_tokenizer):
    message = _error(_jsonl(tmp_path, task_rows(3) + [task_rows(2)[1]]), word_tokenizer)
    assert "task.jsonl:4: duplicate of line 2" in message


def test_missing_column_csv(tmp_path, word_tokenizer):
    message = _error(
        _csv(tmp_path, f'clean,corrupted,answer\n"{CLEAN}","{CORRUPTED}", Kate\n'), word_tokenizer, skip_bad_rows=True
    )
    assert message.startswith(
        f"{tmp_path / 'task.csv'}:1: missing column 'wrong'; columns present: clean, corrupted, answer"
    )


def test_missing_field_jsonl(tmp_path, word_tokenizer):
    row = {k: v for k, v in ROW.items() if k != "corrupted"}
    message = _error(_jsonl(tmp_path, task_rows(1) + [row]), word_tokenizer)
    assert "task.jsonl:2: missing field 'corrupted'; fields present: clean, answer, wrong" in message


def test_invalid_json(tmp_path, word_tokenizer):
    message = _error(_jsonl(tmp_path, task_rows(2) + ['{"clean": "x", ']), word_tokenizer)
    assert "task.jsonl:3: invalid JSON" in message
    assert "list.jsonl:1: expected a JSON object" in _error(
        _jsonl(tmp_path, ['["a", "b"]'], "list.jsonl"), word_tokenizer
    )


def test_other_row_problems(tmp_path, word_tokenizer):
    rows = task_rows(2) + [
        dict(ROW, wrong=[" John", " Kate"]),
        dict(task_rows(4)[3], split="test"),
        dict(task_rows(5)[4], answer=""),
    ]
    message = _error(_jsonl(tmp_path, rows), word_tokenizer)
    assert "task.jsonl:3: ' Kate' is both answer and wrong" in message
    assert "task.jsonl:4: split must be 'discovery' or 'heldout'; got 'test'" in message
    assert "task.jsonl:5: missing field 'answer'" in message
    mixed = [dict(r, split="heldout") for r in task_rows(2)] + task_rows(3)[2:]
    assert "task.jsonl:3: no split, while other rows have one" in _error(_jsonl(tmp_path, mixed), word_tokenizer)
    one_side = [dict(r, split="discovery") for r in task_rows(3)]
    assert "every row's split is 'discovery'" in _error(_jsonl(tmp_path, one_side), word_tokenizer)


def test_message_lists_the_first_problems_one_per_line(tmp_path, word_tokenizer):
    rows = [dict(r, answer=" Victoria") for r in task_rows(8)]
    lines = _error(_jsonl(tmp_path, rows), word_tokenizer).splitlines()
    assert [line.split(": ")[0] for line in lines[:5]] == [f"{tmp_path / 'task.jsonl'}:{k}" for k in range(1, 6)]
    assert lines[5] == "... and 3 more problem(s)" and lines[6] == "8 bad row(s) and no valid row"


def test_skip_bad_rows(tmp_path, word_tokenizer):
    rows = task_rows(4) + [dict(ROW, answer=" Victoria"), "{oops", task_rows(1)[0]]
    path = _jsonl(tmp_path, rows)
    message = _error(path, word_tokenizer)
    assert message.splitlines()[-1].startswith("3 bad row(s), 4 valid; fix them, or skip bad rows")
    task = load_task_file(path, word_tokenizer, skip_bad_rows=True)
    assert len(task) == 4 and [d["line"] for d in task.texts] == [1, 2, 3, 4]
    assert len(task.notes) == 1 and task.notes[0].startswith("skipped 3 bad row(s) of 7")
    assert "task.jsonl:6: invalid JSON" in task.notes[0]
    all_bad = _jsonl(tmp_path, [dict(ROW, answer=" Victoria")], "bad.jsonl")
    assert "no valid row" in _error(all_bad, word_tokenizer, skip_bad_rows=True)


def test_build_task_names_and_paths(tmp_path, word_tokenizer):
    with pytest.raises(TaskError, match="no task file at .*missing.jsonl"):
        build_task(str(tmp_path / "missing.jsonl"), word_tokenizer)
    with pytest.raises(
        TaskError,
        match="unknown task 'nope': use one of greater-than, induction, ioi, tracr-frac_prevs, tracr-pair_balance, "
        "tracr-reverse, or a .jsonl",
    ):
        build_task("nope", word_tokenizer)
    other = tmp_path / "task.json"
    other.write_text("{}")
    with pytest.raises(TaskError, match="must end in .jsonl or .csv"):
        build_task(str(other), word_tokenizer)
    assert (
        len(
            build_task(
                str(
                    _csv(
                        tmp_path,
                        "clean,corrupted,answer,wrong\n" + f'"{CLEAN}","{CORRUPTED}", Kate, John\n'
                        f'"{CLEAN}","{CORRUPTED}", Kate, Tom\n',
                        "T.CSV",
                    )
                ),
                word_tokenizer,
            )
        )
        == 2
    )
