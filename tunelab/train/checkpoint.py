"""Checkpoints: one `iter_N/` folder per save, written to a temporary folder and renamed into place, with a
`last_checkpoint` pointer that only ever names a complete one.

A checkpoint holds the trainable weights (a PEFT adapter folder, or the full model as sharded safetensors),
the optimizer state (safetensors + JSON), RNG states, the data position and the resolved config. Nothing is
pickled; nothing is loaded with torch.load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError, TrainingError

POINTER = "last_checkpoint"
_ITER = re.compile(r"^iter_(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    total_steps: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0  # consecutive non-finite updates
    fingerprint: dict[str, Any] = field(default_factory=dict)
    log_dir: str = ""


def list_checkpoints(work_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in work_dir.iterdir() if (m := _ITER.match(p.name)) and p.is_dir()] \
        if work_dir.is_dir() else []
    return [p for _, p in sorted(found)]


def latest_checkpoint(work_dir: Path) -> Path | None:
    pointer = work_dir / POINTER
    if pointer.exists():
        name = pointer.read_text().strip()
        p = Path(name) if Path(name).is_absolute() else work_dir / name
        if (p / "trainer_state.json").exists():
            return p
    done = [p for p in list_checkpoints(work_dir) if (p / "trainer_state.json").exists()]
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from what a user may type: iter_N, iter_N.pth (XTuner's name) or a work dir."""
    p = Path(path)
    if p.suffix == ".pth" and not p.exists() and p.with_suffix("").is_dir():
        p = p.with_suffix("")
    if p.is_dir() and not (p / "trainer_state.json").exists():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not (p / "trainer_state.json").exists():
        raise CheckpointError(f"{p} is not a complete tunelab checkpoint (no trainer_state.json)")
    return p


# ---------------------------------------------------------------------------------------------- saving


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"state.{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's random states: CPU, its own GPU, Python and NumPy."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _failure_reason(e: Exception) -> str:
    # safetensors reports a full disk as "Error while serializing: I/O error: ... (os error 28)"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if "os error 28" in text:
        return "No space left on device"
    return (text.splitlines() or [type(e).__name__])[0][:200]


def save_checkpoint(work_dir: Path, state: TrainState, model: Any, optimizer: torch.optim.Optimizer,
                    scaler_state: dict[str, Any] | None, config_yaml: str, keep: int,
                    rng_states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> Path:
    """Write iter_<step>/ atomically, point last_checkpoint at it, and prune old ones (never the newest).
    `rng_states` holds every process's random states, by rank, so each resumes its own dropout stream."""
    final = work_dir / f"iter_{state.step}"
    tmp = work_dir / f".iter_{state.step}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, tmp)
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors = {f"rank{r}.{k}": t for r, (tensors, _) in enumerate(rng_states) for k, t in tensors.items()}
        rng_meta = [meta for _, meta in rng_states]
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {**asdict(state), "rng": rng_meta, "scaler": scaler_state, "saved_at": time.time()}
        delay = float(os.environ.get("TUNELAB_DEBUG_SLOW_SAVE", "0") or 0)  # fault-injection hook for tests
        if delay:
            time.sleep(delay)
        # trainer_state.json is written last: its presence marks a complete checkpoint.
        (tmp / "trainer_state.json").write_text(json.dumps(meta))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = work_dir / f".{POINTER}.tmp{os.getpid()}"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, work_dir / POINTER)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(work_dir)
        kept = f"; the previous checkpoint {prev} is intact" if prev else ""
        raise TrainingError(f"could not save checkpoint {final}: {_failure_reason(e)}{kept}") from None
    prune(work_dir, keep, newest=final)
    return final


def save_weights(model: Any, folder: Path) -> None:
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(folder), safe_serialization=True)
    else:
        model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="2GB")


def prune(work_dir: Path, keep: int, newest: Path) -> None:
    if keep < 0:
        return
    for p in list_checkpoints(work_dir)[:-keep] if keep else []:
        if p != newest:
            shutil.rmtree(p, ignore_errors=True)


def clean_partial(work_dir: Path) -> list[Path]:
    """Remove temporary folders left by a save that was killed; return what was removed."""
    removed = []
    if work_dir.is_dir():
        for p in work_dir.glob(".iter_*.tmp*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------- loading


def load_state(ckpt: Path) -> tuple[TrainState, dict[str, Any]]:
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    extra = {k: meta.pop(k) for k in ("rng", "scaler", "saved_at") if k in meta}
    return TrainState(**meta), extra


def load_weights(model: Any, ckpt: Path) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        f = ckpt / "adapter_model.safetensors"
        if not f.exists():
            raise CheckpointError(f"{ckpt} holds no adapter_model.safetensors (was it a full fine-tuning run?)")
        try:
            result = set_peft_model_state_dict(model, load_file(str(f)))
        except RuntimeError as e:  # size mismatch: the adapter settings (r, targets) changed
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:200])
            raise CheckpointError(f"{f} does not fit this model's adapters: {detail[:240]}") from None
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{f} does not match this model's adapters: {result.unexpected_keys[:3]}")
        return
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt} holds no model*.safetensors (was it a LoRA run?)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{ckpt} does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {unexpected[:3]}")


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    meta = json.loads((ckpt / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, v in meta["scalars"].items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def restore_rng(ckpt: Path, rng_meta: list[dict[str, Any]], rank: int, device: torch.device) -> None:
    """Restore this process's random states (rank 0's when the checkpoint came from fewer processes)."""
    if rank >= len(rng_meta):
        rank = 0
    tensors = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(tensors[f"rank{rank}.torch_cpu"])
    if device.type == "cuda" and f"rank{rank}.torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rank{rank}.torch_cuda"], device)
    py = rng_meta[rank]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rng_meta[rank]["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]
