"""Fuzz tests (hypothesis) of the two loaders that read files a user hands us.

Random task files (JSONL and CSV; valid and invalid rows, random Unicode, missing fields, wrong
types, empty files, raw bytes) go to :func:`circuitfinder.tasks.from_file.load_task_file`, and random
``circuit.json`` documents to :meth:`circuitfinder.graphs.circuit.Circuit.load`. Every outcome must be a
usable result or the loader's documented error (``TaskError``, ``CircuitFileError``), never
another exception. Pathological inputs that random generation rarely reaches (integers longer
than Python parses, nesting deeper than the recursion limit, lone surrogates, CSV cells over the
csv module's field limit, a UTF-8 byte-order mark) are pinned as explicit examples.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, tiny_tokenizer

from circuitfinder.graphs.circuit import SCHEMA, VERSION, Circuit, CircuitFileError
from circuitfinder.tasks.base import Task, TaskError
from circuitfinder.tasks.from_file import FIELDS, load_task_file

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("fuzz-tok"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


# ---------------------------------------------------------------------------------------------
# Task files
# ---------------------------------------------------------------------------------------------

word = st.integers(0, VOCAB - 1).map(lambda i: f"w{i}")
prompt = st.lists(word, min_size=1, max_size=5).map(" ".join)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
field_value = (
    prompt
    | word
    | st.lists(word, max_size=3)
    | st.text(max_size=20)
    | st.sampled_from(["", " ", "discovery", "heldout"])
    | json_value
)


@st.composite
def valid_row(draw) -> dict:
    """A row that is valid on its own (clean and corrupted of equal length, one-token answers)."""
    clean = draw(st.lists(word, min_size=1, max_size=5))
    corrupted = [draw(word) for _ in clean]
    answer, wrong = draw(word), draw(word)
    row = {"clean": " ".join(clean), "corrupted": " ".join(corrupted), "answer": answer, "wrong": wrong}
    if draw(st.booleans()):
        row["answer"] = draw(st.lists(word, min_size=1, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        row["split"] = draw(st.sampled_from(["discovery", "heldout"]))
    return row


@st.composite
def messy_row(draw) -> dict:
    """A row with random fields and values: missing, extra, wrong types, random text."""
    keys = draw(st.lists(st.sampled_from([*FIELDS, "split", "extra"]) | st.text(max_size=6), max_size=7, unique=True))
    return {k: draw(field_value) for k in keys}


def row_strategy():
    return (
        valid_row()
        | messy_row()
        | valid_row().flatmap(
            lambda row: st.sampled_from(sorted(row)).flatmap(lambda k: field_value.map(lambda v: row | {k: v}))
        )
    )


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@st.composite
def jsonl_text(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind <= 6:
            lines.append(json.dumps(draw(row_strategy()), ensure_ascii=draw(st.booleans())))
        elif kind == 7:
            lines.append(json.dumps(draw(json_value)))  # valid JSON, not an object
        elif kind == 8:
            lines.append(draw(st.text(max_size=30)))  # anything, usually not JSON
        else:
            lines.append("")
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


@st.composite
def csv_text(draw) -> str:
    header = draw(
        st.permutations([*FIELDS, "split"]).flatmap(lambda cols: st.integers(0, 5).map(lambda n: cols[: len(cols) - n]))
    )
    if draw(st.integers(0, 4)) == 0:
        header = header + draw(st.lists(st.text(max_size=6), max_size=2))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if draw(st.integers(0, 9)):
        writer.writerow(header)
    for _ in range(draw(st.integers(0, 8))):
        row = draw(row_strategy())
        cells = [_cell(row.get(c, "")) for c in header]
        if draw(st.integers(0, 6)) == 0:
            cells = cells[: draw(st.integers(0, len(cells)))] + draw(st.lists(st.text(max_size=8), max_size=2))
        writer.writerow(cells)
    if draw(st.integers(0, 5)) == 0:
        buffer.write(draw(st.text(max_size=40)))
    return buffer.getvalue()


def _new_file(folder: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


def _load(path: Path, tokenizer, **kwargs):
    """The loader's outcome: a Task or a TaskError (anything else fails the test)."""
    try:
        task = load_task_file(path, tokenizer, **kwargs)
    except TaskError as exc:
        assert str(exc).strip(), "an error must say what is wrong"
        return exc
    assert isinstance(task, Task) and len(task) >= 1
    assert task.clean.shape == task.corrupted.shape and set(task.split) <= {"discovery", "heldout"}
    if kwargs.get("n_pairs"):
        assert len(task) <= kwargs["n_pairs"]
    return task


OPTIONS = st.fixed_dictionaries(
    {"n_pairs": st.none() | st.integers(1, 6), "skip_bad_rows": st.booleans(), "seed": st.integers(0, 3)}
)


@FUZZ
@given(text=jsonl_text(), options=OPTIONS)
@example(text='{"clean": ' + "9" * 5000 + "}\n", options={})  # longer than int() parses
@example(text="[" * 50_000 + "]" * 50_000 + "\n", options={})  # deeper than the recursion limit
@example(
    text='{"clean": "w1 \\ud800", "corrupted": "w1 w2", "answer": "w3", "wrong": "w4"}\n', options={}
)  # lone surrogate
@example(text='{"clean": " ", "corrupted": " ", "answer": "w3", "wrong": "w4"}\n', options={})  # prompts of no token
@example(text="", options={})
def test_random_jsonl_task_files_load_or_fail_cleanly(tokenizer, scratch, text, options):
    path = _new_file(scratch, ".jsonl")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load(path, tokenizer, **options)


@FUZZ
@given(text=csv_text(), options=OPTIONS)
@example(text="clean,corrupted,answer,wrong\n" + "w1 " * 50_000 + ",w1,w2,w3\n", options={})  # over csv's field limit
@example(text='clean,corrupted,answer,wrong\nw1,w2,"[' + "9" * 5000 + ']",w3\n', options={})
@example(text="clean,corrupted,answer,wrong\nw1\0,w2,w3,w4\n", options={})
@example(text="", options={})
def test_random_csv_task_files_load_or_fail_cleanly(tokenizer, scratch, text, options):
    path = _new_file(scratch, ".csv")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load(path, tokenizer, **options)


@FUZZ
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_random_bytes_as_a_task_file_load_or_fail_cleanly(tokenizer, scratch, data, suffix):
    path = _new_file(scratch, suffix)
    path.write_bytes(data)
    _load(path, tokenizer)


def test_a_csv_file_with_a_byte_order_mark_reads_like_one_without(tokenizer, tmp_path):
    """Spreadsheets save CSV as UTF-8 with a byte-order mark; its header must still be found."""
    text = "clean,corrupted,answer,wrong\nw1 w2,w1 w3,w4,w5\nw1 w6,w1 w7,w4,w5\n"
    (tmp_path / "plain.csv").write_text(text, encoding="utf-8")
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")
    plain, bom = (load_task_file(tmp_path / n, tokenizer) for n in ("plain.csv", "bom.csv"))
    assert bom.clean.tolist() == plain.clean.tolist() and bom.answer.tolist() == plain.answer.tolist()


def test_a_prompt_of_no_token_is_reported_with_its_line(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"clean": "w1 w2", "corrupted": "w1 w3", "answer": "w4", "wrong": "w5"})
        + "\n"
        + json.dumps({"clean": " ", "corrupted": " ", "answer": "w4", "wrong": "w5"})
        + "\n"
    )
    with pytest.raises(TaskError, match=r"t\.jsonl:2: .*no token"):
        load_task_file(path, tokenizer)


# ---------------------------------------------------------------------------------------------
# Circuit files
# ---------------------------------------------------------------------------------------------

node = st.sampled_from(
    ["input", "logits", "m0", "m1", "m7", "a0.h0", "a1.h1", "a0.h3", "a9.h0", "a0.g0", "a1.g1", "", "a0", "h1"]
)
slot = st.sampled_from(["", "<q>", "<k>", "<v>", "<x>"])
name = st.tuples(node, slot).map("".join) | json_value
VALID_EDGES = [
    {"sender": "input", "receiver": "a1.h0<q>", "score": 0.5},
    {"sender": "a0.h1", "receiver": "m1", "score": -1.0},
    {"sender": "m1", "receiver": "logits", "score": 2},
    {"sender": "input", "receiver": "a1.g0<k>", "score": 0.0},
]
VALID = {
    "schema": SCHEMA,
    "version": VERSION,
    "model": "tiny",
    "task": "ioi",
    "method": "eap-ig",
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_groups": 1,
    "metadata": {"faithfulness": 0.9},
    "edges": VALID_EDGES,
}


@st.composite
def circuit_document(draw):
    """A circuit document: valid, or valid with random fields replaced, dropped or added."""
    doc = json.loads(json.dumps(VALID))
    doc["edges"] = copy.deepcopy(
        draw(
            st.lists(
                st.sampled_from(VALID_EDGES)
                | st.fixed_dictionaries(
                    {"sender": name, "receiver": name, "score": st.floats() | st.integers() | json_value}
                ),
                max_size=5,
            )
        )
    )
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(VALID)) | st.text(max_size=5))
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(json_value | st.integers(-3, 5))
    for edge in doc["edges"] if isinstance(doc.get("edges"), list) else []:
        if isinstance(edge, dict) and draw(st.integers(0, 4)) == 0:
            edge.pop(draw(st.sampled_from(["sender", "receiver", "score"])), None)
    return doc


def _load_circuit(path: Path):
    try:
        record = Circuit.load(path)
    except CircuitFileError as exc:
        assert str(exc).strip()
        return exc
    again = Circuit.from_json(record.to_json())  # a loaded record saves and reloads unchanged
    assert again.to_json() == record.to_json()
    record.to_networkx()
    record.top(2)
    return record


@FUZZ
@given(doc=circuit_document())
def test_random_circuit_documents_load_or_fail_cleanly(scratch, doc):
    path = _new_file(scratch, ".json")
    path.write_text(json.dumps(doc))
    _load_circuit(path)


@FUZZ
@given(doc=json_value)
@example(doc=None)
def test_random_json_values_as_a_circuit_file_load_or_fail_cleanly(scratch, doc):
    path = _new_file(scratch, ".json")
    path.write_text(json.dumps(doc))
    _load_circuit(path)


@FUZZ
@given(data=st.binary(max_size=200))
@example(data=b"\xff\xfe{")  # not UTF-8
@example(data=b"[" * 50_000)  # deeper than the recursion limit
@example(data=b'{"schema": "circuits/circuit", "version": 1, "n_layers": ' + b"9" * 5000 + b"}")
def test_random_bytes_as_a_circuit_file_load_or_fail_cleanly(scratch, data):
    path = _new_file(scratch, ".json")
    path.write_bytes(data)
    _load_circuit(path)


def test_the_valid_document_loads(tmp_path):
    """The fuzzers' base document is itself valid (so they explore around a working file)."""
    path = tmp_path / "circuit.json"
    path.write_text(json.dumps(VALID))
    record = _load_circuit(path)
    assert isinstance(record, Circuit) and len(record.edges) == 4
