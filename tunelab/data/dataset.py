"""A config's datasets -> packed, tokenised rows: the assembly of the data path.

The flow: sources (sources.py: records with their location, file:line) -> Conversation/Document (formats.py) ->
text segments (templates.py) -> tokens and labels (encode.py) -> rows (pack.py), mixed by the datasets' weights.
The rows are cached as Arrow (cache.py) under a key of everything that changes them. A bad record stops the
run naming its file and line, unless data.skip_bad_records (counted, and listed by check-dataset).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab import ui
from tunelab.cache import cache_root
from tunelab.config.schema import DataSettings
from tunelab.data.cache import cache_key, load_rows, save_rows
from tunelab.data.encode import Encoded, encode_samples, render, shifted_labels, split_document
from tunelab.data.formats import Conversation, Document, RecordError, Sample, format_mismatch, source_format, \
    to_sample
from tunelab.data.pack import Rows, pack_samples
from tunelab.data.sources import Dataset, read_source, resolve_datasets
from tunelab.data.templates import get_template
from tunelab.errors import DataError

CHUNK = 4096  # samples tokenised per batch (bounds memory, drives the progress bar)
MAX_LISTED_BAD = 1000
MAX_LISTED_TRUNCATED = 3
SKIP_HINT = "set data.skip_bad_records: true to skip bad records"


@dataclass
class BadRecord:
    where: str
    reason: str


@dataclass
class DataStats:
    records: int = 0
    samples: int = 0
    bad: int = 0
    dropped: int = 0  # records with nothing to learn (e.g. alpaca <nooutput>, no loss tokens left)
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    rows: int = 0
    max_length: int = 0
    seconds: float = 0.0
    formats: dict[str, str] = field(default_factory=dict)
    bad_records: list[BadRecord] = field(default_factory=list)
    truncated_at: list[str] = field(default_factory=list)  # the first few truncated samples' locations

    @property
    def loss_share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0


@dataclass
class PreparedData:
    rows: Rows
    stats: DataStats
    from_cache: bool
    cache_dir: Path | None

    def summary(self) -> dict:
        """What `tunelab data prepare` prints."""
        s = self.stats
        return {"rows": s.rows, "samples": s.samples, "tokens": s.tokens, "seconds": round(s.seconds, 3),
                "tokens_per_s": round(s.tokens / s.seconds) if s.seconds else None, "from_cache": self.from_cache,
                "cache": str(self.cache_dir)}


# ---------------------------------------------------------------------------------------------- converting


def read_samples(ds: Dataset, stats: DataStats, skip_bad: bool, collect_all: bool = False
                 ) -> tuple[list[Sample], list[str]]:
    """Samples of one dataset with their locations. A bad record raises DataError naming file and line,
    unless skip_bad (count and go on) or collect_all (record every one, for check-dataset)."""
    samples: list[Sample] = []
    where_list: list[str] = []
    for source in ds.sources:
        try:
            if _read_source_samples(source, ds, stats, skip_bad or collect_all, samples, where_list):
                break
        except DataError as e:
            # A file that cannot be read to the end (not UTF-8, broken JSON array) is one bad record, so the
            # other files are still read (and, for check-dataset, their bad records listed).
            if not (skip_bad or collect_all):
                raise
            _add_bad(stats, _file_error(source, str(e)))
    return samples, where_list


def _read_source_samples(source: str, ds: Dataset, stats: DataStats, skip_bad: bool, samples: list[Sample],
                         where_list: list[str]) -> bool:
    """Append one source's samples; True once the dataset's max_samples is reached."""
    spec = ds.spec
    fmt = spec.format if spec.format != "auto" else None
    for where, rec in read_source(source, spec.split, spec.text_documents == "paragraph"):
        stats.records += 1
        try:
            if isinstance(rec, RecordError):
                raise rec
            if fmt is None:
                # An unrecognisable record is a bad record like any other: with skip_bad the next one is tried.
                fmt = source_format(source, rec, "set data.format")
                stats.formats[source] = fmt
                ui.info(f"data: {source}: detected format '{fmt}'")
            sample = to_sample(rec, fmt)
        except RecordError as e:
            mismatch = format_mismatch(rec, fmt, ds.format_key) if spec.format != "auto" else None
            reason = f"{e}; {mismatch}" if mismatch else str(e)
            if not skip_bad:
                raise DataError(f"{where}: {reason}" + ("" if mismatch else f" ({SKIP_HINT})")) from None
            _add_bad(stats, BadRecord(where, reason))
            continue
        stats.formats.setdefault(source, fmt)
        if sample is None:
            stats.dropped += 1
            continue
        samples.append(sample)
        where_list.append(where)
        if spec.max_samples and len(samples) >= spec.max_samples:
            return True
    return False


def _add_bad(stats: DataStats, bad: BadRecord) -> None:
    stats.bad += 1
    if len(stats.bad_records) < MAX_LISTED_BAD:
        stats.bad_records.append(bad)


def _file_error(source: str, message: str) -> BadRecord:
    """A file-level DataError ("path:line: reason" or "path: reason") as a bad record of that file."""
    m = re.match(rf"{re.escape(source)}(:\d+)?: (.*)", message, re.S)
    if m:
        return BadRecord(source + (m.group(1) or ""), m.group(2))
    return BadRecord(source, message)


@dataclass
class EncodedDataset:
    """Samples after tokenisation, before packing (what check-dataset and log-dataset look at)."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    where: list[str]
    dataset_index: list[int]


def encode_dataset(data: DataSettings, tokenizer: Any, stats: DataStats, collect_all: bool = False,
                   datasets: list[Dataset] | None = None) -> EncodedDataset:
    """Every dataset's samples, tokenised (`datasets`: data's, already resolved)."""
    out = EncodedDataset([], [], [], [])
    for di, ds in enumerate(resolve_datasets(data) if datasets is None else datasets):
        samples, wheres = read_samples(ds, stats, data.skip_bad_records, collect_all)
        spec = ds.spec
        renderer = None  # made on the first conversation: pre-training text needs no (chat) template
        with ui.progress(len(samples), f"tokenising {Path(str(spec.path)).name}") as advance:
            for start in range(0, len(samples), CHUNK):
                chunk = samples[start:start + CHUNK]
                segs = []
                keep = []
                for s, w in zip(chunk, wheres[start:start + CHUNK]):
                    if renderer is None and isinstance(s, Conversation):
                        renderer = get_template(spec.prompt_template, tokenizer)
                    try:
                        segs.append(render(s, renderer, spec.system))
                        keep.append((s, w))
                    except RecordError as e:
                        if not (data.skip_bad_records or collect_all):
                            raise DataError(f"{w}: {e} ({SKIP_HINT})") from None
                        _add_bad(stats, BadRecord(w, str(e)))
                encoded = encode_samples([s for s, _ in keep], segs, tokenizer)
                for (s, w), enc in zip(keep, encoded):
                    _add_sample(out, enc, s, w, di, data.max_length, stats)
                advance(len(chunk))
    return out


def _add_sample(out: EncodedDataset, enc: Encoded, sample: Sample, where: str, di: int, max_length: int,
                stats: DataStats) -> None:
    pieces = [enc]
    if isinstance(sample, Document):
        pieces = split_document(enc, max_length)
    elif len(enc.input_ids) > max_length:
        stats.truncated += 1
        if len(stats.truncated_at) < MAX_LISTED_TRUNCATED:
            stats.truncated_at.append(where)
        pieces = [Encoded(enc.input_ids[:max_length], enc.loss_mask[:max_length])]
    for piece in pieces:
        labels = shifted_labels(piece)
        n_loss = int(np.count_nonzero(labels != -100))
        if n_loss == 0:
            stats.dropped += 1
            continue
        out.input_ids.append(piece.input_ids)
        out.labels.append(labels)
        out.where.append(where)
        out.dataset_index.append(di)
        stats.samples += 1
        stats.tokens += len(piece.input_ids)
        stats.loss_tokens += n_loss


def mix_order(mix: str, datasets: list[Dataset], dataset_index: list[int], seed: int) -> list[int]:
    """Sample indices for one pass: every sample once (concat), or datasets in proportion to their weights."""
    n = len(dataset_index)
    if mix == "concat" or len(datasets) == 1:
        return list(range(n))
    specs = [ds.spec for ds in datasets]
    by_ds: dict[int, list[int]] = {}
    for i, d in enumerate(dataset_index):
        by_ds.setdefault(d, []).append(i)
    total_w = sum(s.weight for s in specs)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for d, spec in enumerate(specs):
        members = by_ds.get(d, [])
        if not members:
            continue
        want = max(1, round(n * spec.weight / total_w))
        reps, rest = divmod(want, len(members))
        order.extend(members * reps)
        order.extend(rng.choice(members, size=rest, replace=False).tolist())
    return order


# ---------------------------------------------------------------------------------------------- entry point


def prepare_data(data: DataSettings, tokenizer: Any, seed: int = 0, use_cache: bool | None = None
                 ) -> PreparedData:
    """Tokenised, packed rows for a config's data section, from the cache when nothing changed."""
    t0 = time.perf_counter()
    datasets = resolve_datasets(data)
    use_cache = data.cache if use_cache is None else use_cache
    folder = None
    if use_cache:
        folder = cache_root() / "data" / cache_key(data, datasets, tokenizer, seed)
        cached = load_rows(folder)
        if cached is not None:
            rows, stats = cached[0], _stats_from_json(cached[1])
            stats.seconds = time.perf_counter() - t0  # this load's time, not the run that filled the cache
            ui.info(f"data: {stats.samples} samples -> {len(rows)} rows from cache {folder} "
                    f"({stats.seconds:.2f} s)")
            return PreparedData(rows, stats, True, folder)
    stats = DataStats(max_length=data.max_length)
    enc = encode_dataset(data, tokenizer, stats, datasets=datasets)
    if not enc.input_ids:
        paths = ", ".join(str(ds.spec.path) for ds in datasets)
        first = f"; first bad: {stats.bad_records[0].where}: {stats.bad_records[0].reason}" if stats.bad_records else ""
        raise DataError(f"no training samples in {paths} ({stats.records} records read, {stats.bad} bad, "
                        f"{stats.dropped} with nothing to learn{first})")
    order = mix_order(data.mix, datasets, enc.dataset_index, seed)
    rows = pack_samples([enc.input_ids[i] for i in order], [enc.labels[i] for i in order], data.max_length,
                        data.pack_to_max_length)
    stats.rows = len(rows)
    stats.seconds = time.perf_counter() - t0
    report(stats)
    if folder is not None:
        save_rows(rows, _stats_json(stats), folder)
    return PreparedData(rows, stats, False, folder)


def _stats_json(stats: DataStats) -> dict:
    d = asdict(stats)
    d["bad_records"] = d["bad_records"][:100]
    return d


def _stats_from_json(raw: dict) -> DataStats:
    return DataStats(**{**raw, "bad_records": [BadRecord(**b) for b in raw.get("bad_records", [])]})


def report(stats: DataStats) -> None:
    tps = stats.tokens / stats.seconds if stats.seconds else 0.0
    ui.info(f"data: {stats.records} records -> {stats.samples} samples -> {stats.rows} rows of <= "
            f"{stats.max_length} tokens; {stats.tokens:,} tokens, {stats.loss_share:.0%} in the loss; "
            f"{stats.seconds:.2f} s ({tps:,.0f} tokens/s)")
    if stats.bad:
        ui.warn("bad_records", f"skipped {stats.bad} bad records (first: {stats.bad_records[0].where}: "
                               f"{stats.bad_records[0].reason})")
    if stats.truncated:
        where = ", ".join(stats.truncated_at) + (", ..." if stats.truncated > len(stats.truncated_at) else "")
        ui.warn("truncated", f"{stats.truncated} samples were longer than max_length={stats.max_length} "
                             f"and were truncated (first: {where})")
    if stats.dropped:
        ui.warn("dropped", f"{stats.dropped} samples had no tokens to learn from and were dropped")
