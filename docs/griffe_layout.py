"""A Griffe extension for this site's API pages (mkdocs.yml loads it; not part of the package).

The package ``circuitfinder`` is installed from three folders: ``discovery/`` is the package
itself and ``tasks/`` and ``graphs/`` are its subpackages ``circuitfinder.tasks`` and
``circuitfinder.graphs`` (pyproject.toml's ``package-dir``). Griffe reads a package from one
folder, so it would find neither subpackage. This extension loads each subpackage that the
installed package maps to a folder of its own and attaches it to ``circuitfinder``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import griffe

PACKAGE = "circuitfinder"


class SubpackageFolders(griffe.Extension):
    """Attach ``circuitfinder``'s subpackages that live outside its own folder."""

    def on_module_members(self, *, mod: griffe.Module, agent=None, **kwargs) -> None:
        if mod.path != PACKAGE:
            return
        # the subpackages' docstrings are parsed as the site asks for the package's own
        parsing = {"docstring_parser": getattr(agent, "docstring_parser", None),
                   "docstring_options": getattr(agent, "docstring_options", None)}
        root = Path(next(iter(importlib.util.find_spec(PACKAGE).submodule_search_locations)))
        for name in ("tasks", "graphs"):
            sub = importlib.util.find_spec(f"{PACKAGE}.{name}")
            folder = Path(next(iter(sub.submodule_search_locations)))
            if folder.parent == root:  # an ordinary subpackage: Griffe finds it
                continue
            loaded = griffe.GriffeLoader(**parsing).load(folder)
            mod.set_member(name, loaded)
