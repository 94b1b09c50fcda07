"""Everything a run needs before its first step, built in order into one `Run`:

    run folder -> tokenizer and data (once per node) -> model, adapters, sharding -> optimizer and schedule -> resume

The loop (train/loop.py) then only steps. Nothing here knows which strategy runs: train/parallel.py decides who
loads weights, wraps the model, and moves state by name.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab import ui
from tunelab.config.load import to_yaml
from tunelab.config.schema import Config
from tunelab.data.dataset import prepare_data
from tunelab.data.pack import Rows
from tunelab.data.templates import get_template
from tunelab.errors import CheckpointError, OutputExistsError, TrainingError
from tunelab.model.adapters import add_lora, count_parameters, make_full_trainable
from tunelab.model.generate import ChatModel, from_training
from tunelab.model.kernels import (
    FlopCounter,
    SpeedPlan,
    choose_attention,
    flop_counter,
    free_memory,
    peak_flops,
    prepare_for_training,
)
from tunelab.model.load import (
    choose_dtype,
    empty_model,
    load_model,
    load_tokenizer,
    resolve_model_path,
    warn_if_remote,
)
from tunelab.model.nf4 import auto_plan, load_torchao_nf4
from tunelab.train import checkpoint as ckpt_io
from tunelab.train import named_state, parallel, resume, rng
from tunelab.train.log import RunLogger
from tunelab.train.loss import loss_module_for
from tunelab.train.optim import build_optimizer, keep_gradients, warmup_steps
from tunelab.train.parallel import Parallel


@dataclass
class Folder:
    work_dir: Path
    log_dir: Path
    logger: RunLogger
    resume_from: Path | None


@dataclass
class Run:
    cfg: Config
    par: Parallel
    folder: Folder
    config_yaml: str
    resume_hint: str  # the command that continues this run
    tokenizer: Any
    rows: Rows
    model: Any  # the (PEFT) model: parameter names, saving, generation
    loss_module: torch.nn.Module  # what the step calls: plain, DDP, or the FSDP root
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    state: ckpt_io.TrainState
    steps_per_epoch: int
    rows_per_step: int
    chat: ChatModel | None
    full: bool  # full fine-tuning (else adapters)
    flops: FlopCounter  # model FLOPs per token, for the MFU in the log
    peak_flops: float | None  # the device's peak bf16 rate (None on CPU: no MFU)
    cudagraphs: bool = False  # the compiled layers replay CUDA graphs
    # gradients stay allocated between steps (CUDA graphs with several micro-batches per step: optim.keep_gradients;
    # with one, the step's gradients are read before the next replay, and leaving them in the graphs' memory keeps
    # the peak lower: 7B QLoRA, BENCHMARKS.md)
    keep_grads: bool = False
    # every micro-batch padded to this many tokens (None: to its longest row). CUDA graphs replay one recorded
    # shape; a new width per micro-batch recorded new graphs every step, 2.7x slower than none (BENCHMARKS.md (l)).
    # Rows per micro-batch still vary where an epoch's last step is short or a process gets a stand-in micro-batch
    # (several processes): those record once more.
    row_width: int | None = None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_folder(work_dir: Path, resume: str | bool, par: Parallel) -> Folder:
    if work_dir.exists() and not work_dir.is_dir():
        raise OutputExistsError(f"--work-dir {work_dir} is a file, not a folder")
    resume_from = _find_resume_checkpoint(work_dir, resume)
    if par.is_main:
        for p in ckpt_io.clean_partial(work_dir):
            ui.info(f"removed an unfinished checkpoint {p.name} (its save was interrupted)")
    log_dir = work_dir / time.strftime("%Y%m%d_%H%M%S")
    while par.is_main and log_dir.exists():  # never reuse (and overwrite) an earlier run's log folder
        log_dir = log_dir.with_name(log_dir.name + "_1")
    return Folder(work_dir, log_dir, RunLogger(log_dir, enabled=par.is_main), resume_from)


def set_up(cfg: Config, par: Parallel, folder: Folder, resume_hint: str, resume_force: bool) -> Run:
    logger = folder.logger
    config_yaml = to_yaml(cfg)
    if par.is_main:
        (folder.log_dir / "config.yaml").write_text(config_yaml)
    dtype = choose_dtype(cfg.train.dtype, par.device)
    if par.shards and dtype == torch.float16:
        raise TrainingError(f"train.dtype float16 with strategy {par.strategy}: use bfloat16 (or float32); "
                            "sharded loss scaling is not supported")
    if par.shards and not par.enabled and not par.offload:
        ui.warn("one_process_zero3", f"strategy {par.strategy} in one process has nothing to split and runs slower "
                "than the plain run (1.8B QLoRA on an H100: 1,905 against 6,547 tokens/s, more GPU memory); leave "
                "out --deepspeed / train.strategy for the plain run")
    set_seed(cfg.train.seed)
    model_path = resolve_model_path(cfg.model.path)
    warn_if_remote(model_path, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision)
    with parallel.node_leader_first(par):  # the first fills this node's data cache; the others read it
        rows = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed).rows

    built = _build_model(cfg, par, model_path, dtype, logger)
    model, full = built.model, built.full
    loss_module = parallel.wrap(par, loss_module_for(model, built.speed, par.device), model,
                                dtype, built.filled_on_rank0)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: the sharded parameters

    optimizer = build_optimizer(model, cfg.train, par.param_device)
    scaler = torch.amp.GradScaler(par.device.type, enabled=dtype == torch.float16)
    rows_per_step = resume.rows_per_step(cfg, par.world_size)
    steps_per_epoch = math.ceil(len(rows) / rows_per_step)
    total = steps_per_epoch * cfg.train.max_epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    if total < 10:
        ui.warn("short_run", f"only {ui.count(total, 'optimizer step')} ({ui.count(len(rows), 'row')}, "
                             f"{ui.count(rows_per_step, 'row')} per step); warmup takes "
                             f"{warmup_steps(total, cfg.train.warmup_ratio)} of them")
    state = ckpt_io.TrainState(total_steps=total, fingerprint=resume.fingerprint(cfg, len(rows), par.world_size),
                               log_dir=str(folder.log_dir))
    chat = None  # only runs that evaluate need a chat template (pretraining data may have none)
    if cfg.runtime.evaluation_inputs:
        chat = from_training(model, tokenizer, get_template(cfg.data.prompt_template, tokenizer), par.device)
        parallel.mark_generation_synced(par, model)
    autocast = torch.autocast(par.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    run = Run(cfg, par, folder, config_yaml, resume_hint, tokenizer, rows, model, loss_module, params, optimizer,
              scaler, autocast, state, steps_per_epoch, rows_per_step, chat, full, built.flops,
              peak_flops(par.device), cudagraphs=built.speed.cudagraphs,
              keep_grads=built.speed.cudagraphs and cfg.train.accumulative_counts > 1,
              row_width=cfg.data.max_length if built.speed.cudagraphs else None)
    if folder.resume_from is not None:
        _resume(run, folder.resume_from, resume_force)
    if run.keep_grads:  # after the optimizer state is loaded: loading it sets up state only where no gradient is
        keep_gradients(params)
    logger.info(f"training: {ui.count(total, 'step')} ({steps_per_epoch}/epoch x "
                f"{ui.count(cfg.train.max_epochs, 'epoch')}"
                f"{', capped by max_steps' if cfg.train.max_steps and total == cfg.train.max_steps else ''}), "
                f"{ui.count(rows_per_step, 'row')} of <= {cfg.data.max_length} tokens per step; logs in {folder.log_dir}")
    return run


@dataclass
class Built:
    model: Any  # with adapters, or with every weight trainable
    full: bool  # full fine-tuning
    filled_on_rank0: bool  # the other processes built on the meta device; sharding fills them from rank 0
    speed: SpeedPlan
    flops: FlopCounter  # counted before sharding, which hides the 4-bit weights' real size


def _build_model(cfg: Config, par: Parallel, model_path: str, dtype: torch.dtype, logger: RunLogger) -> Built:
    full = cfg.model.lora is None
    quantized = cfg.model.quantization != "none"
    # Full fine-tuning in fp16 keeps fp32 master weights; bf16 full fine-tuning trains bf16 weights directly.
    weight_dtype = torch.float32 if (full and dtype == torch.float16) else dtype
    attn = choose_attention(cfg.model.attn_implementation, par.device, cfg.data.max_length)
    common = {"dtype": weight_dtype, "attn_implementation": attn, "trust_remote_code": cfg.model.trust_remote_code,
              "revision": cfg.model.revision}
    dora = bool(cfg.model.lora and cfg.model.lora.use_dora)
    nf4 = par.nf4_format(cfg.model.nf4_format, dora) if cfg.model.quantization == "nf4" else None
    shards = par.world_size if par.shards else 1
    plan = None  # auto's look at the files' headers, handed on to the loader
    if nf4 == "torchao" and cfg.model.nf4_format == "auto":
        plan, why = auto_plan(model_path, shards, **common)
        if why:  # the same answer on every process: it depends on the files and the process count alone
            logger.info(f"nf4 weights: bitsandbytes, not torchao: {why}")
            nf4 = "bitsandbytes"
    if nf4 == "torchao":  # every process: its GPU gets 4-bit weights, one tensor at a time from the files
        model = load_torchao_nf4(model_path, device=par.device, shards=shards, plan=plan, **common)
    elif par.loads_weights(quantized):
        # a sharded run loads full weights into host memory once and moves only each process's shards on
        device = torch.device("cpu") if par.shards and not quantized else par.device
        model = load_model(model_path, device=device, quantization=cfg.model.quantization,
                           quant_storage=dtype if par.shards else torch.uint8, **common)
    else:
        model = empty_model(model_path, **common)
    if quantized and nf4 != "torchao":
        _no_cpu_repacking(model)
    model = make_full_trainable(model) if full else add_lora(model, cfg.model.lora)
    # Liger, checkpointing (per decoder layer: FSDP's gather hooks stay outside the recomputation), compile.
    # Every process plans from the tightest one's free memory: the plan decides a sharded step's collectives.
    free = parallel.min_over_ranks(free_memory(model, par.device), par)
    speed = prepare_for_training(model, cfg.model, par.device, cfg.train.batch_size * cfg.data.max_length,
                                 free=free, sharded=par.shards,
                                 packed=cfg.data.pack_to_max_length)
    # e.g. bf16 or Liger on one node only, or files that differ between nodes
    parallel.check_same("settings", f"{dtype}, {f'nf4 {nf4}, ' if nf4 else ''}{speed.describe()}", par)
    model.train()
    n_train, n_total = count_parameters(model)
    logger.info(f"model: {model_path} ({n_total / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable, "
                f"{'full' if full else 'LoRA'}{', ' + cfg.model.quantization if quantized else ''}"
                f"{f' ({nf4})' if nf4 else ''}, "
                f"{str(dtype).removeprefix('torch.')}, {speed.describe()}, {par.device}); {par.describe()}")
    return Built(model, full, par.shards and par.enabled and not quantized, speed, flop_counter(model))


def _no_cpu_repacking(model: Any) -> None:
    """bitsandbytes repacks 4-bit weights in place for fast CPU inference when a layer runs in eval mode; during
    training (evaluation included) the weights must keep their layout: a sharded one its shape, every one its
    format for the next training step. (It also fails on layers narrower than a quantization block.)"""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _resume(run: Run, ckpt: Path, force: bool) -> None:
    """Every process checks the checkpoint against this run; rank 0 reads the tensors and parallel.py moves
    them into every process's shards by name."""
    old, extra = ckpt_io.load_state(ckpt)
    diff = resume.refusals(old.fingerprint, run.state.fingerprint)
    if diff and not force:
        raise CheckpointError(f"the config differs from the run being resumed ({ckpt}):\n  " + "\n  ".join(diff)
                              + "\npass --resume-force to resume anyway")
    resume.check_not_finished(old.step, run.state.total_steps, ckpt)
    for line in resume.changes(resume.old_train_settings(ckpt), run.cfg.train, old.step, old.total_steps,
                               run.state.total_steps):
        run.folder.logger.info(line)
    par = run.par
    shards = ckpt_io.sharded_optimizer(ckpt)
    if shards is not None and (shards != par.world_size or not par.shards):
        def processes(n: int) -> str:
            return f"{n} process{'' if n == 1 else 'es'}"

        how = (f"{processes(shards)} and a zero strategy" if shards > 1 else
               "1 process and zero3, zero2_offload or zero3_offload")
        note = "; zero1 and zero2 shard nothing in one process" if shards == 1 else ""
        raise CheckpointError(f"{ckpt} holds its optimizer state in {ui.count(shards, 'shard')} (saved by "
                              f"{processes(shards)} with torch.distributed.checkpoint): resume it with {how} "
                              f"(this run: {processes(par.world_size)}, {par.strategy}{note})")
    load = par.is_main or not par.distributed
    named_state.load_weights(par, run.model, ckpt_io.read_weights(run.model, ckpt, load))
    names = {id(p): n for n, p in run.model.named_parameters()}
    order = [names[id(p)] for g in run.optimizer.param_groups for p in g["params"]]
    saved = ckpt_io.read_optimizer(ckpt, order, load)
    if shards is not None:
        named_state.load_sharded_optimizer(par, run.model, run.optimizer, ckpt / ckpt_io.OPTIMIZER_SHARDS, saved)
    else:
        named_state.load_optimizer(par, run.model, run.optimizer, saved)
    rng.restore_rng(ckpt, extra["rng"], par.rank, par.device)
    if extra.get("scaler"):
        run.scaler.load_state_dict(extra["scaler"])
    run.state.step, run.state.tokens_seen, run.state.bad_steps = old.step, old.tokens_seen, old.bad_steps
    run.folder.logger.info(f"resumed from {ckpt} at step {run.state.step}/{run.state.total_steps}")


def _find_resume_checkpoint(work_dir: Path, resume_arg: str | bool) -> Path | None:
    if resume_arg is True or resume_arg == "":
        found = ckpt_io.latest_checkpoint(work_dir)
        if found is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {work_dir}")
        return found
    if resume_arg:
        return ckpt_io.resolve_checkpoint(resume_arg)
    existing = ckpt_io.list_checkpoints(work_dir)
    if existing:
        raise OutputExistsError(f"{work_dir} already holds checkpoints ({existing[-1].name}); pass --resume to "
                                "continue that run, or --work-dir DIR for a new one")
    return None
