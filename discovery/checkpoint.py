"""A long search's progress on disk, so that rerunning the same command resumes it.

A checkpoint lives in ``<output root>/.checkpoints/<key>/``, where the key is a hash of every
setting that decides the result (not of the output folder, whose default name carries the time,
nor of the worker count, which does not change the result). It holds tensors as safetensors
(attribution scores, the start circuit) and the search state as JSON; both are written to a
temporary file and renamed, so a kill leaves the previous complete checkpoint. Nothing is
unpickled. The run deletes its checkpoint once its results are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Checkpoint:
    """The checkpoint of the search decided by ``settings`` (a JSON-able dict)."""

    def __init__(self, root: Path, settings: dict):
        text = json.dumps(settings, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.dir = Path(root) / ".checkpoints" / self.key
        self.settings = settings

    def exists(self) -> bool:
        return (self.dir / "settings.json").is_file()

    def _ensure(self) -> None:
        if not self.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "settings.json", json.dumps(self.settings, indent=1, sort_keys=True) + "\n")

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self._ensure()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.dir)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.dir / f"{name}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.dir / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError):
            return None  # damaged outside our atomic writes (disk, hand edits): redo that phase

    def save_json(self, name: str, data: dict) -> None:
        self._ensure()
        atomic_write_text(self.dir / f"{name}.json", json.dumps(data) + "\n")

    def load_json(self, name: str) -> dict | None:
        path = self.dir / f"{name}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError):
            return None  # cannot happen with atomic writes; start that phase afresh if it does

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
