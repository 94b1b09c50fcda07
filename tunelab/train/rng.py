"""A process's random states (CPU, its GPU, Python, NumPy), taken for a checkpoint and restored on resume, so a
resumed run draws the same dropout masks and the same data order as an uninterrupted one."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file


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
