"""Errors a user can fix. The CLI prints their message on one line, without a traceback, and exits 1."""

from __future__ import annotations

import re


class TunelabError(Exception):
    """Base class: the message names the thing at fault (file, line, key) and, where possible, the fix."""

    exit_code = 1


class ConfigError(TunelabError):
    """A config file or override is wrong: unknown key, wrong type, impossible value."""


class DataError(TunelabError):
    """A data file or record is wrong: missing file, malformed JSON, bad schema, empty dataset."""


class ModelError(TunelabError):
    """A model or adapter cannot be loaded or does not fit: missing folder, no weights, shape mismatch."""


class CheckpointError(TunelabError):
    """A checkpoint is missing, incomplete, or belongs to a different run."""


class TrainingError(TunelabError):
    """Training cannot go on: repeated non-finite loss, disk full while saving."""


class OutputExistsError(TunelabError):
    """Refusing to write into a folder that already holds results."""


class Interrupted(TunelabError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def missing_module_message(e: ModuleNotFoundError) -> str:
    """One line for a Python package that is not installed: the pip command that installs it, pinned to the
    version tunelab requires when it is one of tunelab's dependencies."""
    from importlib import metadata

    module = (e.name or "").split(".")[0]
    wanted = {"yaml": "pyyaml", "sklearn": "scikit-learn"}.get(module, module).replace("_", "-").lower()
    try:
        requirements = metadata.requires("tunelab") or []
    except metadata.PackageNotFoundError:
        requirements = []
    spec = next((r.split(";")[0].strip() for r in requirements
                 if re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].replace("_", "-").lower() == wanted), wanted)
    return f"the Python package '{module}' is not installed; install it with: pip install '{spec}'"
