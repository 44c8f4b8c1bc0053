"""MkDocs hooks for this site (mkdocs.yml loads them; not part of the package).

* The example runs and benchmark files live in the repository's ``outputs/`` folder, outside
  ``docs/``. :func:`on_files` adds them to the site under the same paths (``outputs/examples/...``,
  ``outputs/benchmarks/...``), so the pages can show the example diagrams and screenshots and
  link to the explorer pages and JSON files, and ``mkdocs build --strict`` checks those links.
* Tables the code already holds are rendered from it, not copied: a page line
  ``<!-- generated: NAME -->`` becomes the table :data:`GENERATED` makes for ``NAME`` (the run
  folder's files from ``RUN_FILES``, the configuration's fields from ``DiscoverConfig``, the
  sections each method reads from ``METHODS``). An unknown name is a warning, so ``--strict``
  fails on it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger(f"mkdocs.plugins.{__name__}")

# Markdown files under outputs/ are tables written by the tools, not pages of this site.
KINDS = {".png", ".svg", ".pdf", ".html", ".json", ".csv", ".js", ".css"}
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).resolve().parent
    for folder in ("outputs/examples", "outputs/benchmarks"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in KINDS:
                files.append(File(path.relative_to(root).as_posix(), src_dir=str(root),
                                  dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    def render(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATED:
            log.warning(f"{page.file.src_uri}: no generated table {name!r} (known: {', '.join(GENERATED)})")
            return match.group(0)
        return GENERATED[name]()

    return MARKER.sub(render, markdown)


def _cell(text: str) -> str:
    """Text fit for one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def run_files() -> str:
    """The run folder's files: ``circuitfinder.runs.run.RUN_FILES``, in the order written."""
    from circuitfinder.runs.run import RUN_FILES

    rows = [f"| `{f.name}` | {_cell(f.holds)} |" for f in RUN_FILES]
    return "\n".join(["| file | holds |", "|---|---|", *rows])


def config_fields() -> str:
    """Every field of ``DiscoverConfig``, by section: keyword, flag, default and help."""
    from circuitfinder.config import SECTIONS, DiscoverConfig, flat_fields

    owners = {None: DiscoverConfig, **SECTIONS}
    by_section: dict[str | None, list[dataclasses.Field]] = {}
    for _name, (section, f) in flat_fields().items():
        by_section.setdefault(section, []).append(f)
    out = []
    for section, fields in by_section.items():
        owner = owners[section]
        kinds = typing.get_type_hints(owner)
        if section is None:
            out += ["### Task, model and method", "", "At the top level of `DiscoverConfig`.", ""]
        else:
            doc = " ".join((owner.__doc__ or "").split())
            out += [f"### `{section}`: {owner.title}", "", f"`{owner.__name__}`: {doc}", ""]
        out += ["| keyword | flag | default | what it sets |", "|---|---|---|---|"]
        for f in fields:
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            if kinds[f.name] in (bool, typing.Optional[bool]):
                flag = f"{flag}/--no-{flag[2:]}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `{f.name}` | `{flag}` | `{default!r}` | {_cell(f.metadata['help'])} |")
        out.append("")
    return "\n".join(out)


def method_sections() -> str:
    """The sections of the configuration each method reads (``Method.sections``)."""
    from circuitfinder.methods.registry import METHODS

    rows = [f"| `{name}` | {', '.join(f'`{s}`' for s in m.sections)} |" for name, m in METHODS.items()]
    return "\n".join(["| method | sections it reads |", "|---|---|", *rows])


GENERATED = {"run-files": run_files, "config-fields": config_fields, "method-sections": method_sections}
