"""Write the table of architectures in RESULTS.md from the test matrix (tests/architectures.py).

Each tiny model of the matrix is wrapped and put through the check at load (circuitfinder.engine.checks),
the same check the tests run; the table says which are exact (and in which working precision) and
which are refused, with the refusal's own words. Run it after changing the matrix or the engine:

    .venv/bin/python scripts/architectures.py            # print the table
    .venv/bin/python scripts/architectures.py --readme   # and replace it in RESULTS.md
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

START, END = "<!-- architectures: start (scripts/architectures.py) -->", "<!-- architectures: end -->"


def table() -> str:
    from architectures import ARCHITECTURES, build, load_dtype
    from circuitfinder.engine.adapter import ModelAdapter
    from circuitfinder.engine.checks import check_model
    from circuitfinder.errors import UserError
    from circuitfinder.engine.graph import EdgeGraph
    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer(Path(tempfile.mkdtemp(prefix="arch-tok-")))
    rows = ["| architecture | Hugging Face class | result | blocks | tested in (working precision) | key/value groups | edges (3 layers, 4 heads) | largest difference / tolerance |",
            "|---|---|---|---|---|---|---|---|"]
    for name in ARCHITECTURES:
        dtype = load_dtype(name)
        model = build(name, dtype=dtype)
        cls = type(model).__name__
        try:
            adapter = ModelAdapter.from_hf(model, tokenizer, name=name, hf_id=name, dtype=dtype)
            worst = check_model(adapter)
        except UserError as refused:
            why = str(refused).split(": ", 1)[-1].replace(" (--skip-model-check runs it anyway)", "")
            rows.append(f"| {name} | `{cls}` | refused: {why} | | | | | |")
            continue
        shape = adapter.shape
        precision = str(dtype).removeprefix("torch.") + f" ({str(adapter.working_dtype).removeprefix('torch.')})"
        experts = getattr(model.config, "num_local_experts", 0)
        rows.append(f"| {name} | `{cls}` | exact | {'parallel' if shape.parallel else 'sequential'}"
                    f"{', post-norm' if shape.post_norm else ''}{f', {experts} experts (one MLP node)' if experts else ''}"
                    f" | {precision} | {shape.n_kv_groups} | {EdgeGraph(shape).n_edges:,} | {worst:.1e} |")
    return "\n".join(rows)


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    text = table()
    print(text)
    if "--readme" in sys.argv:
        readme = ROOT / "RESULTS.md"
        body = readme.read_text()
        if START not in body:
            sys.exit(f"RESULTS.md has no {START} marker")
        body = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{text}\n{END}", body, flags=re.S)
        readme.write_text(body)


if __name__ == "__main__":
    main()
