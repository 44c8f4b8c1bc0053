"""A search in bfloat16 against float32 (issue 18): with the float32 referee, and alone.

Runs the default job (``circuits discover --task ioi``, SmolLM2, ``acdc-groups``) once per
variant, each in a process of its own, one after another: ``float32``, ``bfloat16`` (refereed in
float32, the default for that dtype) and ``bfloat16-alone`` (``--no-referee``). For each it
records the circuit's size and held-out faithfulness (always float32's where the run measures it
in float32), the run's and the search's seconds, the peak memory, what the referee did, and
whether its circuit is float32's edge for edge. ``--tau`` passes ACDC's threshold to every run
(at the default τ bfloat16 cannot settle the removals and a refereed search runs its passes in
float32; at a larger τ they run in bfloat16). ``--include VARIANT=RUN_DIR`` records a run folder
made earlier with the same settings instead of running that variant. Writes
``outputs/benchmarks/referee-TIME.json``.

    .venv/bin/python scripts/measure_referee.py [--tau 0.2] [--variants float32,bfloat16,bfloat16-alone]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "float32": ["--dtype", "float32"],
    "bfloat16": ["--dtype", "bfloat16"],
    "bfloat16-alone": ["--dtype", "bfloat16", "--no-referee"],
}


def record(run_dir: Path, wall: float | None) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    search = summary["search"] or {}
    edges = sorted(
        f"{e['sender']}->{e['receiver']}" for e in json.loads((run_dir / "circuit.json").read_text())["edges"]
    )
    return {
        "edges_kept": summary["edges_kept"],
        "nodes_kept": summary["nodes_kept"],
        "faithfulness_heldout": summary["faithfulness"],
        "faithfulness_dtype": summary["dtype"],
        "tau": search.get("tau"),
        "circuits_evaluated": search.get("circuits_evaluated"),
        "search_s": search.get("seconds"),
        "run_s": summary["seconds"],
        "wall_s": wall,
        "peak_memory_mb": summary["peak_memory_mb"],
        "precision": summary.get("precision"),
        "referee": search.get("referee"),
        "edges": edges,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--include", action="append", default=[], help="VARIANT=RUN_DIR: a run made earlier")
    args = parser.parse_args()
    included = dict(item.split("=", 1) for item in args.include)
    extra = ["--tau", str(args.tau)] if args.tau is not None else []
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variants.split(","):
            if variant in included:
                results[variant] = record(Path(included[variant]), None) | {"measured": f"earlier: {included[variant]}"}
                continue
            out = Path(scratch) / variant
            start = time.perf_counter()
            subprocess.run(
                [
                    str(ROOT / ".venv" / "bin" / "circuits"),
                    "discover",
                    "--task",
                    "ioi",
                    *VARIANTS[variant],
                    *extra,
                    "--out",
                    str(out),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                cwd=scratch,
            )
            results[variant] = record(out, round(time.perf_counter() - start, 1)) | {"measured": "this script"}
            print(variant, {k: v for k, v in results[variant].items() if k != "edges"}, flush=True)
    reference = set(results["float32"]["edges"]) if "float32" in results else None
    for r in results.values():
        r["same_circuit_as_float32"] = None if reference is None else set(r["edges"]) == reference
        r["faithfulness_minus_float32"] = (
            None if reference is None else r["faithfulness_heldout"] - results["float32"]["faithfulness_heldout"]
        )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = ROOT / "outputs" / "benchmarks" / f"referee-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "what": "The default search (SmolLM2 IOI, acdc-groups) in float32, in bfloat16 refereed in float32, "
                "and in bfloat16 alone; each in a process of its own, one after another",
                "date": stamp,
                "tau": args.tau,
                "runs": results,
            },
            indent=1,
        )
        + "\n"
    )
    for name, r in results.items():
        print(
            f"{name:<15} {r['edges_kept']:>4} edges  faithfulness {r['faithfulness_heldout']:.4f} "
            f"({r['faithfulness_dtype']})  same as float32: {r['same_circuit_as_float32']}  run {r['run_s']:.0f} s  "
            f"peak {r['peak_memory_mb']:.0f} MB"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
