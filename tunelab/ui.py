"""Console output shared by every command: messages, warnings printed once, progress bars with ETA, and the
libraries' own output kept quiet unless --debug.

Only the main process (rank 0) prints, so several GPUs do not repeat every line.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
warning_counts: Counter[str] = Counter()
_warning_text: dict[str, str] = {}
_warning_sinks: list[Callable[[str, str], None]] = []


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def count(n: int, noun: str) -> str:
    """'1 step', '12 steps': a number with its noun."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def info(msg: str) -> None:
    if is_main_process():
        console.print(msg, markup=False)


def warn(key: str, msg: str) -> None:
    """Print a warning the first time `key` is seen; count every occurrence."""
    warning_counts[key] += 1
    if warning_counts[key] == 1:
        _warning_text[key] = msg
        if is_main_process():
            err_console.print(f"warning: {msg}", markup=False, style="yellow")
        for sink in _warning_sinks:
            sink(key, msg)


def add_warning_sink(fn: Callable[[str, str], None]) -> None:
    _warning_sinks.append(fn)


def remove_warning_sink(fn: Callable[[str, str], None]) -> None:
    if fn in _warning_sinks:
        _warning_sinks.remove(fn)


def error(msg: str) -> None:
    err_console.print(f"error: {msg}", markup=False, style="bold red")


@contextmanager
def progress(total: int | None, description: str) -> Iterator[Callable[[int], None]]:
    """A progress bar with ETA on a terminal; silent when output is piped (logs carry the numbers)."""
    show = is_main_process() and sys.stdout.isatty()
    if not show:
        yield lambda n=1: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), TimeElapsedColumn(), console=console, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def quiet_libraries(debug: bool) -> None:
    """Keep the terminal for tunelab's own lines; libraries' own progress bars and notices only with --debug."""
    if debug:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers' own bars (GGUF de-quantising, "Loading weights", "Writing model shards") ignore its
    # disable_progress_bar(); tqdm reads this when it is first imported, which is after this point.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # torch's own loggers (its deprecation notes when torchao registers types, compile notices): errors only.
    # torch re-applies this setting whenever it sets up its logging, which a logger's level would not survive.
    os.environ.setdefault("TORCH_LOGS", "-torch")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "datasets", "torch", "bitsandbytes", "accelerate", "httpx", "torchao",
                 "liger_kernel"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
        import huggingface_hub  # after datasets, which sets the hub's verbosity back to warnings on import

        huggingface_hub.utils.logging.set_verbosity_error()  # its "Retrying in 1s" lines without a hub
    except ImportError:
        pass
