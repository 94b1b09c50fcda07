"""One room for speed: the attention backend, Liger kernels, activation checkpointing (or its CPU-offloaded
form), regional torch.compile, and the FLOP count behind the log's MFU.

Every setting defaults to "auto", and on a GPU "auto" is the fast path (BENCHMARKS.md has the measurements):
- attention: flex attention for packed rows up to 32k tokens (its block mask skips the blocks where documents
  do not see each other); SDPA (FlashAttention) for longer rows, which are one document anyway;
- Liger's fused linear cross-entropy for the loss (the logits never exist whole), and Liger's RMSNorm, RoPE and
  SwiGLU kernels where the layers are not compiled (compile fuses those itself);
- each decoder layer compiled by torch.compile, once for all layers, with the compile cache kept under
  ~/.cache/tunelab so a second run starts fast;
- CUDA graphs on top for LoRA and QLoRA micro-batches of up to 4,096 tokens with unsharded weights (one
  process or DDP), whose steps are many short kernels launched one by one (the low-rank matmuls of every layer;
  4-bit dequantisation). LoRA keeps its activations there; QLoRA (memory first) checkpoints inside the compiled
  layers, a recompute the graphs replay with the forward's dropout masks. Flex attention's block mask stays in
  the same tensors from one micro-batch to the next (model/block_mask.py; where a model's mask is not plain
  causal, SDPA, whose mask the graphs copy in);
- activation checkpointing only where needed: for the other QLoRA runs (their point is memory), else when the
  estimated activations of one micro-batch would not fit; checkpointed layer inputs go to CPU memory (and the MLP
  runs in tiles) when even checkpointing would not fit, for rows of 100k+ tokens.
On the CPU "auto" keeps the plain eager path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tunelab.errors import ModelError
from tunelab.model.adapters import enable_checkpointing, merged_for_generation, real_numel
from tunelab.model.block_mask import supports_static_mask

# Rows longer than this are one long document in practice; FlashAttention (SDPA) is faster there than flex.
FLEX_MAX_ROW = 32768
# "auto" takes CUDA graphs for LoRA and NF4 QLoRA micro-batches up to this many tokens: launch-bound steps (through
# `tunelab train` on an H100, BENCHMARKS.md: tutorial QLoRA 1x1024, 21.5k tok/s against 4.0k with checkpointing;
# 1.8B LoRA 1x4096, GPU busy 68% of the step without graphs, 52.7k tok/s with them against 44.2k).
CUDAGRAPHS_MAX_TOKENS = 4096
# Saved activations per token per decoder layer without checkpointing, in units of (hidden + intermediate
# size) x bytes per element; calibrated on the 1.8B shape (BENCHMARKS.md).
NO_CKPT_ACT_FACTOR = 4.0
# Dense bf16 peak of the GPU (datasheet), for MFU. Matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0, "4090": 165.0, "B200": 2250.0, "GB200": 2500.0}


@dataclass
class SpeedPlan:
    """What prepare_for_training chose; `describe()` is the line the training log prints."""

    attention: str
    liger_loss: bool = False
    liger_layers: bool = False
    compiled: bool = False
    cudagraphs: bool = False
    static_mask: bool = False  # flex attention's block mask built by tunelab, in fixed tensors (CUDA graphs)
    checkpointing: str = "off"  # "off" | "full" | "offload" | "compiled" (inside the compiled layers)

    def describe(self) -> str:
        parts = [self.attention]
        if self.compiled:
            parts.append("compiled layers" + (" (CUDA graphs)" if self.cudagraphs else ""))
        if self.liger_layers or self.liger_loss:
            parts.append("Liger " + ("kernels + fused loss" if self.liger_layers else "fused loss"))
        parts.append({"off": "no activation checkpointing", "full": "activation checkpointing",
                      "compiled": "activation checkpointing inside the compiled layers",
                      "offload": "activation checkpointing offloaded to CPU, tiled MLP"}[self.checkpointing])
        return ", ".join(parts)


def choose_attention(requested: str, device: torch.device, max_length: int = 0) -> str:
    """The one place the attention backend is picked. All choices keep packed samples apart (position ids)."""
    if requested != "auto":
        if requested == "flex_attention" and device.type != "cuda":
            raise ModelError("attn_implementation 'flex_attention' needs a CUDA GPU; use sdpa on CPU")
        return requested
    if device.type == "cuda" and max_length <= FLEX_MAX_ROW:
        return "flex_attention"
    return "sdpa"


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_for_training(model: Any, settings: Any, device: torch.device, tokens_per_micro_batch: int,
                         memory_budget: float | None = None, free: float | None = None,
                         sharded: bool = False, packed: bool = True) -> SpeedPlan:
    """Apply the speed settings of `settings` (config.schema.ModelSettings) to a model that already has its
    adapters (or is fully trainable). Call once, before the optimizer is built and before model.train().
    `memory_budget` (0..1, compiled layers only) lets the compiler recompute activations to save memory.
    `free`: the memory left for activations (default: `free_memory` here); several processes pass the same
    number, since the plan decides which collectives a sharded step makes. `sharded`: FSDP2 will shard the
    weights; `packed`: rows are packed to the maximum length (both for choose_cudagraphs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cuda = device.type == "cuda"
    plan = SpeedPlan(attention=getattr(base.config, "_attn_implementation", "sdpa"))
    layers = decoder_layers(base)
    free = free_memory(model, device) if free is None else free
    graphs = choose_cudagraphs(settings, model, device, tokens_per_micro_batch, free, sharded, packed)
    plan.checkpointing = choose_checkpointing(settings, model, device, tokens_per_micro_batch, free)
    if plan.checkpointing == "offload" and not layers:  # nothing to offload layer by layer
        from tunelab import ui

        ui.warn("offload_layers", "no decoder layers found to offload their inputs to CPU memory: "
                "transformers' activation checkpointing instead")
        plan.checkpointing = "full"
    if graphs and plan.checkpointing != "off" and layers:
        # CUDA graphs cannot replay a recompute started from outside the compiled layers, so the layers checkpoint
        # inside their compiled region (QLoRA's "auto", memory first, and whatever else needs checkpointing), where
        # the compiler also keeps the random state of dropout's masks for the backward.
        if plan.checkpointing == "offload":  # only where asked for: "auto" takes graphs where checkpointing fits
            from tunelab import ui

            ui.warn("cudagraphs_offload", "model.compile: cudagraphs keeps checkpointed layer inputs in GPU memory "
                    "(inside the compiled layers), not in CPU memory; if it runs out, use compile: auto")
        plan.checkpointing = "compiled"
    if graphs and plan.attention == "flex_attention":
        if supports_static_mask(base.config) and layers:
            plan.static_mask = True  # the loss module builds it (train/loss.py)
        elif settings.attn_implementation == "auto":
            _set_attention(base, "sdpa")  # SDPA's mask is a plain input the graphs copy in
            plan.attention = "sdpa"
    want_compile = "cudagraphs" if graphs else settings.compile
    if want_compile == "auto":
        want_compile = cuda and plan.checkpointing != "offload" and hasattr(torch, "compile")
    liger = settings.use_liger
    if liger == "auto":
        liger = cuda and liger_available()
    elif liger and not cuda:
        liger = False
        from tunelab import ui

        ui.warn("liger_cpu", "model.use_liger is ignored on CPU (Liger's kernels are GPU-only)")
    plan.liger_loss = bool(liger)
    # Compiled layers get their norm/RoPE/SwiGLU fused by the compiler; Liger's own kernels only where eager.
    plan.liger_layers = bool(liger) and not want_compile
    if plan.liger_layers:
        apply_liger(base)
    if plan.checkpointing == "full":
        enable_checkpointing(base)
    elif plan.checkpointing == "compiled":
        checkpoint_inside(layers)
    elif plan.checkpointing == "offload":
        from tunelab.model.offload import OffloadPolicy, enable_offloaded_checkpointing, tile_mlps

        enable_offloaded_checkpointing(layers, OffloadPolicy())
        tile_mlps([layer.mlp for layer in layers if hasattr(layer, "mlp")])
    skip_lora_input_cast(model)
    if want_compile and layers:
        # Below 1 torch's partitioner may recompute Inductor's random seeds in the backward (it does at 0 and 0.01
        # for a LoRA layer), and dropout's backward would then use another mask than its forward: a lower budget
        # (a bench setting) only where nothing draws a random mask.
        if memory_budget is not None and memory_budget < 1 and has_dropout(settings, base):
            from tunelab import ui

            ui.warn("budget_dropout", f"compiler memory budget {memory_budget} ignored: the model trains "
                                      "with dropout, whose mask a recompute would draw anew")
            memory_budget = None
        # a process-wide setting, read when the layers are first compiled: set for every run, so that one run's
        # value never carries over to the next in the same process
        torch._functorch.config.activation_memory_budget = 1.0 if memory_budget is None else memory_budget
        plan.cudagraphs = want_compile == "cudagraphs"
        compile_layers(layers, mode="reduce-overhead" if plan.cudagraphs else None)
        if plan.cudagraphs:
            # Each forward starts a new CUDA-graph step (evaluation's too). Several micro-batches per optimizer
            # step need the gradients kept allocated between them (train/optim.py keep_gradients).
            _decoder(base).register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
        plan.compiled = True
    return plan


def _decoder(model: Any) -> torch.nn.Module:
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else getattr(model, "model", model)


def choose_cudagraphs(settings: Any, model: Any, device: torch.device, tokens: int, free: float,
                      sharded: bool = False, packed: bool = True) -> bool:
    """CUDA graphs where asked, or where "auto" finds a launch-bound LoRA or NF4 QLoRA step: a GPU, weights that
    are not sharded, packed rows (every micro-batch is padded to the full length, so that the graphs replay one
    shape) of up to CUDAGRAPHS_MAX_TOKENS per micro-batch, checkpointing not asked for, an attention whose mask the
    graphs can take, decoder layers to compile, and the activations the compiled layers keep (QLoRA checkpoints inside
    them: each layer's input plus one layer's recompute, checkpointed_bytes; LoRA, or gradient_checkpointing:
    false, all) well inside free memory. Several processes under DDP take them too (tutorial QLoRA on 2 GPUs:
    6.7x the plain compiled layers' tokens/s, losses within 1.1e-4 relative; BENCHMARKS.md); runs whose weights
    FSDP2 shards keep plain compiled layers, as do full fine-tuning, DoRA, int8 and torchao's NF4 weights (none
    of them measured with graphs)."""
    if settings.compile == "cudagraphs":
        return True
    if settings.compile != "auto" or device.type != "cuda" or sharded:
        return False
    if settings.lora is None or settings.lora.use_dora or settings.quantization not in ("none", "nf4") \
            or (settings.quantization == "nf4" and settings.nf4_format == "torchao"):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if settings.gradient_checkpointing not in ("auto", False) or (
            settings.attn_implementation == "flex_attention" and not supports_static_mask(base.config)):
        return False
    if not packed or tokens > CUDAGRAPHS_MAX_TOKENS:
        return False
    inside = settings.quantization == "nf4" and settings.gradient_checkpointing == "auto"  # checkpointed inside
    need = checkpointed_bytes(model, tokens) if inside else activation_bytes(model, tokens)
    return bool(need and decoder_layers(base)) and need <= 0.6 * free


# Dropout settings of model configs that act in training mode (transformers' names).
_MODEL_DROPOUTS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop")


def has_dropout(settings: Any, base: Any) -> bool:
    """Whether training draws random masks: LoRA dropout, or dropout in the model itself."""
    if settings.lora is not None and settings.lora.dropout > 0:
        return True
    return any(float(getattr(base.config, name, 0) or 0) > 0 for name in _MODEL_DROPOUTS)


def activation_bytes(model: Any, tokens: int) -> float:
    """Estimated activations a micro-batch of `tokens` saves for the backward without checkpointing."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 0)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    elem = 2 if next(model.parameters()).dtype != torch.float32 else 4
    return NO_CKPT_ACT_FACTOR * (hidden + inter) * elem * tokens * getattr(cfg, "num_hidden_layers", 0)


def checkpointed_bytes(model: Any, tokens: int) -> float:
    """Estimated activations with checkpointing: one hidden state per layer, plus one layer's activations while
    it is recomputed (three layers' worth, for the backward's own buffers)."""
    cfg = model.config
    elem = 2 if next(model.parameters()).dtype != torch.float32 else 4
    n_layers = max(1, getattr(cfg, "num_hidden_layers", 0))
    return getattr(cfg, "hidden_size", 0) * elem * tokens * n_layers + activation_bytes(model, tokens) / n_layers * 3


def choose_checkpointing(settings: Any, model: Any, device: torch.device, tokens: int,
                         free: float | None = None) -> str:
    choice = settings.gradient_checkpointing
    if choice is True:
        return "full"
    if choice is False:
        return "off"
    if choice == "offload":
        return "offload"
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 0)
    n_layers = getattr(cfg, "num_hidden_layers", 0)
    if not (hidden and n_layers):
        return "full"
    free = free_memory(model, device) if free is None else free
    if activation_bytes(model, tokens) <= 0.6 * free and settings.quantization == "none":  # QLoRA: memory first
        return "off"
    return "full" if checkpointed_bytes(model, tokens) <= 0.8 * free else "offload"


def free_memory(model: Any, device: torch.device) -> float:
    """Memory left for activations: the device's total, less the weights already there and the gradients and
    AdamW state still to come for the trainable parameters. It differs between processes (on the CPU from moment
    to moment, and a sharded run's rank 0 holds weights the others build on the meta device)."""
    trainable = sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.memory_allocated(device)
    else:
        import psutil

        total, used = psutil.virtual_memory().available, 0
    return 0.9 * total - used - trainable


def checkpoint_inside(layers: Sequence[torch.nn.Module]) -> None:
    """Activation checkpointing inside each layer's compiled region (call before compile_layers): the compiler
    sees the recompute, so CUDA graphs can replay it (they cannot replay transformers' checkpoint around the
    compiled call), and it saves the random state of each dropout mask for the backward's recompute. All layers
    share one forward function, so they still share one compiled graph. The override lives on each layer
    instance (no pickling of such a model; tunelab never pickles one)."""
    for layer in layers:  # all checked before any is changed
        current = layer.__dict__.get("forward")
        if current is not None and getattr(current, "__func__", None) is not _checkpointed_forward:
            raise ModelError(f"cannot checkpoint {type(layer).__name__} inside its compiled region: its forward is "
                             "already replaced (an accelerate hook or another patch); use compile: true")
    for layer in layers:
        layer.forward = MethodType(_checkpointed_forward, layer)


def _checkpointed_forward(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    if not (layer.training and torch.is_grad_enabled()):  # evaluation and generation: nothing to recompute
        return type(layer).forward(layer, *args, **kwargs)
    return checkpoint(type(layer).forward, layer, *args, use_reentrant=False, context_fn=recompute_everything,
                      **kwargs)


def recompute_everything() -> tuple[Any, Any]:
    """checkpoint()'s context_fn for a region whose every op is recomputed in the backward."""
    # Every op, matmuls too: left to its own choice torch 2.11's partitioner kept the matmul outputs of each layer
    # (7B QLoRA 1x2048 on an H100: 11.1 GiB against 6.7 when only the layer's input is kept; BENCHMARKS.md).
    return create_selective_checkpoint_contexts(_must_recompute)


def _must_recompute(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_RECOMPUTE


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated decoder blocks (the ModuleList with num_hidden_layers identical children)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and n and \
                len({type(m) for m in mod}) == 1:
            return list(mod)
    return []


def compile_layers(layers: Sequence[torch.nn.Module], backend: str = "inductor", mode: str | None = None) -> None:
    """Regional compilation: each decoder layer through torch.compile. The layers share one compiled graph
    (their weights are inputs to it), so compile time is that of one layer, not of the whole model.
    mode "reduce-overhead" adds CUDA graphs (one recording per layer)."""
    use_compile_cache()
    for layer in layers:
        layer.compile(backend=backend, mode=mode)


def use_compile_cache() -> None:
    """Keep Inductor's (and so Triton's) cache under ~/.cache/tunelab, so later runs skip most compile time. A
    folder the user chose stays; the temporary one Inductor sets for itself on import (transformers imports it
    long before this runs) does not."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")) / "compile"
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)  # Triton's cache lives inside it


def skip_lora_input_cast(model: Any) -> None:
    """peft casts each LoRA layer's input to the adapter's fp32 dtype, then autocast casts it back to bf16 for
    the matmul: two full copies of every activation per adapted layer. Under autocast the adapter matmul runs in
    bf16 either way, so the cast is skipped; the fp32 adapter weights and their updates are unchanged."""
    for mod in model.modules():
        if hasattr(mod, "cast_input_dtype_enabled"):
            mod.cast_input_dtype_enabled = False


def apply_liger(model: Any) -> None:
    """Liger's fused RMSNorm, RoPE and SwiGLU kernels, patched into a loaded model (GPU only). The loss side
    (fused linear cross-entropy) is tunelab's own loss function: see train/loss.py."""
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError:
        raise ModelError("model.use_liger needs liger-kernel (pip install 'tunelab[gpu]')") from None
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


@contextmanager
def generation_mode(model: Any) -> Iterator[None]:
    """Generation inside a training run: SDPA instead of flex attention (flex would rebuild its block mask and
    recompile at every new length), the compiled layers run eagerly (decoding shapes change every token), and
    LoRA layers answer through merged copies of their weights where memory allows (adapters.merged_for_generation)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = getattr(base.config, "_attn_implementation", None)
    if attn == "flex_attention":
        _set_attention(base, "sdpa")
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    casts = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", True) is False]
    for m in casts:  # generation runs without autocast: fp32 adapters need their input cast back
        m.cast_input_dtype_enabled = True
    try:
        with stance, merged_for_generation(model):
            yield
    finally:
        for m in casts:
            m.cast_input_dtype_enabled = False
        if attn == "flex_attention":
            _set_attention(base, attn)


def _set_attention(model: Any, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError, ImportError):
        model.config._attn_implementation = name


# ---- model FLOPs and MFU ------------------------------------------------------------------------------------


@dataclass
class FlopCounter:
    """Model FLOPs of one training token: matmuls forward and backward (weight gradients only where trained),
    the output head only on tokens with a target, attention per (query, key) pair. Recomputation is not counted:
    MFU measures useful work."""

    per_token: float
    per_target: float
    per_pair: float


def flop_counter(model: Any) -> FlopCounter:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    embed = base.get_input_embeddings()
    per_token = per_target = 0.0
    for mod in base.modules():
        if mod is embed or not isinstance(mod, torch.nn.Linear):  # bitsandbytes' layers are nn.Linear too
            continue
        weight = mod.weight
        n = real_numel(weight)
        flops = 2 * n * (3 if weight.requires_grad else 2)
        if mod is head:
            per_target += flops
        else:
            per_token += flops
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # QK^T and PV forward (2 matmuls x 2 FLOPs), twice that backward
    per_pair = 12.0 * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers
    return FlopCounter(per_token, per_target, per_pair)


def step_flops(counter: FlopCounter, rows: Sequence[tuple[Any, Any, Any]]) -> float:
    """FLOPs of one step over `rows` (input ids, shifted labels, document lengths), as the loop holds them."""
    total = 0.0
    for ids, labels, docs in rows:
        pairs = sum(int(n) * (int(n) + 1) // 2 for n in docs)
        total += counter.per_token * len(ids) + counter.per_target * int((labels != -100).sum()) \
            + counter.per_pair * pairs
    return total


def peak_flops(device: torch.device) -> float | None:
    """Datasheet dense bf16 FLOP/s of the device, or None where unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None
