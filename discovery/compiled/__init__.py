"""The tracr programs compiled to GPT-2 by ``scripts/tracr_compile.py``, shipped as package data:
one folder per program with its float64 safetensors, tokenizer and ``program.json`` (the RASP
program, its vocabulary and tracr's own outputs on every input)."""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def compiled_programs() -> dict[str, Path]:
    """Each shipped program's name (``tracr-<program>``) and folder."""
    return {f"tracr-{p.name}": p for p in sorted(FOLDER.iterdir())
            if (p / "program.json").is_file() and (p / "config.json").is_file()}


def program_data(name: str) -> dict:
    """The ``program.json`` of the program ``name`` (``tracr-<program>``)."""
    return json.loads((FOLDER / name.removeprefix("tracr-") / "program.json").read_text(encoding="utf-8"))
