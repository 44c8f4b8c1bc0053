"""The README's ground-truth table: every method on every compiled tracr program, graded against
the program's true circuit (``graphs/references/tracr-*.json``; issue 20).

Each cell is one run as a user would start it (``circuits discover --task tracr-P --model
tracr-P --method M``; 32 pairs, float64, counterfactual patching, the check at load on), graded by
``circuits grade --reference tracr-P``: edge and node ROC-AUC (ranking by the run's scores; a
search without scores of its own is graded by its circuit alone), precision, recall, the circuit's
size and its held-out faithfulness. Each run is graded twice: against the true circuit (the
edges that carry the input) and against every edge the weights connect (``tracr-P-weights``,
position-fixed attention patterns included: the kind of reference ACDC's published figures use).
ACDC is run as Conmy et al. ran it, over the whole graph (``--seed-method none``), and seeded by
EAP-IG as the product runs it.

Writes ``outputs/benchmarks/tracr-table-TIME.json`` and prints the Markdown table.

    .venv/bin/python scripts/measure_tracr_table.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

METHODS = {  # label: DiscoverConfig settings
    "EAP": {"method": "eap"},
    "EAP-IG": {"method": "eap-ig"},
    "ACDC (whole graph)": {"method": "acdc", "seed_method": "none"},
    "ACDC (seeded by EAP-IG)": {"method": "acdc"},
    "minimize": {"method": "minimize"},
    "acdc-groups (the default)": {"method": "acdc-groups"},
}


def measure(program: str, settings: dict, scratch: Path) -> dict:
    from circuitfinder.config import DiscoverConfig
    from circuitfinder.graphs.grading import grade_circuit
    from circuitfinder.runs.run import run_config

    config = DiscoverConfig.from_options(
        task=program,
        model=program,
        n_pairs=32,
        batch_size=16,
        dtype="float64",
        roles=False,
        search_prompts=16,
        **settings,
    )
    start = time.perf_counter()
    run = run_config(config, out=scratch / f"{program}-{settings['method']}-{settings.get('seed_method', '')}")
    seconds = time.perf_counter() - start
    row = {
        "program": program,
        **settings,
        "seconds": round(seconds, 2),
        "edges": run.summary.edges_kept,
        "faithfulness_heldout": run.summary.faithfulness,
    }
    for reference, prefix in ((program, ""), (f"{program}-weights", "weights_")):
        graded = grade_circuit(run.circuit, reference)
        row |= {
            f"{prefix}{level}_{k}": graded[level].get(k)
            for level in ("edges", "nodes")
            for k in ("roc_auc", "precision", "recall")
        }
    return row


def main() -> None:
    from circuitfinder.compiled import compiled_programs

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for program in compiled_programs():
            for label, settings in METHODS.items():
                row = {"label": label} | measure(program, settings, Path(scratch))
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = ROOT / "outputs" / "benchmarks" / f"tracr-table-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "rows": rows}, indent=2) + "\n")
    print(f"\nwritten {out.relative_to(ROOT)}\n")
    print_table(rows, "")
    print("\nAgainst every edge the weights connect (edge / node ROC-AUC, precision, recall):\n")
    print_table(rows, "weights_")


def print_table(rows: list[dict], prefix: str) -> None:
    """A Markdown table, a method per row and a program per column, of the grades named ``prefix…``."""
    from circuitfinder.compiled import compiled_programs

    programs = list(compiled_programs())
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    print("| method | " + " | ".join(p.removeprefix("tracr-") for p in programs) + " |")
    print("|---" * (len(programs) + 1) + "|")
    for label in METHODS:
        cells = []
        for p in programs:
            r = next(r for r in rows if r["label"] == label and r["program"] == p)
            cell = (
                f"{fmt(r[prefix + 'edges_roc_auc'])} / {fmt(r[prefix + 'nodes_roc_auc'])} "
                f"(P {r[prefix + 'edges_precision']:.2f}, R {r[prefix + 'edges_recall']:.2f}"
            )
            cells.append(cell + (f"; {r['edges']} edges, F {r['faithfulness_heldout']:.3f})" if not prefix else ")"))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
