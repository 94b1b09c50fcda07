"""Checkpoints: one `iter_N/` folder per save, written to a temporary folder and renamed into place, with a
`last_checkpoint` pointer that only ever names a complete one.

A checkpoint holds the trainable weights (a PEFT adapter folder, or the full model as sharded safetensors),
the optimizer state by parameter name (safetensors + JSON; or, where gathering it would not fit, each process's
shard in optimizer/, see train/named_state.py), RNG states, the data position and the resolved config. Nothing
is pickled; nothing is loaded with torch.load.

Saving is two halves: the run gathers a `Payload` (full CPU tensors by name; collective, train/named_state.py),
then rank 0 writes it here, on a background thread (train/saving.py): writing touches no live tensor.
Loading checks names and shapes against the model from the files' headers on every process, then reads the
tensors where the caller says (rank 0 of a distributed run) for parallel.py to broadcast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tunelab.cache import umask_permissions
from tunelab.errors import CheckpointError, TrainingError

POINTER = "last_checkpoint"
OPTIMIZER_SHARDS = "optimizer"  # the folder of a sharded optimizer state
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


@dataclass
class Payload:
    """Everything a checkpoint holds that the run must gather first; full CPU tensors, keyed by name."""

    weights: dict[str, torch.Tensor]  # trainable parameters (LoRA) or the whole model
    optimizer: dict[str, Any]  # {"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}
    rng_states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]  # every process's, by rank
    scaler: dict[str, Any] | None
    # sharded optimizer state, already written by every process (then `optimizer` holds only param_groups and
    # scalars): the folder it lies in, and over how many processes
    optimizer_shards: Path | None = None
    world_size: int = 1


def staging_folder(work_dir: Path, step: int) -> Path:
    """Where every process writes its optimizer shard before rank 0 moves it into the checkpoint (a name
    clean_partial removes when a save is killed)."""
    return work_dir / f".iter_{step}.tmp-optimizer"


def _optimizer_tensors(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{name}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"state.{name}.{k}"] = v
    return tensors, {"format": "by_name", "param_groups": osd["param_groups"], "scalars": scalars}


def _failure_reason(e: Exception) -> str:
    # safetensors reports a full disk as "Error while serializing: I/O error: ... (os error 28)"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if "os error 28" in text:
        return "No space left on device"
    return (text.splitlines() or [type(e).__name__])[0][:200]


def save_checkpoint(work_dir: Path, state: TrainState, model: Any, payload: Payload, config_yaml: str,
                    keep: int) -> Path:
    """Write iter_<step>/ atomically, point last_checkpoint at it, and prune old ones (never the newest).
    `model` gives only its config and adapter settings; the tensors come from `payload`. The RNG states of every
    process are kept by rank, so each resumes its own dropout stream."""
    final = work_dir / f"iter_{state.step}"
    tmp = work_dir / f".iter_{state.step}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, tmp, payload.weights)
        if payload.optimizer_shards is not None:
            os.replace(payload.optimizer_shards, tmp / OPTIMIZER_SHARDS)
            opt_meta = {"format": "sharded", "world_size": payload.world_size, **payload.optimizer}
        else:
            opt_tensors, opt_meta = _optimizer_tensors(payload.optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors = {f"rank{r}.{k}": t for r, (tensors, _) in enumerate(payload.rng_states)
                       for k, t in tensors.items()}
        rng_meta = [meta for _, meta in payload.rng_states]
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {**asdict(state), "rng": rng_meta, "scaler": payload.scaler, "saved_at": time.time()}
        delay = float(os.environ.get("TUNELAB_DEBUG_SLOW_SAVE", "0") or 0)  # fault-injection hook for tests
        if delay:
            time.sleep(delay)
        # trainer_state.json is written last: its presence marks a complete checkpoint.
        (tmp / "trainer_state.json").write_text(json.dumps(meta))
        umask_permissions(tmp)  # safetensors leaves its files 0600; a job running as another user reads these
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = work_dir / f".{POINTER}.tmp{os.getpid()}"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, work_dir / POINTER)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if payload.optimizer_shards is not None:
            shutil.rmtree(payload.optimizer_shards, ignore_errors=True)
        prev = latest_checkpoint(work_dir)
        kept = f"; the previous checkpoint {prev} is intact" if prev else ""
        raise TrainingError(f"could not save checkpoint {final}: {_failure_reason(e)}{kept}") from None
    prune(work_dir, keep, newest=final)
    return final


def save_weights(model: Any, folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """An adapter folder (PEFT names the tensors) or a sharded model folder, from gathered full tensors."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(folder), state_dict=weights, safe_serialization=True)
    else:
        model.save_pretrained(str(folder), state_dict=weights, safe_serialization=True, max_shard_size="2GB")


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


def read_weights(model: Any, ckpt: Path, load: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's trainable weights keyed by the model's parameter names, checked against the model from
    the files' headers (every process does this); the tensors themselves only where `load` is true."""
    params = dict(model.named_parameters())
    if hasattr(model, "peft_config"):
        f = ckpt / "adapter_model.safetensors"
        if not f.exists():
            raise CheckpointError(f"{ckpt} holds no adapter_model.safetensors (was it a full fine-tuning run?)")
        files, names = [f], _adapter_names(model)
        where = f"{f} does not fit this model's adapters"
    else:
        files = sorted(ckpt.glob("model*.safetensors"))
        if not files:
            raise CheckpointError(f"{ckpt} holds no model*.safetensors (was it a LoRA run?)")
        names = {n: n for n in params}
        where = f"{ckpt} does not match the model"
    # a tied output head is the embedding: saved or not, it is set through the embedding
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    shapes = {k: v for k, v in _shapes(files).items() if k not in tied or k in names}
    unexpected = sorted(k for k in shapes if k not in names)
    if unexpected:
        raise CheckpointError(f"{where}: unexpected {unexpected[:3]}")
    for key, shape in shapes.items():
        want = list(params[names[key]].shape)
        if shape != want:
            raise CheckpointError(f"{where}: size mismatch for {key}: the checkpoint has {shape}, the model {want}")
    trained = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trained - {names[k] for k in shapes} - tied)
    if missing:
        raise CheckpointError(f"{where}: missing {missing[:3]}")
    if not load:
        return {}
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({names[k]: t for k, t in load_file(str(f)).items() if k in shapes})
    return out


def _shapes(files: list[Path]) -> dict[str, list[int]]:
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys = fh.keys()
            shapes.update({k: list(fh.get_slice(k).get_shape()) for k in keys})
    return shapes


def _adapter_names(model: Any) -> dict[str, str]:
    """Adapter-file key -> parameter name. PEFT renames when it saves (drops the adapter name, and more for some
    methods); asking it to rename numbered stand-ins gives the exact inverse."""
    from peft.utils import get_peft_model_state_dict

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    tags = {n: torch.tensor(i) for i, n in enumerate(trainable)}
    return {k: trainable[int(v)] for k, v in get_peft_model_state_dict(model, state_dict=tags).items()}


def sharded_optimizer(ckpt: Path) -> int | None:
    """The number of processes whose shards hold this checkpoint's optimizer state (None: saved whole)."""
    meta = json.loads((ckpt / "optimizer.json").read_text())
    return meta["world_size"] if meta.get("format") == "sharded" else None


def read_optimizer(ckpt: Path, names: list[str], load: bool) -> dict[str, Any]:
    """Optimizer state by parameter name. `names`: the optimizer's parameters in order, to check the file
    against (and to read checkpoints from before names were saved, which kept positions). A sharded state gives
    only its param groups and scalars, on every process (named_state.load_sharded_optimizer reads the rest)."""
    meta = json.loads((ckpt / "optimizer.json").read_text())
    groups = meta["param_groups"]
    by_position = "format" not in meta  # checkpoints from before names were saved
    if by_position:
        groups = [{**g, "params": [names[int(i)] for i in g["params"] if int(i) < len(names)]} for g in groups]
    saved = [n for g in groups for n in g["params"]]
    if saved != names:
        extra, lost = sorted(set(saved) - set(names)), sorted(set(names) - set(saved))
        raise CheckpointError(f"{ckpt / 'optimizer.json'} is for other parameters than this model trains "
                              f"(only in the checkpoint: {extra[:2]}; only in the model: {lost[:2]})")
    if meta.get("format") == "sharded":
        return {"param_groups": groups, "scalars": meta["scalars"]}
    if not load:
        return {}
    state: dict[str, dict[str, Any]] = {}
    items = list(load_file(str(ckpt / "optimizer.safetensors")).items()) + list(meta["scalars"].items())
    for key, v in items:
        owner, name = key.removeprefix("state.").rsplit(".", 1)
        state.setdefault(names[int(owner)] if by_position else owner, {})[name] = v
    return {"state": state, "param_groups": groups}
