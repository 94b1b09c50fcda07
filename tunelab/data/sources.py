"""Where a config's records come from: its datasets resolved once (section options filled in, files listed), and
every record of a source read with its location (file:line, or row N), so an error can name it.

Sources are files (json, jsonl, parquet, csv, txt), folders of them, datasets saved with `save_to_disk`, and hub
ids. A record that cannot be read is yielded as a `RecordError` in its place; a file that cannot be read to its
end raises `DataError` naming the line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.load import HUB_ID
from tunelab.config.schema import DatasetSpec, DataSettings
from tunelab.data.formats import RecordError
from tunelab.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


@dataclass(frozen=True)
class Dataset:
    """One of a config's datasets, resolved: every step after this uses these, not the config section."""

    spec: DatasetSpec  # with the section's options filled in
    sources: tuple[str, ...]  # its files, saved datasets and hub ids
    format_key: str  # the config key that sets its format (named when the data looks like another format)


def resolve_datasets(data: DataSettings) -> list[Dataset]:
    return [Dataset(spec, tuple(list_sources(spec.path)), data.format_key(i)) for i, spec in enumerate(data.specs())]


def is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists())


def visible_files(folder: Path) -> list[Path]:
    """Files under a folder, skipping hidden files and folders (.ipynb_checkpoints, .git, editor backups)."""
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def list_sources(path: str | list[str]) -> list[str]:
    """Expand a data path into its sources: files, saved datasets, hub ids."""
    paths = path if isinstance(path, list) else [path]
    out: list[str] = []
    for p in paths:
        local = Path(p)
        if is_saved_dataset(local):
            out.append(str(local))
        elif local.is_dir():
            files = [f for f in visible_files(local) if f.suffix.lower() in SUFFIXES]
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
    if is_saved_dataset(p):
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
