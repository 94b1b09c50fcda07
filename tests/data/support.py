"""Helpers for the data tests: a data section for one path, and one file read through the training reader."""

from __future__ import annotations

from tunelab.config.schema import DataSettings
from tunelab.data.dataset import DataStats, read_samples
from tunelab.data.sources import resolve_datasets


def settings(path, **kw) -> DataSettings:
    return DataSettings(path=str(path), max_length=kw.pop("max_length", 64), **kw)


def read(path, **kw):
    """(samples, locations, stats) of one file through the training reader."""
    stats = DataStats()
    samples, wheres = read_samples(resolve_datasets(settings(path, **kw))[0], stats, kw.get("skip_bad_records", False))
    return samples, wheres, stats
