"""Model and optimizer state by parameter name, across the processes of a run.

Saving gathers full CPU tensors on rank 0, the only process that writes; loading reads them on rank 0 and
broadcasts them into every process's shards. Optimizer state whose gathered copy would not fit rank 0's memory
(AdamW holds two fp32 values per trained weight: 56 GB for a 7B full fine-tune) is instead written by every
process, its own shard only, with torch.distributed.checkpoint in safetensors files (the Hugging Face storage
layout: offsets in each file's header, no pickled metadata), and read back by the same number of processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import CheckpointError, TrainingError
from tunelab.train.parallel import Parallel, min_over_ranks

# Optimizer state larger than this (bytes, with the gathered weights) is saved sharded; default: half the
# host memory available when the checkpoint is taken.
GATHER_LIMIT_ENV = "TUNELAB_GATHER_LIMIT_BYTES"
# A shard file is assembled in memory before it is written: files of about this size bound that copy.
SHARD_FILE_BYTES = 1 << 30


def gather_weights(par: Parallel, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full CPU tensors by parameter name on rank 0, {} on the others. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    full = get_model_state_dict(model, options=opts)
    # a tied weight (the output head that is the embedding) arrives once per name, as separate copies: keep one
    kept = dict(model.named_parameters())
    return {k: v for k, v in full.items() if k in kept or not _is_tied_alias(model, k)}


def _is_tied_alias(model: torch.nn.Module, name: str) -> bool:
    return any(n == name for n, _ in model.named_parameters(remove_duplicate=False))


def gather_optimizer(par: Parallel, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"state": {name: {key: tensor}}, "param_groups": [{..., "params": [names]}]} on rank 0, {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return osd if par.is_main else {}


def load_weights(par: Parallel, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set parameters by name from `state` (read on rank 0 only when distributed; the others pass {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=par.distributed)
    set_model_state_dict(model, state, options=opts)


def load_optimizer(par: Parallel, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=par.distributed)
    set_optimizer_state_dict(model, optimizer, state, options=opts)


# ---------------------------------------------------------------------------------------------- sharded optimizer


def shard_optimizer_on_save(par: Parallel, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            trainable_only: bool) -> bool:
    """Would gathering this checkpoint (weights + optimizer state) take more than half of rank 0's available host
    memory? Only sharded runs can avoid it. Every process gets the same answer (collective)."""
    if not par.shards:
        return False
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    need = sum(t.numel() * t.element_size() for t in params + state)  # a DTensor's numel is the full one
    given = os.environ.get(GATHER_LIMIT_ENV)
    if given is None:
        import psutil

        limit = psutil.virtual_memory().available / 2 if par.is_main else float("inf")
    else:
        try:
            limit = float(given)
        except ValueError:
            raise TrainingError(f"{GATHER_LIMIT_ENV}={given!r}: give a number of bytes") from None
    return need > min_over_ranks(limit, par)


def _flat(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            (tensors if torch.is_tensor(v) else scalars)[f"state.{name}.{k}"] = v
    return tensors, scalars


def save_sharded_optimizer(par: Parallel, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           folder: Path) -> dict[str, Any]:
    """Every process writes its shard of the optimizer state into `folder` (collective). Returns what
    optimizer.json records beside it: the param groups by name and any non-tensor state."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)  # this process's shards, no gathering
    tensors, scalars = _flat(osd)
    files = _file_index(tensors, SHARD_FILE_BYTES)
    save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=files,
                                                          save_distributed=True))
    return {"param_groups": osd["param_groups"], "scalars": scalars}


def _file_index(tensors: dict[str, torch.Tensor], most: int) -> dict[str, int]:
    """Key -> file number (from 1), in order, starting a new file where this process's part would pass `most`
    bytes (rank 0's split is every process's: their shards are the same size)."""
    index, files, size = {}, 1, 0
    for key, t in tensors.items():
        n = (t.to_local() if hasattr(t, "to_local") else t).nbytes
        if size and size + n > most:
            files, size = files + 1, 0
        index[key], size = files, size + n
    return index


def load_sharded_optimizer(par: Parallel, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                           saved: dict[str, Any]) -> None:
    """Every process reads its shard back from `folder`; `saved`: the param groups and non-tensor state from
    optimizer.json (checkpoint.read_optimizer)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)  # empty state is created first: tensors to read into
    tensors, _ = _flat(osd)
    try:
        load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (a reader fails in its own ways)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise CheckpointError(f"{folder}: the optimizer shards cannot be read ({reason})") from None
    for key, v in [*tensors.items(), *saved["scalars"].items()]:
        owner, name = key.removeprefix("state.").rsplit(".", 1)
        osd["state"][owner][name] = v
    osd["param_groups"] = saved["param_groups"]
    set_optimizer_state_dict(model, optimizer, osd)
