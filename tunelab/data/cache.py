"""The Arrow cache of prepared rows: a key made of everything that changes them (file contents, tokenizer,
templates, max_length, packing, the pipeline's version), and the rows saved and loaded memory-mapped, so a second
run loads them in well under a second and any change misses the cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.cache import file_digest, umask_permissions
from tunelab.config.schema import DataSettings
from tunelab.data.pack import Rows
from tunelab.data.sources import Dataset, visible_files

PIPELINE_VERSION = 4  # bump when rows for the same inputs would change
STATS = "tunelab_stats.json"  # the stats beside the rows; a folder without it holds no cache


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
        for f in visible_files(p):
            h.update(str(f.relative_to(p)).encode())
            file_digest(f, h)
        return h.hexdigest()
    return f"hub:{source}"  # a hub dataset: its name and split stand for its content


def cache_key(data: DataSettings, datasets: list[Dataset], tokenizer: Any, seed: int) -> str:
    specs = []
    for ds in datasets:
        d = ds.spec.model_dump(mode="json")
        d["sources"] = {s: source_fingerprint(s) for s in ds.sources}
        specs.append(d)
    key = {"v": PIPELINE_VERSION, "specs": specs, "tok": tokenizer_fingerprint(tokenizer),
           "max_length": data.max_length, "pack": data.pack_to_max_length, "skip": data.skip_bad_records,
           "mix": data.mix, "seed": seed if data.mix == "weighted" else None}
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()


def save_rows(rows: Rows, stats: dict, folder: Path) -> None:
    """Write the rows and their stats as one folder, atomically (a killed run leaves no half-written cache)."""
    import datasets
    import pyarrow as pa

    table = pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(rows.offsets), pa.array(rows.input_ids)),
        "labels": pa.ListArray.from_arrays(pa.array(rows.offsets), pa.array(rows.labels)),
        "seq_lens": pa.ListArray.from_arrays(pa.array(rows.seq_offsets), pa.array(rows.seq_lens)),
    })
    # A name no other writer can take, also a node whose leader has the same PID in an identical container.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        datasets.Dataset(table).save_to_disk(str(tmp))
        (tmp / STATS).write_text(json.dumps(stats, indent=1))
        umask_permissions(tmp)  # not mkdtemp's 0700: processes of other users on the node read it
        # Several nodes on a shared filesystem each prepare the same rows (the folder name is their fingerprint).
        # Renames only, never a delete in place: the first complete folder stays, and no node removes files that
        # another node's processes are reading. A folder without stats (a killed write) is moved aside first.
        for _ in range(3):
            try:
                os.rename(tmp, folder)
                return
            except OSError:
                if (folder / STATS).exists():
                    return
            aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".old"))
            try:
                os.rename(folder, aside / "broken")
            except OSError:
                pass  # another writer moved it first
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, folder)  # a last try: its error says why
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_rows(folder: Path) -> tuple[Rows, dict] | None:
    """The rows and stats of a cache folder; None if there is none."""
    import datasets

    if not (folder / STATS).exists():
        return None

    table = datasets.load_from_disk(str(folder)).data.table

    def flat(col: str) -> tuple[np.ndarray, np.ndarray]:
        arr = table.column(col).combine_chunks()
        return arr.values.to_numpy(), arr.offsets.to_numpy().astype(np.int64)

    ids, offsets = flat("input_ids")
    labels, _ = flat("labels")
    seq_lens, seq_offsets = flat("seq_lens")
    return Rows(ids, labels, offsets, seq_lens, seq_offsets), json.loads((folder / STATS).read_text())
