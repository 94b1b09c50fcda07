"""The training loop: set up (train/setup.py), then step until done.

    for each optimizer step: this process's micro-batches, token-weighted loss, backward, clip, update
    -> log, evaluate, checkpoint -> final checkpoint, evaluation, loss curve.

Gradient accumulation weights every target token of the whole accumulated batch (all micro-batches, all
processes) equally: each micro-batch's summed loss is divided by the step's total token count, so four
micro-batches give the same gradient as one batch of four, and N processes the gradient of one.

The step waits for the device once: the loss and the gradient norm are read together, after clipping.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab import ui
from tunelab.config.schema import Config
from tunelab.data.encode import IGNORE
from tunelab.data.pack import Rows, collate
from tunelab.errors import Interrupted, TrainingError
from tunelab.model.kernels import step_flops
from tunelab.model.load import choose_device
from tunelab.train import parallel, peers, saving
from tunelab.train.evaluate import evaluate_chat, write_eval
from tunelab.train.log import format_duration, memory_gib, peak_memory, plot_loss, rank_line
from tunelab.train.optim import lr_at, set_lr, zero_gradients
from tunelab.train.parallel import Parallel
from tunelab.train.setup import Run, open_folder, set_up


@dataclass
class RunResult:
    work_dir: Path
    log_dir: Path
    checkpoint: Path
    steps: int
    loss: float


class StopSignal:
    """SIGINT/SIGTERM ask for a checkpoint at the next step boundary; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:  # noqa: PYI034 (typing.Self needs Python 3.11)
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        ui.info(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                "(Ctrl-C again to abort without saving)")

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: Config, config_name: str, work_dir: Path | None = None, resume: str | bool = False,
          resume_force: bool = False, config_source: str | None = None, overrides: Sequence[str] = ()) -> RunResult:
    """`config_name` names the default work dir; `config_source` (the config file or built-in name as given) and
    the command line's KEY=VALUE `overrides` go into the command that continues an interrupted run."""
    par = parallel.setup(cfg.train.strategy, choose_device(cfg.train.device))
    work_dir = Path(work_dir or Path("work_dirs") / config_name)
    try:
        with peers.guard(par):
            folder = open_folder(work_dir, resume, par)
            with folder.logger, peers.named_failures(par):  # train.log records why a run failed
                hint = _resume_hint(config_source or config_name, overrides, work_dir, par)
                return run_loop(set_up(cfg, par, folder, hint, resume_force))
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # the run's model and its sharded tensors go before the group
        raise
    finally:
        parallel.teardown(par)


def _resume_hint(source: str, overrides: Sequence[str], work_dir: Path, par: Parallel) -> str:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", par.world_size))
    launcher = "tunelab"
    if par.enabled:  # several nodes: the user's own rendezvous options, which this process cannot see
        launcher = f"torchrun --nproc_per_node {local} -m tunelab" if local == par.world_size else \
            "torchrun [the same options on every node] -m tunelab"
    strategy = f" --deepspeed {par.strategy}" if par.strategy != "ddp" else ""
    given = "".join(f" {shlex.quote(o)}" for o in overrides)  # the same config as this run, or resume refuses it
    return f"{launcher} train {shlex.quote(source)}{given} --work-dir {shlex.quote(str(work_dir))}{strategy} --resume"


def epoch_order(n_rows: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Row order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same data."""
    if not shuffle:
        return np.arange(n_rows)
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n_rows, generator=g).numpy()


def micro_batches(rows: Rows, step_rows: np.ndarray, par: Parallel, batch_size: int
                  ) -> list[tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], bool]]:
    """This process's micro-batches for one step. Every process gets the same number of micro-batches (their
    collectives must pair up); a process with too few rows computes a dummy batch with zero weight."""
    mine = step_rows[par.rank::par.world_size]
    n_mb = max(1, math.ceil(math.ceil(len(step_rows) / par.world_size) / batch_size))
    out = []
    for i in range(n_mb):
        idx = mine[i * batch_size:(i + 1) * batch_size]
        if len(idx):
            out.append(([rows.row(int(j)) for j in idx], False))
        else:
            out.append(([rows.row(int(step_rows[0]))], True))
    return out


def accumulate_gradients(loss_module: torch.nn.Module, batches: list, par: Parallel, autocast: Any,
                         scaler: torch.amp.GradScaler, pad_id: int, width: int | None = None,
                         ) -> tuple[torch.Tensor, int]:
    """Backward over one step's micro-batches. Returns (mean loss per target token of the whole step, as a device
    tensor: nothing here waits for the device; input tokens processed by this process). `width`: every micro-batch
    padded to this many tokens (else to its longest row)."""
    device = par.device
    n_tokens = torch.tensor(float(sum(int((r[1] != IGNORE).sum()) for mb, dummy in batches if not dummy
                                      for r in mb)), device=device)
    parallel.all_reduce_sum(n_tokens, par)
    loss_sum = torch.zeros((), device=device)
    step_tokens = 0
    for i, (mb, dummy) in enumerate(batches):
        batch = {k: (v.pin_memory() if device.type == "cuda" else v).to(device, non_blocking=True)
                 for k, v in collate(mb, pad_id, pad_to=width).items()}
        with parallel.micro_batch(par, loss_module, last=i == len(batches) - 1):
            with autocast:
                mb_loss, _ = loss_module(batch)
            # gradients are averaged over processes: scale by their number so every token weighs the same
            weight = 0.0 if dummy else par.world_size / n_tokens.clamp(min=1)
            scaler.scale(mb_loss * weight).backward()
        if not dummy:
            loss_sum += mb_loss.detach().float()
            step_tokens += int(sum(len(r[0]) for r in mb))
    parallel.all_reduce_sum(loss_sum, par)
    return loss_sum / n_tokens.clamp(min=1), step_tokens


@dataclass
class Step:
    loss: float
    grad_norm: float
    lr: float
    tokens: int  # input tokens of the step, all processes
    epoch: float
    flops: float = 0.0  # model FLOPs of this process's rows (for MFU)


def train_step(run: Run, step: int, order: np.ndarray, last_saved: Callable[[], Path | None]) -> Step:
    """One optimizer update (or a skipped one, when the loss or the gradient norm is not finite). `last_saved`
    gives the newest complete checkpoint (waiting for one being written)."""
    cfg, state = run.cfg, run.state
    k = step % run.steps_per_epoch
    step_rows = order[k * run.rows_per_step:(k + 1) * run.rows_per_step]
    batches = micro_batches(run.rows, step_rows, run.par, cfg.train.batch_size)
    lr = lr_at(step, state.total_steps, cfg.train)
    set_lr(run.optimizer, lr)
    loss, tokens = accumulate_gradients(run.loss_module, batches, run.par, run.autocast, run.scaler,
                                        run.tokenizer.pad_token_id or 0, run.row_width)
    run.scaler.unscale_(run.optimizer)
    norm = parallel.clip_grad_norm(run.params, cfg.train.max_norm)
    loss_value, grad_norm = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()  # the one wait
    fp16_overflow = run.scaler.is_enabled() and math.isfinite(loss_value) and not math.isfinite(grad_norm)
    if math.isfinite(loss_value) and (math.isfinite(grad_norm) or fp16_overflow):
        run.scaler.step(run.optimizer)  # skipped by the scaler itself on an fp16 overflow
        state.bad_steps = 0
    else:
        state.bad_steps += 1
        ui.warn("nonfinite", f"step {step + 1}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); "
                             "update skipped")
        run.folder.logger.text(f"step {step + 1}: non-finite loss {loss_value} / grad norm {grad_norm}; skipped")
        if state.bad_steps >= cfg.train.max_bad_steps:
            raise TrainingError(f"{state.bad_steps} consecutive steps with a non-finite loss or gradient norm "
                                f"(step {step + 1}); stopping. Last good checkpoint: {last_saved() or 'none'}. "
                                "Try a lower train.lr or train.dtype=float32")
    run.scaler.update()
    zero_gradients(run.optimizer, run.keep_grads)
    state.step = step + 1
    state.tokens_seen += tokens * run.par.world_size
    mine = [r for mb, dummy in batches if not dummy for r in mb]
    return Step(loss_value, grad_norm, lr, tokens * run.par.world_size,
                step // run.steps_per_epoch + (k + 1) / run.steps_per_epoch, step_flops(run.flops, mine))


@dataclass
class Meter:
    """Loss and throughput over the current log interval."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0
    flops: float = 0.0  # this process's model FLOPs
    since: float = field(default_factory=time.perf_counter)


def run_loop(run: Run) -> RunResult:
    cfg, par, state, logger = run.cfg, run.par, run.state, run.folder.logger
    total, first = state.total_steps, state.step
    meter = Meter()
    orders: dict[int, np.ndarray] = {}
    out = Step(float("nan"), float("nan"), 0.0, 0, 0.0)
    with saving.Writer(logger, run.folder.resume_from) as writer:
        with StopSignal() as stop, ui.progress(total, "training") as advance:
            advance(state.step)
            for step in range(state.step, total):
                _fault_injection(par.rank, step + 1)
                t_step = time.perf_counter()
                epoch = step // run.steps_per_epoch
                if epoch not in orders:
                    orders = {epoch: epoch_order(len(run.rows), epoch, cfg.train.seed, cfg.data.shuffle)}
                out = train_step(run, step, orders[epoch], writer.wait)
                writer.poll()
                advance(1)
                meter.step_times.append(time.perf_counter() - t_step)
                if step == first:
                    _report_start(logger, meter.step_times[-1])
                    if run.cudagraphs:
                        _warn_if_cuda_graphs_skipped()
                _log_step(run, meter, out)
                if state.step == 1:
                    _report_ranks(run, to_console=False)
                stop_now = parallel.any_flag(stop.signum is not None, par)
                if cfg.runtime.evaluation_inputs and state.step % cfg.runtime.evaluation_freq == 0 \
                        and state.step != total and not stop_now:
                    _evaluate(run, state.step)
                # no periodic save inside a streak of skipped updates: the last good checkpoint stays the newest
                periodic = state.step % cfg.runtime.save_steps == 0 and state.bad_steps == 0
                if periodic or state.step == total or stop_now:
                    saving.save(run, writer)
                if stop_now:
                    signum = stop.signum or signal.SIGTERM
                    raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {state.step}/{total}; "
                                      f"checkpoint saved: {writer.wait()}; continue with: {run.resume_hint}",
                                      exit_code=128 + int(signum))
        # the final evaluation runs while the last checkpoint is written
        if cfg.runtime.evaluation_inputs:
            _evaluate(run, state.step)
        last_saved = writer.wait()
    _report_ranks(run, to_console=run.par.distributed)  # collective; one plain process: train.log only
    if par.is_main:
        png = plot_loss(run.folder.log_dir / "scalars.jsonl", run.folder.log_dir / "loss_curve.png")
        if png:
            logger.info(f"loss curve: {png}")
    logger.info(f"done: {ui.count(state.step, 'step')}, last step's loss {out.loss:.4f}; "
                f"checkpoint {last_saved}")
    assert last_saved is not None
    return RunResult(run.folder.work_dir, run.folder.log_dir, last_saved, state.step, out.loss)


def _report_start(logger: Any, step_s: float) -> None:
    """How long this process took to its first step: start-up (imports, data, model load), then the step itself
    (on a GPU it compiles the layers)."""
    since = _process_age()
    logger.info(f"first step done {since:.1f} s after the process started (start-up {since - step_s:.1f} s, "
                f"the step {step_s:.1f} s)")


def _warn_if_cuda_graphs_skipped() -> None:
    """The layers were compiled with CUDA graphs (model.compile: cudagraphs, or "auto" for short LoRA and QLoRA
    micro-batches); where torch runs a compiled layer without them (a CPU tensor inside, a shape it cannot record)
    it only logs, and torch's logs show with --debug alone."""
    from torch._dynamo.utils import counters

    skips = counters["inductor"].get("cudagraph_skips", 0)
    if skips:
        ui.warn("cudagraphs_skipped", f"CUDA graphs: torch ran {ui.count(skips, 'compiled graph')} "
                                      "without CUDA graphs in the first step (--debug shows why); training goes on "
                                      "at the speed of compiled layers")


def _process_age() -> float:
    try:  # Linux: the start time in clock ticks since boot, exact where psutil rounds the boot time to a second
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        return time.time() - psutil.Process().create_time()


def _log_step(run: Run, meter: Meter, out: Step) -> None:
    state, logger, total = run.state, run.folder.logger, run.state.total_steps
    meter.losses.append(out.loss)
    meter.tokens += out.tokens
    meter.flops += out.flops
    scalars = {"loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "tokens": out.tokens, "epoch": out.epoch}
    if state.step % run.cfg.runtime.log_interval == 0 or state.step == total:
        now = time.perf_counter()
        sec_per_step = float(np.median(meter.step_times[-50:]))
        scalars.update(tokens_per_s=meter.tokens / max(now - meter.since, 1e-9),
                       memory_gib=memory_gib(run.par.device), eta_s=sec_per_step * (total - state.step))
        mfu = ""
        if run.peak_flops:  # GPUs only: the share of the device's peak bf16 matmul rate the model's work used
            scalars["mfu"] = meter.flops / max(now - meter.since, 1e-9) / run.peak_flops
            mfu = f" | MFU {100 * scalars['mfu']:.1f}%"
        logger.info(f"step {state.step}/{total} | loss {np.mean(meter.losses):.4f} | lr {out.lr:.3e} | "
                    f"grad {out.grad_norm:.3f} | {scalars['tokens_per_s']:,.0f} tok/s{mfu} | "
                    f"mem {scalars['memory_gib']:.2f} GiB | eta {format_duration(scalars['eta_s'])}")
        meter.losses, meter.tokens, meter.flops, meter.since = [], 0, 0.0, now
    logger.scalars(state.step, scalars)


def _report_ranks(run: Run, to_console: bool) -> None:
    """Each process's share of the model and optimizer state and its peak memory, one line per rank."""
    opt_local = opt_total = 0
    for p, st in run.optimizer.state.items():
        held = [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        opt_local += parallel.local_numel(held)
        opt_total += p.numel() * len(held)
    mine = {"rank": run.par.rank, "params_local": parallel.local_numel(run.model.parameters()),
            "params_total": sum(p.numel() for p in run.model.parameters()), "optim_local": opt_local,
            "optim_total": opt_total, **peak_memory(run.par.device)}
    for r in parallel.gather_objects(mine, run.par):
        (run.folder.logger.info if to_console else run.folder.logger.text)(rank_line(r))


def _evaluate(run: Run, step: int) -> None:
    """Every process generates (a sharded model answers only when all take part); rank 0 writes."""
    cfg = run.cfg
    if run.par.is_main:  # minutes on a CPU: say so before, not only after
        run.folder.logger.info(f"eval step {step}: answering {ui.count(len(cfg.runtime.evaluation_inputs), 'question')}"
                               f" (up to {cfg.runtime.evaluation_max_new_tokens} new tokens each)")
    with parallel.unsharded(run.par, run.loss_module):
        results = evaluate_chat(run.chat, cfg.runtime.evaluation_inputs, cfg.data.system,
                                cfg.runtime.evaluation_max_new_tokens)
    if run.par.is_main:
        write_eval(run.folder.log_dir, step, results)
        for r in results:
            run.folder.logger.info(f"eval step {step} | Q: {r['question']}\n  A: {r['answer']}")


def _fault_injection(rank: int, step: int) -> None:
    """TUNELAB_DEBUG_KILL=RANK:STEP (RANK may be *): that process kills itself with SIGKILL as the step starts;
    the tests' stand-in for a crash, the OOM killer or a lost node."""
    spec = os.environ.get("TUNELAB_DEBUG_KILL", "")
    if spec:
        who, at = spec.split(":")
        if int(at) == step and who in ("*", str(rank)):
            os.kill(os.getpid(), signal.SIGKILL)
