"""What a run writes about itself: console lines, `scalars.jsonl`, TensorBoard events, `train.log` and, at the
end, `loss_curve.png`. Only rank 0 writes."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from tunelab import ui


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def memory_gib(device: torch.device) -> float:
    """The figure the step line shows: peak GPU memory on a GPU, current host memory (RSS) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak host memory (RSS) and, on a GPU, its peak allocated GPU memory, in GiB."""
    out = {"host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux reports KiB
    if device.type == "cuda":
        out["gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def rank_line(r: dict[str, Any]) -> str:
    """One process's share of a run: how much of the model and optimizer state it holds, and its peak memory."""
    gpu = f", peak GPU {r['gpu_gib']:.2f} GiB" if "gpu_gib" in r else ""
    return (f"rank {r['rank']}: {r['params_local']:,} of {r['params_total']:,} parameter values "
            f"({100 * r['params_local'] / max(r['params_total'], 1):.1f}%), optimizer state "
            f"{r['optim_local']:,} of {r['optim_total']:,} values, peak host {r['host_gib']:.2f} GiB{gpu}")


class RunLogger:
    def __init__(self, log_dir: Path, enabled: bool = True):
        self.dir = log_dir
        self.enabled = enabled
        self.tb = None
        self._jsonl = None
        self._text = None
        if enabled:
            log_dir.mkdir(parents=True, exist_ok=True)
            # open for the whole run; close() ends them
            self._jsonl = open(log_dir / "scalars.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self._text = open(log_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(log_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; a broken install must not stop training
                ui.warn("tensorboard", "tensorboard is not importable; no event files will be written")
            ui.add_warning_sink(self._on_warning)

    def _on_warning(self, key: str, msg: str) -> None:
        self.text(f"warning: {msg}")

    def info(self, msg: str) -> None:
        ui.info(msg)
        self.text(msg)

    def text(self, msg: str) -> None:
        if self._text:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            self._text.flush()

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def __enter__(self) -> RunLogger:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.text(f"stopped: {type(exc).__name__}: {exc}")
        self.close()

    def close(self) -> None:
        if not self.enabled or self._text is None or self._text.closed:
            return
        ui.remove_warning_sink(self._on_warning)
        if ui.warning_counts:
            self.text("warning counts: " + json.dumps(dict(ui.warning_counts)))
        for f in (self._jsonl, self._text):
            if f:
                f.close()
        if self.tb is not None:
            self.tb.close()


def read_scalars(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(scalars_file: Path, out: Path) -> Path | None:
    """loss_curve.png: training loss (and lr on a second axis) against the optimizer step."""
    rows = [r for r in read_scalars(scalars_file) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("tunelab training loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
