"""What a resumed run must share with the run it continues, and what it may change.

Refused (listed, `--resume-force` overrides): the model, adapters, quantization, the data and its order (seed,
shuffle, packing, length), and the rows per optimizer step (batch_size x accumulative_counts x processes; the
number of processes may change when the product stays the same). Accepted with one line each: the schedule
(max_steps, max_epochs, lr, warmup_ratio, min_lr_ratio, with the learning rate before and after the resume point)
and the other train settings (weight decay, betas, clipping, dtype, strategy, and batch layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunelab.config.schema import Config, TrainSettings
from tunelab.errors import CheckpointError
from tunelab.train.optim import lr_at

SCHEDULE = ("max_steps", "max_epochs", "lr", "warmup_ratio", "min_lr_ratio")
_LAYOUT = ("train.batch_size", "train.accumulative_counts", "world_size")


def rows_per_step(cfg: Config, world_size: int) -> int:
    return cfg.train.batch_size * cfg.train.accumulative_counts * world_size


def fingerprint(cfg: Config, n_rows: int, world_size: int) -> dict[str, Any]:
    return {"model.path": cfg.model.path, "model.revision": cfg.model.revision,
            "model.quantization": cfg.model.quantization,
            "model.lora": cfg.model.lora.model_dump() if cfg.model.lora else None,
            "data": [s.model_dump(mode="json") for s in cfg.data.specs()],
            "data.max_length": cfg.data.max_length, "data.pack_to_max_length": cfg.data.pack_to_max_length,
            "data.shuffle": cfg.data.shuffle, "data.rows": n_rows, "train.seed": cfg.train.seed,
            "rows_per_step": rows_per_step(cfg, world_size),
            "layout": f"batch_size {cfg.train.batch_size} x accumulative_counts {cfg.train.accumulative_counts} "
                      f"x {world_size} process{'es' if world_size > 1 else ''}"}


def refusals(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The differences that stop a resume, one line each. Checkpoints from before `rows_per_step` recorded the
    batch layout instead; it is compared the same way."""
    old = dict(old)
    if "rows_per_step" not in old and all(k in old for k in _LAYOUT):
        old["rows_per_step"] = old["train.batch_size"] * old["train.accumulative_counts"] * old["world_size"]
        old["layout"] = (f"batch_size {old['train.batch_size']} x accumulative_counts "
                         f"{old['train.accumulative_counts']} x {old['world_size']} processes")
    lines = []
    for k in sorted((set(old) | set(new)) - {"layout", *_LAYOUT}):
        if old.get(k) == new.get(k):
            continue
        if k == "rows_per_step":
            lines.append(f"rows per optimizer step: {old.get(k)} ({old.get('layout')}) -> {new.get(k)} "
                         f"({new.get('layout')}); change accumulative_counts so the product stays {old.get(k)}")
        else:
            lines.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return lines


def old_train_settings(ckpt: Path) -> dict[str, Any]:
    """The train section of the run being resumed (its checkpoint holds the resolved config)."""
    try:
        raw = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return raw.get("train") or {}


def changes(old_train: dict[str, Any], new: TrainSettings, step: int, old_total: int, new_total: int) -> list[str]:
    """One line per changed train setting; schedule lines carry the learning rate at the resume point under the
    old and the new schedule, since that is what the change does to the run."""
    new_values = new.model_dump(mode="json")
    changed = [k for k in new_values if k in old_train and _norm(old_train[k]) != _norm(new_values[k])]
    if not changed:
        return []
    known = {k: old_train[k] for k in SCHEDULE if k in old_train}
    before = lr_at(step, old_total, new.model_copy(update=known))
    after = lr_at(step, new_total, new)
    lines = []
    for k in changed:
        line = f"resume: train.{k} {old_train[k]} -> {new_values[k]}"
        if k in SCHEDULE:
            line += f" (total steps {old_total} -> {new_total}; lr at step {step}: {before:.3e} before, {after:.3e} after)"
        lines.append(line)
    return lines


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def check_not_finished(step: int, total: int, ckpt: Path) -> None:
    if step >= total:
        raise CheckpointError(f"{ckpt} is at step {step} and the schedule now ends at step {total}: nothing to train "
                              "(raise train.max_steps or train.max_epochs to train further)")
