"""Checkpoints during a run: every process takes part in gathering the state, then rank 0 writes it on a background
thread while training goes on (train/checkpoint.py writes; this module decides when, and holds the thread).

One write at a time: a save first waits for the write in flight, so at most one gathered copy is held in memory,
and every path out of the loop (the end, an interrupt, an error) waits for it too, so a checkpoint the run
names is complete on disk. A failed write fails the run with its own one-line message at the next step boundary.
The gathered copy never shares memory with the live parameters or optimizer state (on the CPU, gathering returns
the live tensors themselves; those are copied), so the step that follows cannot change what is being written.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tunelab import ui
from tunelab.train import checkpoint as ckpt_io
from tunelab.train import named_state, parallel, rng
from tunelab.train.log import RunLogger


class Writer:
    """Rank 0's background checkpoint writer; on the other processes it only remembers the newest path."""

    def __init__(self, logger: RunLogger, last: Path | None):
        self.last = last  # the newest checkpoint: on rank 0, complete on disk
        self._logger = logger
        self._thread: threading.Thread | None = None
        self._pending: Path | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> Writer:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.wait()
            return
        try:  # the run is failing already: finish the write in flight, and say so if it failed too
            self.wait()
        except Exception as e:  # noqa: BLE001 (the run's own error is the one that propagates)
            ui.warn("checkpoint_write", str(e))

    def submit(self, path: Path, write: Callable[[], Any] | None) -> None:
        """Start writing `path` (rank 0), after the previous write has finished; `write` None: another process
        writes it."""
        self.wait()
        if write is None:
            self.last = path
            return
        self._pending = path
        # not a daemon: an interpreter that exits (Ctrl-C twice) still lets the write finish
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"tunelab-save-{path.name}")
        self._thread.start()

    def _run(self, write: Callable[[], Any]) -> None:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 (re-raised in the training thread by _finish)
            self._error = e

    def poll(self) -> None:
        """Account for a write that has finished (its log line, or its error); never waits."""
        if self._thread is not None and not self._thread.is_alive():
            self._finish()

    def wait(self) -> Path | None:
        """Wait for the write in flight; return the newest checkpoint."""
        if self._thread is not None:
            self._thread.join()
            self._finish()
        return self.last

    def _finish(self) -> None:
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        self.last = self._pending
        self._logger.info(f"saved checkpoint {self.last}")


def save(run: Any, writer: Writer) -> Path:
    """Gather (every process), then hand the copy to rank 0's writer. `run`: the train/setup.py Run."""
    par = run.par
    writer.wait()  # one gathered copy at a time; a failed write stops the run here at the latest
    path = run.folder.work_dir / f"iter_{run.state.step}"
    shards = None
    if named_state.shard_optimizer_on_save(par, run.model, run.optimizer, trainable_only=not run.full):
        shards = ckpt_io.staging_folder(run.folder.work_dir, run.state.step)
        if par.is_main:
            shutil.rmtree(shards, ignore_errors=True)
        parallel.barrier(par)
        optimizer = named_state.save_sharded_optimizer(par, run.model, run.optimizer, shards)
    else:
        optimizer = named_state.gather_optimizer(par, run.model, run.optimizer)
    payload = ckpt_io.Payload(weights=named_state.gather_weights(par, run.model, trainable_only=not run.full),
                              optimizer=optimizer,
                              rng_states=parallel.gather_objects(rng.rng_state(par.device), par),
                              scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                              optimizer_shards=shards, world_size=par.world_size)
    if not par.is_main:
        writer.submit(path, None)
        return path
    payload = _detached(payload, _live_storages(run.model, run.optimizer))
    state = dataclasses.replace(run.state)  # the loop moves on; the checkpoint keeps this step's numbers
    cfg = run.cfg
    writer.submit(path, lambda: ckpt_io.save_checkpoint(run.folder.work_dir, state, run.model, payload,
                                                        run.config_yaml, cfg.runtime.save_total_limit))
    return path


def _live_storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return {t.untyped_storage().data_ptr() for t in _plain_tensors(tensors) if t.device.type != "meta"}


def _plain_tensors(tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The tensors that own memory: a tensor subclass (a DTensor, torchao's NF4 weight) has none of its own, only
    the tensors it wraps."""
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            yield from _plain_tensors([x for x in (getattr(t, n) for n in names) if isinstance(x, torch.Tensor)])
        else:
            yield t


def _detached(obj: Any, live: set[int]) -> Any:
    """`obj` with every tensor that shares memory with a live one replaced by a copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if obj.untyped_storage().data_ptr() in live else obj
    if isinstance(obj, dict):
        return {k: _detached(v, live) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v, live) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _detached(getattr(obj, f.name), live)
                                           for f in dataclasses.fields(obj)})
    return obj
