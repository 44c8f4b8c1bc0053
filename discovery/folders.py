"""Result folders that appear whole or not at all.

A run writes into a hidden temporary folder next to ``--out`` (``.NAME.partial-PID@HOST-XXXX``)
and renames it to ``--out`` only when every file is written, so an interrupted or failed run
never leaves half-written results and never touches an earlier run's folder unless asked to
(``overwrite``). Temporary folders left by a killed process on this machine are removed by the
next run that writes to the same ``--out``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from circuitfinder.errors import OutputExists


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file or a non-empty folder unless ``overwrite``."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExists(f"{out} already holds results: choose another `out`, or pass `overwrite=True`")


def make_readable(folder: Path) -> None:
    """Temporary files and folders are private (0600/0700); results are for everyone to read."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete ``out``'s temporary folders whose process, on this machine, has ended."""
    prefix, host, removed = f".{out.name}.partial-", socket.gethostname(), []
    if not out.parent.is_dir():
        return removed
    for folder in out.parent.glob(f"{prefix}*@*"):
        pid, _, rest = folder.name[len(prefix) :].partition("@")
        if pid.isdigit() and rest.rsplit("-", 1)[0] == host and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder that becomes ``out`` (readable by all) only if the block finishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}@{socket.gethostname()}-", dir=out.parent))
    try:
        yield tmp
        make_readable(tmp)
        check_out_dir(out, overwrite)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
