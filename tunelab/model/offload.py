"""Memory for very long rows: activation checkpointing whose saved layer inputs go to CPU memory when the GPU
has no room for them, and an MLP computed in sequence tiles so its wide intermediates never exist whole.

At 350k tokens of a Llama-3-8B shape each decoder layer's input is 2.9 GB, 92 GB for 32 layers: more than the
GPU holds even with checkpointing. Each checkpointed layer keeps its input on the GPU while the budget allows and
moves it to CPU memory otherwise; the backward pass brings it back, recomputes the layer and runs its backward
(the way reentrant checkpointing works). The MLP's intermediates (14336 wide, 10 GB each at 350k tokens) are
computed a tile of rows at a time, forward and backward, so only one tile's worth lives at once.

Both replay the random state (LoRA dropout) and the autocast state of the forward pass, so gradients equal
those of the plain model (tests/model/test_offload.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

# Rows of one MLP tile: small enough that the 3-4 intermediates of a tile stay near 1 GB on an 8B shape.
MLP_TILE_TOKENS = 16384


@dataclass
class OffloadPolicy:
    """Keep a layer input on the GPU only while `reserve_factor` x its size (the recompute and backward of one
    layer) plus `reserve_bytes` stay free; else keep it in CPU memory."""

    reserve_factor: float = 14.0
    reserve_bytes: int = 3 << 30
    offloaded: int = field(default=0, init=False)  # counts, for the log and the benchmark
    kept: int = field(default=0, init=False)
    tuple_out: bool = field(default=False, init=False)  # older transformers layers return (hidden,)

    def keep_on_device(self, t: torch.Tensor) -> bool:
        if t.device.type != "cuda":
            return True
        total = torch.cuda.get_device_properties(t.device).total_memory
        need = t.nbytes * (1 + self.reserve_factor) + self.reserve_bytes
        return torch.cuda.memory_allocated(t.device) + need <= total


def _autocast_state(device: torch.device) -> dict[str, Any]:
    kind = device.type
    return {"device_type": kind, "enabled": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind)}


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _fork_rng(device: torch.device) -> Any:
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Callable, policy: OffloadPolicy, hidden: torch.Tensor, _grad_anchor: torch.Tensor
                ) -> torch.Tensor:
        ctx.run, ctx.device = run, hidden.device
        ctx.autocast, ctx.rng = _autocast_state(hidden.device), _rng_state(hidden.device)
        if policy.keep_on_device(hidden):
            ctx.stash = hidden.detach()
            policy.kept += 1
        else:
            ctx.stash = hidden.detach().to("cpu")
            policy.offloaded += 1
        with torch.no_grad():
            out = run(hidden)
        policy.tuple_out = isinstance(out, (tuple, list))
        return _first(out).detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor, None]:
        hidden = ctx.stash.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.stash = None
        with torch.enable_grad(), _fork_rng(ctx.device), torch.autocast(**ctx.autocast):
            _set_rng_state(ctx.device, ctx.rng)
            out = _first(ctx.run(hidden))
        torch.autograd.backward(out, grad)
        return None, None, hidden.grad, None


def offloaded_checkpoint(policy: OffloadPolicy, run: Callable, hidden: torch.Tensor, *args: Any) -> Any:
    """Drop-in for transformers' `_gradient_checkpointing_func(layer_forward, hidden_states)`."""
    if args:
        raise TypeError("offloaded checkpointing takes the hidden states as the only positional argument")
    # A tensor that requires grad, so the layer's backward runs even when its input does not (frozen
    # embeddings): the LoRA weights inside the layer still need their gradients.
    anchor = torch.ones((), requires_grad=True)
    out = _OffloadedCheckpoint.apply(run, policy, hidden, anchor)
    return (out,) if policy.tuple_out else out


def enable_offloaded_checkpointing(layers: list[torch.nn.Module], policy: OffloadPolicy) -> None:
    """Checkpoint every decoder layer through `offloaded_checkpoint` (transformers' GradientCheckpointingLayer)."""
    fn = partial(offloaded_checkpoint, policy)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = fn


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable, tile: int, x: torch.Tensor, _grad_anchor: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.tile = fn, tile
        ctx.autocast, ctx.rng = _autocast_state(x.device), _rng_state(x.device)
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for s in range(0, x.shape[1], tile):
                y = fn(x[:, s:s + tile])
                if out is None:
                    out = x.new_empty((*x.shape[:2], y.shape[-1]), dtype=y.dtype)
                out[:, s:s + tile] = y
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        gx = torch.empty_like(x)
        # Same tiles in the same order as the forward pass: dropout draws the same masks.
        with _fork_rng(x.device):
            _set_rng_state(x.device, ctx.rng)
            for s in range(0, x.shape[1], ctx.tile):
                xt = x[:, s:s + ctx.tile].detach().requires_grad_(True)
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    y = ctx.fn(xt)
                torch.autograd.backward(y, grad[:, s:s + ctx.tile])
                gx[:, s:s + ctx.tile] = xt.grad
        return None, None, gx, None


def tile_mlps(mlps: list[torch.nn.Module], tile: int = MLP_TILE_TOKENS) -> None:
    """Run each MLP a tile of `tile` rows at a time when a row is longer than one tile."""
    for mlp in mlps:
        inner = mlp.forward

        def forward(x: torch.Tensor, _inner: Callable = inner) -> torch.Tensor:
            if x.dim() != 3 or x.shape[1] <= tile:
                return _inner(x)
            if not torch.is_grad_enabled():  # the forward pass of a checkpointed layer: tiles bound the peak too
                return torch.cat([_inner(x[:, s:s + tile]) for s in range(0, x.shape[1], tile)], dim=1)
            return _TiledMLP.apply(_inner, tile, x, torch.ones((), requires_grad=True))

        mlp.forward = forward
