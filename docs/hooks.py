"""MkDocs hooks for this site (mkdocs.yml loads them; not part of the package).

The example runs and benchmark files live in the repository's ``outputs/`` folder, outside
``docs/``. This hook adds them to the site under the same paths (``outputs/examples/...``,
``outputs/benchmarks/...``), so the pages can show the example diagrams and screenshots and
link to the explorer pages and JSON files, and ``mkdocs build --strict`` checks those links.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

# Markdown files under outputs/ are tables written by the tools, not pages of this site.
KINDS = {".png", ".svg", ".pdf", ".html", ".json", ".csv", ".js", ".css"}


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).resolve().parent
    for folder in ("outputs/examples", "outputs/benchmarks"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in KINDS:
                files.append(File(path.relative_to(root).as_posix(), src_dir=str(root),
                                  dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    return files
