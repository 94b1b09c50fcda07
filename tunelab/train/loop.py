"""The training loop, readable top to bottom.

    set up (run folder, seeds, device, processes) -> data -> model + adapters -> optimizer + schedule
    -> resume -> for each optimizer step: micro-batches, token-weighted loss, backward, clip, update,
       log, evaluate, checkpoint -> final checkpoint, evaluation, loss curve.

Gradient accumulation weights every target token of the whole accumulated batch (all micro-batches, all
processes) equally: each micro-batch's summed loss is divided by the step's total token count, so four
micro-batches give the same gradient as one batch of four.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from tunelab import ui
from tunelab.config.load import to_yaml
from tunelab.config.schema import Config
from tunelab.data.dataset import prepare_data
from tunelab.data.encode import IGNORE
from tunelab.data.pack import Rows, collate
from tunelab.data.templates import get_template
from tunelab.errors import CheckpointError, Interrupted, OutputExistsError, TrainingError
from tunelab.infer.generate import from_training
from tunelab.model.adapters import add_lora, count_parameters, make_full_trainable
from tunelab.model.kernels import choose_attention, flop_counter, peak_flops, prepare_for_training, step_flops
from tunelab.model.load import choose_device, choose_dtype, load_model, load_tokenizer, resolve_model_path, warn_if_remote
from tunelab.train import checkpoint as ckpt_io
from tunelab.train import dist
from tunelab.train.evaluate import evaluate_chat, write_eval
from tunelab.train.log import RunLogger, format_duration, plot_loss
from tunelab.train.loss import LossFn, choose_loss
from tunelab.train.optim import build_optimizer, lr_at, set_lr, warmup_steps


@dataclass
class RunResult:
    work_dir: Path
    log_dir: Path
    checkpoint: Path
    steps: int
    loss: float


class LossModule(torch.nn.Module):
    """Model + loss in one module, so DDP sees the whole forward pass."""

    def __init__(self, model: Any, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(self.model, batch)


class StopSignal:
    """SIGINT/SIGTERM ask for a checkpoint at the next step boundary; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        ui.info(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                "(Ctrl-C again to abort without saving)")

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n_rows: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Row order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same data."""
    if not shuffle:
        return np.arange(n_rows)
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n_rows, generator=g).numpy()


def micro_batches(rows: Rows, step_rows: np.ndarray, info: dist.DistInfo, batch_size: int
                  ) -> list[tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], bool]]:
    """This process's micro-batches for one step. Every process gets the same number of micro-batches (DDP
    needs that); a process with too few rows computes a dummy batch with zero weight."""
    mine = step_rows[info.rank::info.world_size]
    n_mb = max(1, math.ceil(math.ceil(len(step_rows) / info.world_size) / batch_size))
    out = []
    for i in range(n_mb):
        idx = mine[i * batch_size:(i + 1) * batch_size]
        if len(idx):
            out.append(([rows.row(int(j)) for j in idx], False))
        else:
            out.append(([rows.row(int(step_rows[0]))], True))
    return out


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def fingerprint(cfg: Config, n_rows: int, world: int) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    return {"model.path": cfg.model.path, "model.revision": cfg.model.revision,
            "model.quantization": cfg.model.quantization,
            "model.lora": cfg.model.lora.model_dump() if cfg.model.lora else None,
            "data": [s.model_dump(mode="json") for s in cfg.data.specs()],
            "data.max_length": cfg.data.max_length, "data.pack_to_max_length": cfg.data.pack_to_max_length,
            "data.shuffle": cfg.data.shuffle, "data.rows": n_rows, "train.seed": cfg.train.seed,
            "train.batch_size": cfg.train.batch_size,
            "train.accumulative_counts": cfg.train.accumulative_counts, "world_size": world}


def accumulate_gradients(loss_module: torch.nn.Module, batches: list, info: dist.DistInfo, device: torch.device,
                         autocast: Any, scaler: torch.amp.GradScaler, pad_id: int) -> tuple[float, int]:
    """Backward over one step's micro-batches; every target token of the step (all micro-batches, all
    processes) weighs the same. Returns (mean loss per target token, input tokens processed here)."""
    n_tokens = torch.tensor(float(sum(int((r[1] != IGNORE).sum()) for mb, dummy in batches if not dummy
                                      for r in mb)), device=device)
    dist.all_reduce_sum(n_tokens, info)
    loss_sum = torch.zeros((), device=device)
    step_tokens = 0
    for i, (mb, dummy) in enumerate(batches):
        batch = {k: (v.pin_memory() if device.type == "cuda" else v).to(device, non_blocking=True)
                 for k, v in collate(mb, pad_id).items()}
        # DDP: average gradients across processes only after the last micro-batch
        sync = nullcontext() if (i == len(batches) - 1 or not info.enabled) else loss_module.no_sync()
        with sync:
            with autocast:
                mb_loss, _ = loss_module(batch)
            # DDP divides by the world size when it averages, so scale it back in
            weight = 0.0 if dummy else info.world_size / n_tokens.clamp(min=1)
            scaler.scale(mb_loss * weight).backward()
        if not dummy:
            loss_sum += mb_loss.detach().float()
            step_tokens += int(sum(len(r[0]) for r in mb))
    dist.all_reduce_sum(loss_sum, info)
    return float(loss_sum / n_tokens.clamp(min=1)), step_tokens


def train(cfg: Config, config_name: str, work_dir: Path | None = None, resume: str | bool = False,
          resume_force: bool = False) -> RunResult:
    # ---- 1. run folder, device, processes ---------------------------------------------------------------
    work_dir = Path(work_dir or Path("work_dirs") / config_name)
    if work_dir.exists() and not work_dir.is_dir():
        raise OutputExistsError(f"--work-dir {work_dir} is a file, not a folder")
    info, device = dist.setup(choose_device(cfg.train.device))
    resume_from = _find_resume_checkpoint(work_dir, resume)
    if info.is_main:
        for p in ckpt_io.clean_partial(work_dir):
            ui.info(f"removed an unfinished checkpoint {p.name} (its save was interrupted)")
    log_dir = work_dir / time.strftime("%Y%m%d_%H%M%S")
    while info.is_main and log_dir.exists():  # never reuse (and overwrite) an earlier run's log folder
        log_dir = log_dir.with_name(log_dir.name + "_1")
    logger = RunLogger(log_dir, enabled=info.is_main)
    with logger:  # on any failure, train.log records why before the files are closed
        config_yaml = to_yaml(cfg)
        if info.is_main:
            (log_dir / "config.yaml").write_text(config_yaml)
        set_seed(cfg.train.seed)

        # ---- 2. tokenizer and data -------------------------------------------------------------------------------
        model_path = resolve_model_path(cfg.model.path)
        warn_if_remote(model_path, cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, cfg.model.revision)
        if info.is_main:
            data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
        dist.barrier(info)  # rank 0 fills the cache; the others read it
        if not info.is_main:
            data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
        rows = data.rows

        # ---- 3. model, adapters, loss ----------------------------------------------------------------------------
        dtype = choose_dtype(cfg.train.dtype, device)
        full = cfg.model.lora is None
        # Full fine-tuning in fp16 keeps fp32 master weights; bf16 full fine-tuning trains bf16 weights directly.
        weight_dtype = torch.float32 if (full and dtype == torch.float16) else dtype
        attn = choose_attention(cfg.model.attn_implementation, device, cfg.data.max_length)
        model = load_model(model_path, dtype=weight_dtype, device=device, quantization=cfg.model.quantization,
                           attn_implementation=attn, trust_remote_code=cfg.model.trust_remote_code,
                           revision=cfg.model.revision)
        model = make_full_trainable(model) if full else add_lora(model, cfg.model.lora)
        speed = prepare_for_training(model, cfg.model, device, cfg.train.batch_size * cfg.data.max_length)
        model.train()
        n_train, n_total = count_parameters(model)
        logger.info(f"model: {model_path} ({n_total / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable, "
                    f"{'full' if full else 'LoRA'}{', ' + cfg.model.quantization if cfg.model.quantization != 'none' else ''}"
                    f", {str(dtype).removeprefix('torch.')}, {speed.describe()}, {device}"
                    f"{f', {info.world_size} processes' if info.enabled else ''})")
        loss_module = dist.wrap(LossModule(model, choose_loss(speed.liger_loss, device)), info, device)
        params = [p for p in model.parameters() if p.requires_grad]

        # ---- 4. optimizer and schedule ---------------------------------------------------------------------------
        optimizer = build_optimizer(model, cfg.train, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        rows_per_step = cfg.train.batch_size * cfg.train.accumulative_counts * info.world_size
        steps_per_epoch = math.ceil(len(rows) / rows_per_step)
        total = steps_per_epoch * cfg.train.max_epochs
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        if total < 10:
            ui.warn("short_run", f"only {total} optimizer steps ({len(rows)} rows, {rows_per_step} rows per step); "
                                 f"warmup takes {warmup_steps(total, cfg.train.warmup_ratio)} of them")
        state = ckpt_io.TrainState(total_steps=total, fingerprint=fingerprint(cfg, len(rows), info.world_size),
                                   log_dir=str(log_dir))

        # ---- 5. resume -------------------------------------------------------------------------------------------
        if resume_from is not None:
            old, extra = ckpt_io.load_state(resume_from)
            diff = ckpt_io.fingerprint_diff(old.fingerprint, state.fingerprint)
            if diff and not resume_force:
                raise CheckpointError(f"the config differs from the run being resumed ({resume_from}):\n  "
                                      + "\n  ".join(diff) + "\npass --resume-force to resume anyway")
            ckpt_io.load_weights(model, resume_from)
            ckpt_io.load_optimizer(optimizer, resume_from)
            ckpt_io.restore_rng(resume_from, extra["rng"], info.rank, device)
            if extra.get("scaler"):
                scaler.load_state_dict(extra["scaler"])
            state.step, state.tokens_seen, state.bad_steps = old.step, old.tokens_seen, old.bad_steps
            logger.info(f"resumed from {resume_from} at step {state.step}/{total}")
        logger.info(f"training: {total} steps ({steps_per_epoch}/epoch x {cfg.train.max_epochs} epochs"
                    f"{', capped by max_steps' if cfg.train.max_steps and total == cfg.train.max_steps else ''}), "
                    f"{rows_per_step} rows of <= {cfg.data.max_length} tokens per step; logs in {log_dir}")

        chat = from_training(dist.unwrap(loss_module).model, tokenizer, get_template(cfg.data.prompt_template,
                                                                                       tokenizer), device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        last_saved: Path | None = resume_from
        loss_value = float("nan")
        window: list[float] = []
        t_window, tok_window, flops_window = time.perf_counter(), 0, 0.0
        flops, peak = flop_counter(model), peak_flops(device)
        step_times: list[float] = []
        order_cache: dict[int, np.ndarray] = {}

        # ---- 6. the loop -----------------------------------------------------------------------------------------
        with StopSignal() as stop, ui.progress(total, "training") as advance:
            advance(state.step)
            for step in range(state.step, total):
                t_step = time.perf_counter()
                epoch, k = divmod(step, steps_per_epoch)
                if epoch not in order_cache:
                    order_cache = {epoch: epoch_order(len(rows), epoch, cfg.train.seed, cfg.data.shuffle)}
                step_rows = order_cache[epoch][k * rows_per_step:(k + 1) * rows_per_step]
                batches = micro_batches(rows, step_rows, info, cfg.train.batch_size)
                lr = lr_at(step, total, cfg.train)
                set_lr(optimizer, lr)
                loss_value, step_tokens = accumulate_gradients(loss_module, batches, info, device, autocast, scaler,
                                                               tokenizer.pad_token_id or 0)

                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_norm))
                fp16_overflow = scaler.is_enabled() and math.isfinite(loss_value) and not math.isfinite(grad_norm)
                if math.isfinite(loss_value) and (math.isfinite(grad_norm) or fp16_overflow):
                    scaler.step(optimizer)  # skipped by the scaler itself on an fp16 overflow
                    state.bad_steps = 0
                else:
                    state.bad_steps += 1
                    ui.warn("nonfinite", f"step {step + 1}: non-finite loss ({loss_value}) or gradient norm "
                                         f"({grad_norm}); update skipped")
                    logger.text(f"step {step + 1}: non-finite loss {loss_value} / grad norm {grad_norm}; skipped")
                    if state.bad_steps >= cfg.train.max_bad_steps:
                        raise TrainingError(
                            f"{state.bad_steps} consecutive steps with a non-finite loss or gradient norm "
                            f"(step {step + 1}); stopping. Last good checkpoint: {last_saved or 'none'}. "
                            "Try a lower train.lr or train.dtype=float32")
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step = step + 1
                state.tokens_seen += step_tokens * info.world_size
                advance(1)

                # ---- logging ---------------------------------------------------------------------------------------------
                step_times.append(time.perf_counter() - t_step)
                window.append(loss_value)
                tok_window += step_tokens * info.world_size
                flops_window += step_flops(flops, [r for mb, dummy in batches if not dummy for r in mb])
                now = time.perf_counter()
                scalars = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens * info.world_size,
                           "epoch": epoch + (k + 1) / steps_per_epoch}
                if state.step % cfg.runtime.log_interval == 0 or state.step == total:
                    sec_per_step = float(np.median(step_times[-50:]))
                    scalars.update(tokens_per_s=tok_window / max(now - t_window, 1e-9), memory_gib=memory_gib(device),
                                   eta_s=sec_per_step * (total - state.step))
                    mfu = f" | MFU {100 * flops_window / max(now - t_window, 1e-9) / peak:.1f}%" if peak else ""
                    logger.info(f"step {state.step}/{total} | loss {np.mean(window):.4f} | lr {lr:.3e} | "
                                f"grad {grad_norm:.3f} | {scalars['tokens_per_s']:,.0f} tok/s{mfu} | "
                                f"mem {scalars['memory_gib']:.2f} GiB | eta {format_duration(scalars['eta_s'])}")
                    window, t_window, tok_window, flops_window = [], now, 0, 0.0
                logger.scalars(state.step, scalars)

                # ---- evaluation and checkpoints --------------------------------------------------------------------------
                stop_now = dist.broadcast_flag(stop.signum is not None, info, device)
                if cfg.runtime.evaluation_inputs and state.step % cfg.runtime.evaluation_freq == 0 \
                        and state.step != total and not stop_now:
                    _evaluate(chat, cfg, info, logger, state.step)
                # no periodic save inside a streak of skipped updates: the last good checkpoint stays the newest
                periodic = state.step % cfg.runtime.save_steps == 0 and state.bad_steps == 0
                if periodic or state.step == total or stop_now:
                    last_saved = _save(work_dir, state, model, optimizer, scaler, config_yaml, cfg, info, device,
                                       logger)
                if stop_now:
                    signum = stop.signum or signal.SIGTERM
                    raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {state.step}/{total}; "
                                      f"checkpoint saved: {last_saved}; continue with: tunelab train CONFIG "
                                      f"--work-dir {work_dir} --resume", exit_code=128 + int(signum))

        # ---- 7. the end ------------------------------------------------------------------------------------------
        if cfg.runtime.evaluation_inputs:
            _evaluate(chat, cfg, info, logger, state.step)
        if info.is_main:
            png = plot_loss(log_dir / "scalars.jsonl", log_dir / "loss_curve.png")
            if png:
                logger.info(f"loss curve: {png}")
        logger.info(f"done: {state.step} steps, final loss {loss_value:.4f}; checkpoint {last_saved}")
        dist.teardown(info)
        assert last_saved is not None
        return RunResult(work_dir, log_dir, last_saved, state.step, loss_value)


def _find_resume_checkpoint(work_dir: Path, resume: str | bool) -> Path | None:
    if resume is True or resume == "":
        found = ckpt_io.latest_checkpoint(work_dir)
        if found is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {work_dir}")
        return found
    if resume:
        return ckpt_io.resolve_checkpoint(resume)
    existing = ckpt_io.list_checkpoints(work_dir)
    if existing:
        raise OutputExistsError(f"{work_dir} already holds checkpoints ({existing[-1].name}); pass --resume to "
                                "continue that run, or --work-dir DIR for a new one")
    return None


def _save(work_dir: Path, state: ckpt_io.TrainState, model: Any, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler, config_yaml: str, cfg: Config, info: dist.DistInfo, device: torch.device,
          logger: RunLogger) -> Path:
    path = work_dir / f"iter_{state.step}"
    rng_states = dist.gather_objects(ckpt_io.rng_state(device), info)
    if info.is_main:
        scaler_state = scaler.state_dict() if scaler.is_enabled() else None
        path = ckpt_io.save_checkpoint(work_dir, state, model, optimizer, scaler_state, config_yaml,
                                       cfg.runtime.save_total_limit, rng_states)
        logger.info(f"saved checkpoint {path}")
    dist.barrier(info)
    return path


def _evaluate(chat: Any, cfg: Config, info: dist.DistInfo, logger: RunLogger, step: int) -> None:
    if info.is_main:
        results = evaluate_chat(chat, cfg.runtime.evaluation_inputs, cfg.data.system,
                                cfg.runtime.evaluation_max_new_tokens)
        write_eval(logger.dir, step, results)
        for r in results:
            logger.info(f"eval step {step} | Q: {r['question']}\n  A: {r['answer']}")
    dist.barrier(info)
