"""The published circuits as data: one JSON file each (schema ``circuits/reference``).

Read with :func:`circuitfinder.graphs.reference.load_reference`; the format and the sources are described in
``graphs/reference.py``. This module only finds and reads the files (no torch, so that the
command line can list them quickly).
"""

from __future__ import annotations

import json
from importlib import resources

from circuitfinder.errors import UserError


def available() -> list[str]:
    """Names of the shipped references."""
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def read(name: str) -> dict:
    """The JSON data of the reference ``name``; a UserError listing the available ones if there is none."""
    names = available()
    if name not in names:
        raise UserError(f"unknown reference {name!r}; available: {', '.join(names)}")
    return json.loads((resources.files(__name__) / f"{name}.json").read_text(encoding="utf-8"))
