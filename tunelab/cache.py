"""Where tunelab keeps converted models and tokenised datasets: $TUNELAB_CACHE, else
$XDG_CACHE_HOME/tunelab, else ~/.cache/tunelab."""

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
