"""The tutorial notebook runs from start to end on the bundled model, and says what it says."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "tutorial.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if "data" in out:  # results, not streams (a library's warnings on stderr)
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _kinds(cell) -> set[str]:
    return {kind for out in cell.get("outputs", []) for kind in out.get("data", {})}


def check(notebook) -> None:
    """What every run of the notebook must show (the committed one and a fresh one)."""
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    texts = [_text(c) for c in code]
    assert texts[0].startswith("ModelAdapter(smollm2-135m: LlamaForCausalLM, 30 layers, 9 heads, 3 key/value groups")
    assert re.match(r"Task\(ioi: 32 prompt pairs \(16 discovery, 16 held-out\)", texts[1])
    run = re.match(
        r"Run\(ioi · smollm2-135m · eap-ig: ([\d,]+) of 70,651 edges, faithfulness (-?[\d.]+) held-out\)", texts[2]
    )
    assert run and 0 < int(run.group(1).replace(",", "")) < 10_000 and 0.5 < float(run.group(2)) <= 1.2
    assert "image/svg+xml" in _kinds(code[3])  # the circuit draws itself
    assert "image/png" in _kinds(code[5])  # the curve, inline: discover() left the notebook's backend alone
    assert texts[6].startswith("Comparison(A: ioi · smollm2-135m · eap-ig; B: ioi · smollm2-135m · eap;")
    assert "circuit.json" in texts[8] and "scores.parquet" in texts[8]


def test_the_committed_notebook_holds_its_outputs():
    import nbformat

    check(nbformat.read(NOTEBOOK, as_version=4))


def test_the_notebook_runs_from_a_clean_kernel(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    notebook = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    check(notebook)
    assert (tmp_path / "outputs" / "notebook-ioi" / "circuit.json").is_file()
