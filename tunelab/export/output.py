"""Output folders are built beside their final place and renamed in at the end, so a failed export leaves
nothing half-written, and an existing non-empty folder is never overwritten unless asked. The finished folder
gets the permissions the process umask gives (not mkdtemp's 0700)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tunelab.cache import umask_permissions
from tunelab.errors import OutputExistsError


def check_output(out: Path, overwrite: bool = False) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; choose another "
                                "or pass --overwrite")


@contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed."""
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask_permissions(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
