"""A task read from a user's file: prompt pairs and answers, one per JSONL line or CSV row.

Fields (the same names as a run folder's ``prompts.jsonl``, so a run's prompts can be read back):

- ``clean``, ``corrupted``: the two prompts. They are tokenized with the model's tokenizer and its
  default special tokens (e.g. Gemma's ``<bos>``) and must give the same number of tokens.
- ``answer``, ``wrong``: the correct and the wrong next token, or lists of them. Each must be one
  token when encoded on its own without special tokens; nothing is added, so write the leading
  space yourself where the tokenizer needs one (``" Mary"``). In CSV, a list is a JSON list
  (``["3", "4"]``) or a ``|``-separated string (``3|4``; a literal ``|`` needs the JSON form).
- ``split`` (optional): ``discovery`` or ``heldout``. Either every row has it or none does; without
  it the split is random, seeded.

Every problem is found before anything runs and reported with its line (``data.jsonl:7: ...``):
invalid JSON, a missing field, prompts of unequal token length, an answer that is not one token,
a token both correct and wrong, a duplicate row, an empty file. With ``skip_bad_rows=True`` bad
rows are dropped instead, and the task's ``notes`` say how many and why.

The metric is the logit difference (Wang et al. 2022) when every row has one answer and one
wrong answer, and the probability difference over the sets (Hanna et al. 2023) when any row has
several. The first answer and the first wrong answer of a row are its single ids (``Task.answer``,
``Task.wrong``), which accuracy compares.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

from circuitfinder.tasks.base import (
    Task,
    TaskError,
    logit_difference,
    pad_id_of,
    pad_sets,
    probability_difference,
    split_labels,
    stack_pairs,
)

FIELDS = ("clean", "corrupted", "answer", "wrong")
SPLITS = ("discovery", "heldout")
SHOWN_PROBLEMS = 5  # problems listed in an error message; the rest are counted


def _read_jsonl(path: Path, problems: list) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((line_no, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            except (ValueError, RecursionError) as exc:  # an integer too long to parse, nesting too deep
                problems.append((line_no, f"invalid JSON: {str(exc).split(';')[0] or 'nested too deeply'}"))
                continue
            if not isinstance(row, dict):
                problems.append(
                    (line_no, f"expected a JSON object with fields {', '.join(FIELDS)}; got {type(row).__name__}")
                )
                continue
            rows.append((line_no, row))
    return rows


def _csv_list(value: str) -> str | list:
    """A CSV answer cell: a JSON list, a ``|``-separated list, or one answer."""
    if value.startswith("["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or an integer too long, nesting too deep)
            return value
    return value.split("|") if "|" in value else value


def _read_csv(path: Path, problems: list) -> list[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            missing = [c for c in FIELDS if c not in header]
            if header and missing:
                problems.append(
                    (1, f"missing column {', '.join(map(repr, missing))}; columns present: {', '.join(header)}")
                )
                return []
            rows = []
            for row in reader:
                if None in row:
                    problems.append(
                        (reader.line_num, f"{len(header) + len(row[None])} cells for {len(header)} columns")
                    )
                    continue
                if not any((v or "").strip() for v in row.values()):
                    continue
                rows.append(
                    (
                        reader.line_num,
                        {k: _csv_list(v) if k in ("answer", "wrong") and v is not None else v for k, v in row.items()},
                    )
                )
            return rows
        except csv.Error as exc:  # e.g. a cell over the csv module's size limit: the rest cannot be read
            raise TaskError(f"{path}:{max(reader.line_num, 1)}: not readable as CSV ({exc})") from None


def _encodable(value) -> bool:
    """Whether a field's text (a string or a list of them) can be encoded, as a tokenizer needs."""
    try:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _answers(tokenizer, label: str, value) -> tuple[list[int], list[str]]:
    """Token ids of an answer field (one string or a list), and the problems found."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        return [], [f"{label} must be a non-empty string or a non-empty list of them; got {json.dumps(value)}"]
    ids, problems = [], []
    for v in values:
        tok = tokenizer(v, add_special_tokens=False)["input_ids"]
        if len(tok) != 1:
            problems.append(f"{label} {v!r} is {len(tok)} tokens; each answer must be a single token")
        else:
            ids.append(tok[0])
    return ids, problems


def load_task_file(
    path: str | Path,
    tokenizer,
    n_pairs: int | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.5,
    skip_bad_rows: bool = False,
) -> Task:
    """Read a JSONL or CSV task file (see the module docstring for its fields).

    Args:
        path: a ``.jsonl`` or ``.csv`` file.
        tokenizer: the model's Hugging Face tokenizer.
        n_pairs: use at most this many rows (a seeded random sample, in file order); None for all.
        seed: seeds that sample and, without a ``split`` field, the split.
        heldout_fraction: share of rows labelled ``"heldout"`` when the file has no ``split``.
        skip_bad_rows: drop bad rows (counted in ``Task.notes``) instead of failing.

    Returns:
        The task, named after the file's stem, with position ``END`` (the last token) per pair.

    Raises:
        TaskError: listing the problems found, one per line as ``FILE:LINE: problem``; with
            ``skip_bad_rows``, only for file-wide problems or when no valid row is left.
    """
    path = Path(path)
    rows, problems = _read_rows(path)
    good = _valid_rows(tokenizer, rows, problems)
    good, with_split = _agree_on_split(good, problems)
    notes = _skip_or_fail(path, problems, good, skip_bad_rows)
    good, notes = _sample(good, n_pairs, random.Random(seed), notes)
    if with_split:
        split = tuple(r["split"] for _, r, *_ in good)
        if len(set(split)) < 2 and len(good) > 1:
            raise TaskError(
                f"{path}: every row's split is {split[0]!r}; faithfulness needs rows in both 'discovery' and 'heldout'"
            )
    else:
        split = split_labels(len(good), heldout_fraction, torch.Generator().manual_seed(seed))
    return _file_task(path, tokenizer, good, split, notes)


def _read_rows(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """The file's rows as (line, fields), and the problems found reading it as (line, message).

    Raises:
        TaskError: if the file is missing, not ``.jsonl`` or ``.csv``, not UTF-8, has no rows, or
            has problems and no readable row.
    """
    if not path.is_file():
        raise TaskError(f"no task file at {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise TaskError(f"{path}: a task file must end in .jsonl or .csv")
    problems: list[tuple[int, str]] = []  # (line, message)
    try:
        rows = (_read_jsonl if suffix == ".jsonl" else _read_csv)(path, problems)
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows and not problems:
        raise TaskError(f"{path}:1: the file has no rows; each needs the fields {', '.join(FIELDS)}")
    if problems and not rows:  # nothing readable (e.g. a missing CSV column): skipping cannot help
        raise TaskError(_report(path, problems, 0))
    return rows, problems


def _valid_rows(tokenizer, rows: list[tuple[int, dict]], problems: list[tuple[int, str]]) -> list[tuple]:
    """The rows without problems, as (line, row, clean ids, corrupted ids, answer ids, wrong ids).

    The problems of the others are added to ``problems``, one (line, message) each.
    """
    good, seen = [], {}
    for line, row in rows:
        row_problems, parsed = _check_row(tokenizer, line, row, seen)
        if row_problems:
            problems += [(line, p) for p in row_problems]
        else:
            good.append((line, row, *parsed))
    return good


def _check_row(tokenizer, line: int, row: dict, seen: dict[str, int]) -> tuple[list[str], tuple | None]:
    """A row's problems, and its (clean ids, corrupted ids, answer ids, wrong ids) where its fields
    can be tokenized (None where not). ``seen`` maps each row's fields to its first line."""
    row_problems = []
    missing = [k for k in FIELDS if row.get(k) in (None, "")]
    if missing:
        present = ", ".join(k for k, v in row.items() if v not in (None, "")) or "none"
        return [f"missing field {', '.join(map(repr, missing))}; fields present: {present}"], None
    if not isinstance(row["clean"], str) or not isinstance(row["corrupted"], str):
        return ["clean and corrupted must be strings"], None
    if not all(_encodable(row[k]) for k in FIELDS):
        return ["text that is not valid Unicode (a lone surrogate such as \\ud800)"], None
    clean, corrupted = tokenizer(row["clean"])["input_ids"], tokenizer(row["corrupted"])["input_ids"]
    if len(clean) != len(corrupted):
        row_problems.append(f"clean has {len(clean)} tokens, corrupted {len(corrupted)}; they must be equal")
    elif not clean:
        row_problems.append("clean and corrupted tokenize to no token; a prompt needs at least one")
    answers, found = _answers(tokenizer, "answer", row["answer"])
    wrongs, found_w = _answers(tokenizer, "wrong", row["wrong"])
    row_problems += found + found_w
    both = set(answers) & set(wrongs)
    if both:
        row_problems.append(f"{', '.join(repr(tokenizer.decode([t])) for t in sorted(both))} is both answer and wrong")
    label = row.get("split")
    if label not in (None, "") and label not in SPLITS:
        row_problems.append(f"split must be 'discovery' or 'heldout'; got {label!r}")
    key = json.dumps([row[k] for k in FIELDS])
    if key in seen:
        row_problems.append(f"duplicate of line {seen[key]}")
    seen.setdefault(key, line)
    return row_problems, (clean, corrupted, answers, wrongs)


def _agree_on_split(good: list[tuple], problems: list[tuple[int, str]]) -> tuple[list[tuple], int]:
    """Where some valid rows have a split and others not, those without one become problems.

    Returns:
        The rows kept, and how many valid rows had a split (0: none did).
    """
    with_split = sum(r.get("split") not in (None, "") for _, r, *_ in good)
    if 0 < with_split < len(good):
        problems += [
            (line, "no split, while other rows have one; give every row a split or none")
            for line, r, *_ in good
            if r.get("split") in (None, "")
        ]
        good = [g for g in good if g[1].get("split") not in (None, "")]
    return good, with_split


def _skip_or_fail(
    path: Path, problems: list[tuple[int, str]], good: list[tuple], skip_bad_rows: bool
) -> tuple[str, ...]:
    """The task's notes on skipped rows.

    Raises:
        TaskError: listing the problems, unless ``skip_bad_rows`` and some row is valid.
    """
    bad_lines = {line for line, _ in problems}
    if problems and (not skip_bad_rows or not good):
        raise TaskError(_report(path, problems, len(good)))
    if not problems:
        return ()
    shown = "; ".join(f"{path}:{line}: {msg}" for line, msg in problems[:SHOWN_PROBLEMS])
    return (f"skipped {len(bad_lines)} bad row(s) of {len(bad_lines) + len(good)}: {shown}",)


def _sample(
    good: list[tuple], n_pairs: int | None, rng: random.Random, notes: tuple[str, ...]
) -> tuple[list[tuple], tuple[str, ...]]:
    """At most ``n_pairs`` of the rows (a seeded random sample, in file order), and the notes."""
    if n_pairs is not None and len(good) > n_pairs:
        keep = set(rng.sample(range(len(good)), n_pairs))
        good = [g for i, g in enumerate(good) if i in keep]
        notes += (f"used {n_pairs} of the file's rows (a seeded random sample)",)
    return good, notes


def _file_task(path: Path, tokenizer, good: list[tuple], split: tuple[str, ...], notes: tuple[str, ...]) -> Task:
    """The task of the valid rows: the logit difference, or the probability difference over the
    answer sets where some row has several answers or wrong answers."""
    sets = any(len(a) > 1 or len(w) > 1 for *_, a, w in good)
    pad_id = pad_id_of(tokenizer)
    clean_t, corrupted_t, lengths = stack_pairs([(c, x) for _, _, c, x, _, _ in good], pad_id)
    return Task(
        name=path.stem,
        clean=clean_t,
        corrupted=corrupted_t,
        lengths=lengths,
        answer=torch.tensor([a[0] for *_, a, _ in good], device="cpu"),
        wrong=torch.tensor([w[0] for *_, w in good], device="cpu"),
        split=split,
        metric=probability_difference if sets else logit_difference,
        metric_name="probability_difference" if sets else "logit_difference",
        pad_id=pad_id,
        texts=tuple({k: r[k] for k in FIELDS} | {"line": line} for line, r, *_ in good),
        positions={"END": lengths - 1},
        answer_sets=pad_sets([a for *_, a, _ in good]) if sets else None,
        wrong_sets=pad_sets([w for *_, w in good]) if sets else None,
        notes=notes,
    )


def _report(path: Path, problems: list[tuple[int, str]], n_good: int) -> str:
    """The error message: the first problems, one line each as ``FILE:LINE: problem``, then a count."""
    problems = sorted(problems, key=lambda p: p[0])
    lines = [f"{path}:{line}: {msg}" for line, msg in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"... and {len(problems) - SHOWN_PROBLEMS} more problem(s)")
    n_bad = len({line for line, _ in problems})
    lines.append(
        f"{n_bad} bad row(s), {n_good} valid; fix them, or skip bad rows (skip_bad_rows=True)"
        if n_good
        else f"{n_bad} bad row(s) and no valid row"
    )
    return "\n".join(lines)
