"""`tunelab check-dataset` and `tunelab log-dataset`: looking at a config's data before training on it.

check-dataset reads every record of every dataset, lists the bad ones with file and line, counts records,
samples and tokens, and plots the sample lengths. log-dataset prints a few samples as the model sees them
(decoded from the token ids, with the spans that are not trained on marked) and how they are packed into rows.

Both go through the training pipeline itself (`encode_dataset`), so what they show is what training uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tunelab import ui
from tunelab.config.schema import Config, DataSettings
from tunelab.data.dataset import DataStats, EncodedDataset, encode_dataset
from tunelab.data.encode import IGNORE
from tunelab.data.pack import best_fit, build_rows, position_ids_for

MAX_SHOWN_BAD = 50
MAX_SHOWN_ROWS = 3
NO_LOSS_OPEN, NO_LOSS_CLOSE = "[[no loss: ", "]]"


def _with_max_samples(data: DataSettings, n: int | None) -> DataSettings:
    """The data section with every dataset's max_samples set to n (None: read everything)."""
    return data.model_copy(update={
        "max_samples": n,
        "datasets": [d.model_copy(update={"max_samples": n}) for d in data.datasets],
    })


# ---------------------------------------------------------------------------------------------- check-dataset


def check_dataset(cfg: Config, tokenizer: Any, hist_png: Path) -> int:
    """Read every record; report bad ones and the counts; save a length histogram. 1 if any record is bad."""
    data = cfg.data
    if data.max_samples or any(d.max_samples for d in data.datasets):
        ui.info("note: max_samples is ignored here: every record is checked")
    stats = DataStats(max_length=data.max_length)
    enc = encode_dataset(_with_max_samples(data, None), tokenizer, stats, collect_all=True)

    if stats.bad:
        ui.info(f"bad records ({stats.bad}):")
        for b in stats.bad_records[:MAX_SHOWN_BAD]:
            ui.info(f"  {b.where}: {b.reason}")
        if stats.bad > MAX_SHOWN_BAD:
            ui.info(f"  ... and {stats.bad - MAX_SHOWN_BAD} more ({stats.bad} bad records in all)")

    lengths = np.fromiter((len(x) for x in enc.input_ids), dtype=np.int64, count=len(enc.input_ids))
    for source, fmt in stats.formats.items():
        ui.info(f"dataset: {source} (format {fmt})")
    ui.info(f"records: {stats.records}")
    ui.info(f"samples: {stats.samples}")
    ui.info(f"bad records: {stats.bad}")
    ui.info(f"dropped: {stats.dropped} (nothing to learn from)")
    ui.info(f"truncated: {stats.truncated} (longer than max_length={data.max_length})")
    ui.info(f"tokens: {stats.tokens:,} ({stats.loss_share:.1%} in the loss, {stats.loss_tokens:,} tokens)")
    if len(lengths):
        ui.info(f"sample length: min {lengths.min()}, median {np.median(lengths):g}, "
                f"p95 {np.percentile(lengths, 95):g}, max {lengths.max()}")
        rows = len(best_fit(lengths, data.max_length)) if data.pack_to_max_length else len(lengths)
        ui.info(f"rows: {rows} of <= {data.max_length} tokens"
                + (" (packed)" if data.pack_to_max_length else " (one sample per row)"))
        save_length_histogram(lengths, data.max_length, hist_png)
        ui.info(f"length histogram: {hist_png}")
    else:
        ui.info("no training samples: nothing to plot")

    if stats.bad:
        ui.info(f"FAILED: {stats.bad} bad record{'s' if stats.bad != 1 else ''} "
                "(fix them, or set data.skip_bad_records: true to train without them)")
        return 1
    if not len(lengths):
        ui.info("FAILED: the data has no training samples")
        return 1
    ui.info("OK: every record is usable")
    return 0


def save_length_histogram(lengths: np.ndarray, max_length: int, out: Path) -> None:
    """A PNG of sample lengths with max_length marked. Uses a bare Figure (Agg) so no GUI backend or pyplot
    global state is touched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    top = max(int(lengths.max()), max_length)
    ax.hist(lengths, bins=min(50, max(1, top)), range=(0, top), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length = {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"{len(lengths)} samples, median {np.median(lengths):g} tokens")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), format="png", dpi=100)


# ---------------------------------------------------------------------------------------------- log-dataset


def _targets(labels: np.ndarray) -> np.ndarray:
    """Which tokens of a sample are trained on, read back from its shifted labels (token 0 never is)."""
    out = np.zeros(len(labels), dtype=bool)
    out[1:] = labels[:-1] != IGNORE
    return out


def _spans(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal runs [start, end) of equal flags."""
    out = []
    start = 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            out.append((start, i, bool(flags[start])))
            start = i
    return out


def _decode(tokenizer: Any, ids: np.ndarray) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render_sample(tokenizer: Any, ids: np.ndarray, labels: np.ndarray, styled: bool) -> Any:
    """A sample decoded span by span: on a terminal the no-loss spans are dim; elsewhere (files, pipes) they
    are wrapped in an explicit marker, so the log stays readable without colour."""
    spans = [(_decode(tokenizer, ids[a:b]), trained) for a, b, trained in _spans(_targets(labels))]
    if styled:
        from rich.text import Text

        text = Text()
        for s, trained in spans:
            text.append(s, style="bold" if trained else "dim")
        return text
    return "".join(s if trained else f"{NO_LOSS_OPEN}{s}{NO_LOSS_CLOSE}" for s, trained in spans)


def _preview(tokenizer: Any, ids: np.ndarray, width: int = 40) -> str:
    s = _decode(tokenizer, ids[:24]).replace("\n", "\\n")
    return s[:width] + ("..." if len(s) > width or len(ids) > 24 else "")


def log_dataset(cfg: Config, tokenizer: Any, n: int) -> int:
    """Print the first n samples as the model sees them, and the rows packing puts them in."""
    data = cfg.data
    stats = DataStats(max_length=data.max_length)
    # Only the first n samples of each dataset are read and tokenised, not the whole file.
    enc = encode_dataset(_with_max_samples(data, max(1, n)), tokenizer, stats, collect_all=True)
    if stats.bad:
        ui.info(f"note: {stats.bad} bad record(s) among those read were skipped (first: "
                f"{stats.bad_records[0].where}: {stats.bad_records[0].reason}); `tunelab check-dataset` lists all")
    shown = list(range(min(n, len(enc.input_ids))))
    if not shown:
        ui.info("no samples to show")
        return 0
    styled = ui.console.is_terminal
    legend = "dim text" if styled else f"text in {NO_LOSS_OPEN}...{NO_LOSS_CLOSE}"
    ui.info(f"{len(shown)} sample(s), decoded from their token ids; {legend} is not trained on "
            "(prompt, template text), the rest is")
    for k in shown:
        ids, labels = enc.input_ids[k], enc.labels[k]
        n_loss = int(np.count_nonzero(labels != IGNORE))
        ui.info(f"--- sample {k + 1}: {enc.where[k]}, {len(ids)} tokens, {n_loss} in the loss ---")
        ui.info(render_sample(tokenizer, ids, labels, styled))
    _log_rows(tokenizer, enc, shown, data)
    return 0


def _log_rows(tokenizer: Any, enc: EncodedDataset, shown: list[int], data: DataSettings) -> None:
    """The shown samples packed exactly as training packs samples (same best-fit and row builder)."""
    ids = [enc.input_ids[i] for i in shown]
    labels = [enc.labels[i] for i in shown]
    if data.pack_to_max_length:
        groups = best_fit(np.array([len(x) for x in ids], dtype=np.int64), data.max_length)
        how = f"packed best-fit into rows of <= {data.max_length} tokens"
    else:
        groups = [[i] for i in range(len(ids))]
        how = "one sample per row (pack_to_max_length: false)"
    rows = build_rows(ids, labels, groups)
    ui.info(f"--- rows: the {len(shown)} sample(s) above, {how}: {len(rows)} row(s) ---")
    for r in range(min(len(rows), MAX_SHOWN_ROWS)):
        row_ids, row_labels, seq_lens = rows.row(r)
        pos = position_ids_for(seq_lens, len(row_ids))
        ui.info(f"row {r + 1}: {len(seq_lens)} sample(s), {len(row_ids)}/{data.max_length} tokens, "
                f"lengths {' + '.join(str(int(x)) for x in seq_lens)}")
        start = 0
        for member, length in zip(groups[r], seq_lens.tolist()):
            end = start + length
            ui.info(f"  tokens {start}-{end - 1}: sample {member + 1} ({enc.where[shown[member]]}), "
                    f"{length} tokens, positions {pos[start]}..{pos[end - 1]}, "
                    f"last label {row_labels[end - 1]} | {_preview(tokenizer, row_ids[start:end])}")
            start = end
    if len(rows) > MAX_SHOWN_ROWS:
        ui.info(f"... and {len(rows) - MAX_SHOWN_ROWS} more row(s)")
