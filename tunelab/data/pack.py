"""Encoded samples -> rows of at most max_length tokens, and rows -> model batches.

A row holds one sample (no packing) or several (packing). Every row records its samples' lengths; the batch
gets position ids that restart at 0 for every sample, and the attention backend turns those restarts into a
block-diagonal causal mask, so no sample attends to another. Padding is one more "sample" at the end of a row,
with no loss, so one code path serves packed and unpacked batches and no attention mask tensor is needed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from tunelab.data.encode import IGNORE


@dataclass
class Rows:
    """Rows as flat arrays (Arrow-friendly): row i's tokens are tokens[offsets[i]:offsets[i+1]]."""

    input_ids: np.ndarray  # int32, all rows concatenated
    labels: np.ndarray  # int32, shifted per sample
    offsets: np.ndarray  # int64, len = n_rows + 1
    seq_lens: np.ndarray  # int32, all rows' sample lengths concatenated
    seq_offsets: np.ndarray  # int64, row i's sample lengths are seq_lens[seq_offsets[i]:seq_offsets[i+1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        s, e = self.seq_offsets[i], self.seq_offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b], self.seq_lens[s:e]


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= capacity (best-fit decreasing, O(n log n))."""
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row id)
    for idx in order.tolist():
        n = int(lengths[idx])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, rid = free.pop(j)
            rows[rid].append(idx)
            if space - n > 0:
                bisect.insort(free, (space - n, rid))
        else:
            rows.append([idx])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def build_rows(input_ids: list[np.ndarray], labels: list[np.ndarray], groups: list[list[int]]) -> Rows:
    order = [i for g in groups for i in g]
    lens = np.fromiter((len(input_ids[i]) for i in order), dtype=np.int64, count=len(order))
    ids = np.concatenate([input_ids[i] for i in order]) if order else np.zeros(0, np.int32)
    lab = np.concatenate([labels[i] for i in order]) if order else np.zeros(0, np.int32)
    seq_offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    seq_offsets[1:] = np.cumsum([len(g) for g in groups])
    cum = np.zeros(len(order) + 1, dtype=np.int64)
    cum[1:] = np.cumsum(lens)
    offsets = cum[seq_offsets]
    return Rows(ids.astype(np.int32), lab.astype(np.int32), offsets, lens.astype(np.int32), seq_offsets)


def pack_samples(input_ids: list[np.ndarray], labels: list[np.ndarray], max_length: int, pack: bool) -> Rows:
    if pack:
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        groups = best_fit(lengths, max_length)
    else:
        groups = [[i] for i in range(len(input_ids))]
    return build_rows(input_ids, labels, groups)


def position_ids_for(seq_lens: np.ndarray, total: int) -> np.ndarray:
    """Positions restarting at 0 for each sample; tokens past the samples (padding) form one more sample."""
    pos = np.empty(total, dtype=np.int64)
    i = 0
    for n in list(seq_lens) + [total - int(np.sum(seq_lens))]:
        pos[i:i + n] = np.arange(n)
        i += n
    return pos


def collate(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pad_id: int, multiple_of: int = 8,
            pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Rows -> {input_ids, labels, position_ids, target_index, targets}, padded to the longest row (or pad_to).
    target_index holds the flat positions (row * width + column) that have a target; targets their labels."""
    longest = max(len(r[0]) for r in rows)
    width = pad_to or -(-longest // multiple_of) * multiple_of
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    lab = np.full((len(rows), width), IGNORE, dtype=np.int64)
    pos = np.empty((len(rows), width), dtype=np.int64)
    for b, (x, y, seq) in enumerate(rows):
        ids[b, :len(x)] = x
        lab[b, :len(y)] = y
        pos[b] = position_ids_for(seq, width)
    flat = lab.reshape(-1)
    index = np.flatnonzero(flat != IGNORE)
    # Target positions are found here, on the CPU: on the GPU a boolean mask would force a sync mid-forward.
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab),
            "position_ids": torch.from_numpy(pos), "target_index": torch.from_numpy(index),
            "targets": torch.from_numpy(flat[index])}
