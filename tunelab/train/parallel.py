"""How a run spreads over processes, in one place. The loop calls this module and never asks which strategy runs.

A plain `tunelab train` is one process. `torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint ...] -m tunelab
train` starts N processes per node; each reads RANK/WORLD_SIZE/LOCAL_RANK, joins the process group (NCCL for GPU
tensors, gloo for CPU ones) and trains on its share of every optimizer step's rows. The strategy
(`train.strategy`, or XTuner's `--deepspeed NAME`; see config/schema.py STRATEGIES):

- ddp: DistributedDataParallel around the loss module; every process holds the whole model and optimizer state.
- zero1/zero2: FSDP2 (`fully_shard`) with reshard_after_forward=False: the parameters are gathered at a step's first
  forward and kept until its last backward; gradients are reduced once per step; optimizer state is sharded. In
  one process there is nothing to split: they train as the plain run.
- zero3: FSDP2 gathers each decoder layer just before it runs and frees it after; gradients are reduce-scattered
  every micro-batch, so no process ever holds a full set of them.
- *_offload: as above with CPUOffloadPolicy: sharded parameters, gradients and optimizer state live in CPU memory
  and AdamW steps there; they run FSDP2 in one process too.

Sharding wraps each decoder layer, then the loss module as the root. The embeddings, final norm and output head
belong to the root, whose forward *is* the loss computation (train/loss.py), so they are gathered whenever the
loss function calls the decoder and the head. Generation goes through `unsharded()`.

Weights: a sharded run builds the model on the meta device on every process but rank 0 and fills each
process's shards from rank 0 by broadcast, so host memory holds one full copy, not N. QLoRA: every process loads
its own 4-bit copy straight onto its GPU (torchao's NF4Tensor across processes: `Parallel.nf4_format`). State
dicts travel by parameter name (train/named_state.py).

Every choice that shapes the collectives a step makes (activation checkpointing, compile, Liger) must be the same
on every process, or their collectives stop pairing up: `min_over_ranks` lets all decide from the same number,
`check_same` refuses a run whose processes still disagree.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tunelab.config.schema import STRATEGIES
from tunelab.errors import ModelError, TrainingError


@dataclass
class Parallel:
    strategy: str = "ddp"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None
    owns_group: bool = False  # this module started the process group, so it also ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Several processes take part."""
        return self.world_size > 1

    @property
    def shards(self) -> bool:
        """FSDP2 wraps the model: under zero3 and the offload strategies always, under zero1 and zero2 across
        several processes only. In one process FSDP2 has nothing to split, and the plain run is the same training,
        faster: XTuner's one-GPU tutorial passes --deepspeed deepspeed_zero2, and one-process FSDP2 ran its QLoRA at
        1/8.7 of the plain run's speed and 1.6x its memory on an H100 (BENCHMARKS.md). The offload strategies do
        something in one process (state in CPU memory); zero3 there still runs FSDP2, with a warning (set_up)."""
        return self.strategy.startswith("zero") and (self.enabled or self.offload or self.strategy.startswith("zero3"))

    @property
    def offload(self) -> bool:
        return self.strategy.endswith("_offload")

    @property
    def uses_ddp(self) -> bool:
        return self.enabled and not self.shards

    @property
    def distributed(self) -> bool:
        """A process group exists (several processes, or a sharded strategy in one)."""
        return self.enabled or self.shards

    @property
    def param_device(self) -> torch.device:
        """Where the trainable (sharded) parameters and their optimizer state live."""
        return torch.device("cpu") if self.offload else self.device

    def loads_weights(self, quantized: bool) -> bool:
        """Does this process read the weights from disk (the others build on the meta device)? Quantized weights
        are loaded by every process: each needs its own quantization state, and 4-bit copies are small."""
        return not self.shards or quantized or self.is_main

    def nf4_format(self, requested: str, dora: bool = False) -> str:
        """Where nf4 weights are stored. "auto": torchao's NF4Tensor where several processes shard them (FSDP2
        gathers it inside the compiled step: 1.6x bitsandbytes' speed, model/nf4.py), bitsandbytes elsewhere.
        One sharding process (zero3_offload on one GPU) keeps bitsandbytes, packed in the compute dtype: FSDP2's
        one-process shortcut cannot rebuild an NF4Tensor (torch 2.11 to 2.13). DoRA keeps bitsandbytes too: peft
        de-quantizes torchao weights through a method NF4Tensor defines differently (the config refuses both)."""
        one_sharding = self.shards and not self.enabled
        if requested == "torchao" and one_sharding:
            raise TrainingError(f"model.nf4_format torchao with strategy {self.strategy} in one process: FSDP2 "
                                "cannot gather torchao's NF4 weights in a one-process group; use model.nf4_format "
                                "auto (bitsandbytes here) or several processes")
        if requested != "auto":
            return requested
        return "torchao" if self.shards and self.enabled and not dora else "bitsandbytes"

    def describe(self) -> str:
        how = STRATEGIES[self.strategy] if (self.shards or self.enabled) else "one process"
        if self.strategy != "ddp" and not self.shards:
            how = "nothing to shard in one process: trains as the plain run"
        return f"strategy {self.strategy} over {self.world_size} process{'es' if self.enabled else ''} ({how})"


def setup(strategy: str, device: torch.device) -> Parallel:
    """Join the process group torchrun describes (or start a one-process group for zero3 or an offload strategy in
    one process; one-process zero1/zero2 train as the plain run and start none). TUNELAB_DIST_TIMEOUT
    (seconds, default 1800) bounds any wait on another process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    par = Parallel(strategy, int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), device)
    if device.type == "cuda" and world > 1:
        par.device = torch.device("cuda", par.local_rank)
        torch.cuda.set_device(par.device)
    if not par.distributed:
        return par
    if not dist.is_initialized():
        # GPU runs also get gloo for CPU tensors (offloaded shards, small objects)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get("TUNELAB_DIST_TIMEOUT", "1800")))
        if world > 1:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        par.owns_group = True
    if par.shards:
        from torch.distributed.device_mesh import init_device_mesh

        par.mesh = init_device_mesh(par.device.type, (world,))
    return par


def teardown(par: Parallel) -> None:
    """Leave the process group. Everything that holds it (the mesh, sharded tensors) must be gone first: a gloo
    group still referenced at interpreter exit aborts the process ("terminate called without an active
    exception") instead of letting it exit with its own code."""
    par.mesh = None
    gc.collect()
    if par.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        par.owns_group = False


# ---------------------------------------------------------------------------------------------- wrapping


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the classes a transformers model names as never to be split."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ModelError(f"cannot shard {type(base).__name__}: it names no decoder layer class (_no_split_modules)")
    return layers


def wrap(par: Parallel, loss_module: torch.nn.Module, model: torch.nn.Module, compute_dtype: torch.dtype,
         filled_on_rank0: bool) -> torch.nn.Module:
    """The module the step calls. `model` sits inside `loss_module`; `filled_on_rank0`: only rank 0 holds
    weights (the others built on the meta device) and the shards are filled from it."""
    if par.shards:
        _shard(par, loss_module, model, compute_dtype, filled_on_rank0)
        return loss_module
    if par.uses_ddp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(loss_module, device_ids=[par.device.index] if par.device.type == "cuda"
                                       else None)
    return loss_module


def _shard(par: Parallel, root: torch.nn.Module, model: torch.nn.Module, compute_dtype: torch.dtype,
           filled_on_rank0: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    full = model.state_dict() if filled_on_rank0 and par.is_main else {}
    low = compute_dtype if compute_dtype != torch.float32 else None
    # compute in bf16, but reduce gradients in fp32 so N processes' sums lose nothing
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    offload = CPUOffloadPolicy(pin_memory=par.device.type == "cuda") if par.offload else OffloadPolicy()
    keep = par.strategy.startswith(("zero1", "zero2"))
    opts = {"mesh": par.mesh, "reshard_after_forward": not keep, "mp_policy": mp, "offload_policy": offload}
    for layer in decoder_layers(model):
        fully_shard(layer, **opts)
    fully_shard(root, **opts)
    if not filled_on_rank0:
        return
    if not par.is_main:
        root.to_empty(device=par.param_device)
        for m in root.modules():  # buffers (rotary tables) live with the compute, whatever the parameters do
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = b.to(par.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for _, b in sorted(model.named_buffers(), key=lambda nb: nb[0]):  # non-persistent ones are in no state dict
        dist.broadcast(b, src=0)
    del full


# ---------------------------------------------------------------------------------------------- the step


@contextmanager
def micro_batch(par: Parallel, module: torch.nn.Module, last: bool) -> Iterator[None]:
    """Gradient synchronisation during accumulation: DDP and zero1/2 reduce once, after the step's last
    micro-batch; zero3 reduce-scatters every micro-batch (holding full gradients would defeat it)."""
    if par.shards and par.strategy.startswith(("zero1", "zero2")):
        module.set_requires_gradient_sync(last)
        module.set_reshard_after_backward(last)  # keep the gathered parameters for the next micro-batch
        yield
    elif par.uses_ddp and not last:
        with module.no_sync():
            yield
    else:
        yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to the global gradient norm and return it (a tensor: reading it is the caller's one host sync). Sharded
    gradients are DTensors: their norms are partial sums until `full_tensor()` adds up every process's part."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@contextmanager
def unsharded(par: Parallel, module: torch.nn.Module) -> Iterator[None]:
    """Generation outside the loss module's forward: gather the root's parameters (embeddings, head) for the
    duration; the decoder layers gather themselves as they run. Every process must enter (it is collective)."""
    if not par.shards:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    module.unshard()
    try:
        yield
    finally:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def mark_generation_synced(par: Parallel, model: torch.nn.Module) -> None:
    """transformers' generate keeps every process stepping until all are done (synced_gpus) for models it sees
    as FSDP-managed; a process that stopped early would leave the others waiting in a gather."""
    if par.shards and par.enabled:
        for m in (model, getattr(model, "get_base_model", lambda: None)()):
            if m is not None:
                m._is_fsdp_managed_module = True


def local_numel(tensors: Any) -> int:
    """Elements this process holds (its shard of a DTensor, all of a plain tensor)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors)


# ---------------------------------------------------------------------------------------------- collectives


def all_reduce_sum(value: torch.Tensor, par: Parallel) -> torch.Tensor:
    if par.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_flag(flag: bool, par: Parallel) -> bool:
    """True on every process if any says so (a signal seen by one stops all at the same step)."""
    if not par.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=par.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, par: Parallel) -> list[Any]:
    """Every process's `obj`, by rank (pickled in memory by torch.distributed, never written to a file)."""
    if not par.enabled:
        return [obj]
    out: list[Any] = [None] * par.world_size
    dist.all_gather_object(out, obj)
    return out


def min_over_ranks(value: float, par: Parallel) -> float:
    """The smallest of every process's `value` (each process's own where there is one)."""
    if not par.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=par.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def check_same(what: str, value: str, par: Parallel) -> None:
    """Refuse a run whose processes chose differently (nodes set up differently: another GPU, a missing package)."""
    values = gather_objects(value, par)
    if any(v != values[0] for v in values):
        differ = next(r for r, v in enumerate(values) if v != values[0])
        raise TrainingError(f"the processes of this run chose different {what}: rank 0 {values[0]!r}, rank {differ} "
                            f"{values[differ]!r}; set them in the config (or install the same packages everywhere)")


def barrier(par: Parallel) -> None:
    if par.enabled:
        dist.barrier()


@contextmanager
def node_leader_first(par: Parallel) -> Iterator[None]:
    """Run the body on each node's local rank 0 first (it fills the node's caches), then on the others."""
    if par.local_rank != 0:
        barrier(par)
    yield
    if par.local_rank == 0:
        barrier(par)
