"""Where tunelab keeps converted models and tokenised datasets: $TUNELAB_CACHE, else
$XDG_CACHE_HOME/tunelab, else ~/.cache/tunelab. Also the file helpers shared by everything that writes folders."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tunelab"


def file_digest(path: Path, h: "hashlib._Hash | None" = None) -> str:
    h = h or hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def umask_permissions(folder: Path) -> None:
    """Give a finished output folder the permissions the process umask asks for, like any other tool's output:
    temporary folders (mkdtemp) are 0700 and some writers (safetensors shards) leave files 0600, which a server
    or container running as another user cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            path.chmod((0o666 | (path.stat().st_mode & 0o111)) & ~mask)  # keeps an executable executable
