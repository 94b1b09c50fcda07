"""A config's datasets -> packed, tokenised rows, cached as Arrow.

The flow: files (json, jsonl, parquet, csv, txt, folders, hub ids, save_to_disk folders) -> records with their
location (file:line) -> Conversation/Document (formats.py) -> text segments (templates.py) -> tokens and labels
(encode.py) -> rows (pack.py). The result is cached under a key made of everything that changes it (file
contents, tokenizer, templates, max_length, packing), so a second run loads it memory-mapped in well under a
second, and any change misses the cache.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tunelab import ui
from tunelab.cache import cache_root, file_digest
from tunelab.config.load import HUB_ID
from tunelab.config.schema import DataSettings, DatasetSpec
from tunelab.data.encode import Encoded, encode_samples, render, shifted_labels, split_document
from tunelab.data.formats import Conversation, Document, RecordError, Sample, format_mismatch, source_format, \
    to_sample
from tunelab.data.pack import Rows, pack_samples
from tunelab.data.templates import get_template
from tunelab.errors import DataError

PIPELINE_VERSION = 4  # bump when rows for the same inputs would change
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
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


# ---------------------------------------------------------------------------------------------- reading


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists())


def _visible_files(folder: Path) -> list[Path]:
    """Files under a folder, skipping hidden files and folders (.ipynb_checkpoints, .git, editor backups)."""
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def list_sources(path: str | list[str]) -> list[str]:
    """Expand a data path into its sources: files, saved datasets, hub ids."""
    paths = path if isinstance(path, list) else [path]
    out: list[str] = []
    for p in paths:
        local = Path(p)
        if _is_saved_dataset(local):
            out.append(str(local))
        elif local.is_dir():
            files = [f for f in _visible_files(local) if f.suffix.lower() in SUFFIXES]
            if not files:
                raise DataError(f"no data files ({', '.join(SUFFIXES)}) in folder {local}")
            out.extend(str(f) for f in files)
        elif local.is_file():
            if local.suffix.lower() not in SUFFIXES:
                raise DataError(f"{local}: unsupported file type '{local.suffix}' (use {', '.join(SUFFIXES)})")
            out.append(str(local))
        elif HUB_ID.match(p) and not local.is_absolute():
            out.append(p)
        else:
            raise DataError(f"data file not found: {p}")
    return out


def read_source(source: str, split: str = "train", text_blocks: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (location, record or RecordError) for every record of one source."""
    p = Path(source)
    if _is_saved_dataset(p):
        yield from _read_hf(source, split, saved=True)
    elif not p.exists():
        yield from _read_hf(source, split, saved=False)
    elif p.suffix.lower() == ".jsonl":
        yield from _read_jsonl(p)
    elif p.suffix.lower() == ".json":
        yield from _read_json(p)
    elif p.suffix.lower() == ".txt":
        yield from _read_txt(p, text_blocks)
    elif p.suffix.lower() == ".csv":
        yield from _read_csv(p)
    else:
        yield from _read_table(p)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM (Windows editors) is not data
            except UnicodeDecodeError as e:
                yield where, RecordError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            line = line.rstrip("\r\n")  # so an error at the end of the line gets this line's column
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec = RecordError(f"malformed JSON ({e.msg}, column {e.colno})")
            except (ValueError, RecursionError) as e:  # a number over 4300 digits; nesting deeper than the stack
                rec = RecordError(f"unreadable JSON ({_json_limit(e)})")
            yield where, rec


def _json_limit(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0]


def _decode_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array of records, parsed element by element so every record keeps its line number."""
    text = _decode_file(path)
    dec = json.JSONDecoder()
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(0)
    if i >= n:
        raise DataError(f"{path}: empty file")
    if text[i] != "[":
        start = text.count("\n", 0, i) + 1
        if text[i] == "{":  # a single record
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}:{start}: unreadable JSON ({_json_limit(e)})") from None
            yield f"{path}:{start}", rec
            return
        raise DataError(f"{path}:{start}: expected a JSON array of records")
    i, line, last = skip(i + 1), 1, 0
    while i < n and text[i] != "]":
        line += text.count("\n", last, i)
        last = i
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{line}: unreadable JSON ({_json_limit(e)})") from None
        yield f"{path}:{line}", obj
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
        elif i < n and text[i] != "]":
            ln = text.count("\n", 0, i) + 1
            raise DataError(f"{path}:{ln}: malformed JSON (expected ',' or ']' between records)")
    if i >= n:
        raise DataError(f"{path}:{text.count(chr(10)) + 1}: malformed JSON (the array is not closed)")
    i = skip(i + 1)
    if i < n:  # a second array or garbage would otherwise be silently ignored
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: unexpected data after the JSON array")


def _read_txt(path: Path, blocks: bool) -> Iterator[tuple[str, Any]]:
    text = _decode_file(path)
    if not blocks:
        if text.strip():
            yield f"{path}:1", {"text": text}
        return
    line, start = 1, 1
    buf: list[str] = []
    for raw in text.split("\n"):
        raw = raw.removesuffix("\r")  # CRLF files: "\r" is not part of the text
        if raw.strip():
            if not buf:
                start = line
            buf.append(raw)
        elif buf:
            yield f"{path}:{start}", {"text": "\n".join(buf)}
            buf = []
        line += 1
    if buf:
        yield f"{path}:{start}", {"text": "\n".join(buf)}


_JSON_COLUMNS = ("messages", "conversation", "conversations")
_NEWLINES = ("\n", "\r\n", "\r")


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """CSV with the stdlib reader: every cell stays a string ("" when empty) instead of being type-guessed
    (an all-numbers answer column is still text), and each record is located at its first physical line,
    also after a quoted cell that spans lines."""
    # Training text in one cell can exceed the csv module's default limit of 128 KiB.
    csv.field_size_limit(2**31 - 1)
    lines = list(io.StringIO(_decode_file(path), newline=""))
    reader = csv.DictReader(iter(lines), restval="")
    try:
        if reader.fieldnames is None:  # an empty file
            return
        if not reader.fieldnames:
            raise DataError(f"{path}:1: the first line must be the header row (column names)")
        while True:
            start = reader.line_num + 1
            try:
                rec = next(reader)
            except StopIteration:
                return
            while start < reader.line_num and lines[start - 1] in _NEWLINES:
                start += 1  # blank lines the reader skipped
            yield f"{path}:{start}", _csv_record(rec, len(reader.fieldnames))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: cannot read csv ({e})") from None


def _csv_record(rec: dict, columns: int) -> dict | RecordError:
    if None in rec:  # DictReader puts cells beyond the header under the key None
        return RecordError(f"{columns + len(rec[None])} cells, but the header has {columns} columns")
    return _parse_json_columns(rec)


def _parse_json_columns(rec: dict) -> dict | RecordError:
    for col in _JSON_COLUMNS:  # table cells hold nested records as JSON text
        if isinstance(rec.get(col), str):
            try:
                rec[col] = json.loads(rec[col])
            except json.JSONDecodeError as e:
                return RecordError(f"column '{col}' is not valid JSON ({e.msg})")
    return rec


def _read_table(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    kind = path.suffix.lower().lstrip(".")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow parse errors
        raise DataError(f"{path}: cannot read {kind} ({str(e).splitlines()[0][:200]})") from None
    for i, rec in enumerate(ds):
        yield f"{path} row {i + 1}", _parse_json_columns(rec)


def _read_hf(source: str, split: str, saved: bool) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        if saved:
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}: no split '{split}' (has {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"cannot load dataset '{source}' ({first}); for a hub dataset this needs network access, "
                        "or point data.path at a local file") from None
    for i, rec in enumerate(ds):
        yield f"{source}[{split}] row {i + 1}", rec


# ---------------------------------------------------------------------------------------------- converting


def read_samples(spec: DatasetSpec, stats: DataStats, skip_bad: bool, collect_all: bool = False,
                 format_key: str = "data.format") -> tuple[list[Sample], list[str]]:
    """Samples of one dataset with their locations. A bad record raises DataError naming file and line,
    unless skip_bad (count and go on) or collect_all (record every one, for check-dataset). `format_key` is
    the config key that set spec.format (named when the data looks like another format)."""
    samples: list[Sample] = []
    where_list: list[str] = []
    for source in list_sources(spec.path):
        try:
            if _read_source_samples(source, spec, stats, skip_bad or collect_all, samples, where_list, format_key):
                break
        except DataError as e:
            # A file that cannot be read to the end (not UTF-8, broken JSON array) is one bad record, so the
            # other files are still read (and, for check-dataset, their bad records listed).
            if not (skip_bad or collect_all):
                raise
            _add_bad(stats, _file_error(source, str(e)))
    return samples, where_list


def _read_source_samples(source: str, spec: DatasetSpec, stats: DataStats, skip_bad: bool, samples: list[Sample],
                         where_list: list[str], format_key: str) -> bool:
    """Append one source's samples; True once spec.max_samples is reached."""
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
            mismatch = format_mismatch(rec, fmt, format_key) if spec.format != "auto" else None
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


def encode_dataset(data: DataSettings, tokenizer: Any, stats: DataStats, collect_all: bool = False
                   ) -> EncodedDataset:
    out = EncodedDataset([], [], [], [])
    specs = data.specs()
    for di, spec in enumerate(specs):
        samples, wheres = read_samples(spec, stats, data.skip_bad_records, collect_all, data.format_key(di))
        renderer = None  # made on the first conversation: pre-training text needs no (chat) template
        with ui.progress(len(samples), f"tokenising {Path(str(spec.path)).name}") as advance:
            for start in range(0, len(samples), CHUNK):
                chunk = samples[start:start + CHUNK]
                segs = []
                keep = []
                for s, w in zip(chunk, wheres[start:start + CHUNK]):
                    if renderer is None and isinstance(s, Conversation):
                        renderer = get_template(spec.prompt_template or data.prompt_template, tokenizer)
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


def mix_order(data: DataSettings, dataset_index: list[int], seed: int) -> list[int]:
    """Sample indices for one pass: every sample once (concat), or datasets in proportion to their weights."""
    n = len(dataset_index)
    if data.mix == "concat" or len(data.specs()) == 1:
        return list(range(n))
    specs = data.specs()
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


# ---------------------------------------------------------------------------------------------- caching


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    for attr in ("chat_template", "bos_token", "eos_token", "pad_token"):
        h.update(repr(getattr(tokenizer, attr, None)).encode())
    return h.hexdigest()


def source_fingerprint(source: str) -> str:
    p = Path(source)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for f in _visible_files(p):
            h.update(str(f.relative_to(p)).encode())
            file_digest(f, h)
        return h.hexdigest()
    return f"hub:{source}"  # a hub dataset: its name and split stand for its content


def cache_key(data: DataSettings, tokenizer: Any, seed: int) -> str:
    specs = []
    for spec in data.specs():
        d = spec.model_dump(mode="json")
        d["sources"] = {s: source_fingerprint(s) for s in list_sources(spec.path)}
        specs.append(d)
    key = {"v": PIPELINE_VERSION, "specs": specs, "tok": tokenizer_fingerprint(tokenizer),
           "max_length": data.max_length, "pack": data.pack_to_max_length, "skip": data.skip_bad_records,
           "mix": data.mix, "seed": seed if data.mix == "weighted" else None}
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()


def _save_rows(rows: Rows, stats: DataStats, folder: Path) -> None:
    import datasets
    import pyarrow as pa

    table = pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(rows.offsets), pa.array(rows.input_ids)),
        "labels": pa.ListArray.from_arrays(pa.array(rows.offsets), pa.array(rows.labels)),
        "seq_lens": pa.ListArray.from_arrays(pa.array(rows.seq_offsets), pa.array(rows.seq_lens)),
    })
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset(table).save_to_disk(str(tmp))
    d = asdict(stats)
    d["bad_records"] = [asdict(b) for b in stats.bad_records[:100]]
    (tmp / "tunelab_stats.json").write_text(json.dumps(d, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _load_rows(folder: Path) -> tuple[Rows, DataStats]:
    import datasets

    table = datasets.load_from_disk(str(folder)).data.table

    def flat(col: str) -> tuple[np.ndarray, np.ndarray]:
        arr = table.column(col).combine_chunks()
        return arr.values.to_numpy(), arr.offsets.to_numpy().astype(np.int64)

    ids, offsets = flat("input_ids")
    labels, _ = flat("labels")
    seq_lens, seq_offsets = flat("seq_lens")
    raw = json.loads((folder / "tunelab_stats.json").read_text())
    raw["bad_records"] = [BadRecord(**b) for b in raw.get("bad_records", [])]
    return Rows(ids, labels, offsets, seq_lens, seq_offsets), DataStats(**raw)


# ---------------------------------------------------------------------------------------------- entry point


def prepare_data(data: DataSettings, tokenizer: Any, seed: int = 0, use_cache: bool | None = None
                 ) -> PreparedData:
    """Tokenised, packed rows for a config's data section, from the cache when nothing changed."""
    t0 = time.perf_counter()
    use_cache = data.cache if use_cache is None else use_cache
    folder = None
    if use_cache:
        folder = cache_root() / "data" / cache_key(data, tokenizer, seed)
        if (folder / "tunelab_stats.json").exists():
            rows, stats = _load_rows(folder)
            stats.seconds = time.perf_counter() - t0  # this load's time, not the run that filled the cache
            ui.info(f"data: {stats.samples} samples -> {len(rows)} rows from cache {folder} "
                    f"({stats.seconds:.2f} s)")
            return PreparedData(rows, stats, True, folder)
    stats = DataStats(max_length=data.max_length)
    enc = encode_dataset(data, tokenizer, stats)
    if not enc.input_ids:
        paths = ", ".join(str(s.path) for s in data.specs())
        first = f"; first bad: {stats.bad_records[0].where}: {stats.bad_records[0].reason}" if stats.bad_records else ""
        raise DataError(f"no training samples in {paths} ({stats.records} records read, {stats.bad} bad, "
                        f"{stats.dropped} with nothing to learn{first})")
    order = mix_order(data, enc.dataset_index, seed)
    rows = pack_samples([enc.input_ids[i] for i in order], [enc.labels[i] for i in order], data.max_length,
                        data.pack_to_max_length)
    stats.rows = len(rows)
    stats.seconds = time.perf_counter() - t0
    report(stats)
    if folder is not None:
        _save_rows(rows, stats, folder)
    return PreparedData(rows, stats, False, folder)


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
