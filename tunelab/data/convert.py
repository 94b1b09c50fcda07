"""`tunelab data convert`: a dataset file from one format to another (OpenAI messages, XTuner conversation,
or pre-training text), and writing record files (.jsonl, or .json arrays)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from tunelab.data.formats import Conversation, Document, RecordError, Sample, source_format, to_sample
from tunelab.data.sources import list_sources, read_source
from tunelab.errors import DataError, OutputExistsError


def read_as_samples(path: str, from_format: str = "auto", hint: str = "pass --from"
                    ) -> Iterator[tuple[str, Conversation | Document]]:
    """(location, sample) for every record of a file or folder; the format is detected per file (a folder may
    mix formats) unless given. A bad record stops with file and line; records with nothing to learn are left
    out."""
    for source in list_sources(path):
        fmt = None if from_format == "auto" else from_format
        for where, rec in read_source(source):
            try:
                if isinstance(rec, RecordError):
                    raise rec
                if fmt is None:
                    fmt = source_format(source, rec, hint)
                sample = to_sample(rec, fmt)
            except RecordError as e:
                raise DataError(f"{where}: {e}") from None
            if sample is not None:
                yield where, sample


def write_records(records: list[dict], out: Path, fmt: str = "openai", overwrite: bool = False) -> None:
    """Write records as .jsonl (one per line) or .json (an array), atomically."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if fmt == "conversation":
        records = [to_conversation_record(to_sample(r, "openai")) if "messages" in r else r for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        if out.suffix == ".json":
            json.dump(records, f, ensure_ascii=False, indent=1)
        else:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def convert_file(src: Path, dst: Path, from_format: str, to_format: str, overwrite: bool = False) -> int:
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"{dst} already exists; pass --overwrite to replace it")
    out = [_emit(sample, to_format) for _, sample in read_as_samples(str(src), from_format)]
    write_records(out, dst, "openai", overwrite=True)
    return len(out)


def _emit(sample: Conversation | Document, to_format: str) -> dict[str, Any]:
    if to_format == "openai":
        return to_openai_record(sample)
    if to_format == "conversation":
        return to_conversation_record(sample)
    if isinstance(sample, Document):
        return {"text": sample.text}
    # Chat data as pre-training text: the turns joined, as the continued pre-training tutorial does.
    return {"text": "\n".join(m.content for m in sample.messages if m.role != "system")}


def to_openai_record(sample: Sample) -> dict:
    """The OpenAI-messages record of a sample (used by `data convert` and the generators)."""
    if isinstance(sample, Document):
        return {"text": sample.text}
    out = []
    for m in sample.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and not m.loss:
            d["loss"] = False
        out.append(d)
    return {"messages": out}


def to_conversation_record(sample: Sample) -> dict:
    """The XTuner `conversation` record of a sample."""
    if isinstance(sample, Document):
        return {"conversation": [{"input": "", "output": sample.text}]}
    turns: list[dict[str, Any]] = []
    system = sample.system
    msgs = sample.messages[1:] if system is not None else sample.messages
    for user, assistant in zip(msgs[0::2], msgs[1::2]):
        turn: dict[str, Any] = {}
        if system is not None and not turns:
            turn["system"] = system
        turn["input"] = user.content
        turn["output"] = assistant.content
        if not assistant.loss:
            turn["output_with_loss"] = False
        turns.append(turn)
    return {"conversation": turns}
