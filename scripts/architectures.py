"""Write the tables of architectures in docs/architectures.md from the test matrix (tests/architectures.py).

Each tiny model of the matrix is wrapped and put through the check at load (circuitfinder.engine.checks),
the same check the tests run; the detailed table says which are exact (and in which working
precision) and which are refused, with the refusal's own words; the short table above it lists
the families by result. Run it after changing the matrix or the engine:

    .venv/bin/python scripts/architectures.py            # print the tables
    .venv/bin/python scripts/architectures.py --readme   # and replace them in docs/architectures.md
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
SHORT_START, SHORT_END = (
    "<!-- architectures summary: start (scripts/architectures.py) -->",
    "<!-- architectures summary: end -->",
)
PAGE = "docs/architectures.md"


def table() -> tuple[str, str]:
    """The detailed table and the short one (both in docs/architectures.md)."""
    from architectures import ARCHITECTURES, build, load_dtype
    from tiny_models import tiny_tokenizer

    from circuitfinder.engine.adapter import ModelAdapter
    from circuitfinder.engine.checks import check_model
    from circuitfinder.engine.graph import EdgeGraph
    from circuitfinder.errors import UserError

    tokenizer = tiny_tokenizer(Path(tempfile.mkdtemp(prefix="arch-tok-")))
    groups: dict[str, list[str]] = {}
    rows = [
        "| architecture | Hugging Face class | result | blocks | tested in (working precision) | key/value groups "
        "| edges (3 layers, 4 heads) | largest difference / tolerance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ARCHITECTURES:
        dtype = load_dtype(name)
        model = build(name, dtype=dtype)
        cls = type(model).__name__
        try:
            adapter = ModelAdapter.from_hf(model, tokenizer, name=name, hf_id=name, dtype=dtype)
            worst = check_model(adapter)
        except UserError as refused:
            why = str(refused).split(": ", 1)[-1].replace(" (`check_model=False` runs it anyway)", "")
            rows.append(f"| {name} | `{cls}` | refused: {why} | | | | | |")
            groups.setdefault("refused: " + _cause(why), []).append(name)
            continue
        shape = adapter.shape
        precision = str(dtype).removeprefix("torch.") + f" ({str(adapter.working_dtype).removeprefix('torch.')})"
        experts = getattr(model.config, "num_local_experts", 0)
        rows.append(
            f"| {name} | `{cls}` | exact | {'parallel' if shape.parallel else 'sequential'}"
            f"{', post-norm' if shape.post_norm else ''}{f', {experts} experts (one MLP node)' if experts else ''}"
            f" | {precision} | {shape.n_kv_groups} | {EdgeGraph(shape).n_edges:,} | {worst:.1e} |"
        )
        groups.setdefault(f"exact, {'parallel' if shape.parallel else 'sequential'} blocks", []).append(name)
    short = ["| result | families |", "|---|---|"]
    short += [
        f"| {result} ({len(names)}) | {', '.join(names)} |"
        for result, names in sorted(groups.items(), key=lambda kv: (not kv[0].startswith("exact"), kv[0]))
    ]
    return "\n".join(rows), "\n".join(short)


CAUSES = (
    ("no attention heads", "blocks without attention heads (state-space, recurrent, hybrid)"),
    ("not the sum", "residual stream not a sum of head and MLP outputs"),
    ("do not act as", "the bridge's q/k/v inputs do not act as the model's"),
    ("query/key/value", "no per-head query/key/value inputs"),
    ("post-norm", "post-norm blocks"),
    ("fails in", "no kernel in float64"),
    ("applied repeatedly", "layers run several times per pass"),
    ("embed_positions", "its TransformerLens adapter needs a rotary table this transformers version moved"),
    ("normalises both", "one norm read before and after the layers"),
    ("new decoder architecture", "a fused grouped q/k/v layout TransformerLens splits wrongly"),
    ("never fires", "q/k/v inputs the bridge's attention does not read"),
)


def _cause(why: str) -> str:
    """A refusal's cause in a few words, for the short table."""
    return next((short for phrase, short in CAUSES if phrase in why), why.split(": ", 1)[-1].split(";")[0][:80])


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    detailed, short = table()
    print(detailed, short, sep="\n\n")
    if "--readme" in sys.argv:
        path = ROOT / PAGE
        body = path.read_text()
        for start, end, text in ((START, END, detailed), (SHORT_START, SHORT_END, short)):
            if start not in body:
                sys.exit(f"{PAGE} has no {start} marker")
            body = re.sub(
                re.escape(start) + ".*?" + re.escape(end), lambda _m: f"{start}\n{text}\n{end}", body, flags=re.S
            )
        path.write_text(body)


if __name__ == "__main__":
    main()
