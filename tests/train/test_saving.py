"""Checkpoints are written off the critical path: training goes on while one is written, one write at a time,
each holding its own step's state; a failed write fails the run; every way out waits for the write in flight."""

import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import chat_records, tiny_config, write_jsonl
from tunelab.config.load import load_config
from tunelab.errors import TrainingError
from tunelab.train import checkpoint as ckpt_io
from tunelab.train.log import RunLogger, read_scalars
from tunelab.train.loop import train
from tunelab.train.saving import Writer


def _logged_steps(log_dir: Path) -> list[int]:
    return [r["step"] for r in read_scalars(log_dir / "scalars.jsonl")]


def test_training_goes_on_while_a_checkpoint_is_written(tmp_path, tiny_model_dir, monkeypatch):
    real = ckpt_io.save_checkpoint
    seen = {"overlapped": [], "active": 0, "most": 0}
    lock = threading.Lock()

    def slow_write(work_dir, state, *args, **kwargs):
        """Holds each write until the run has logged the next step (what a slow disk does to a big checkpoint)."""
        with lock:
            seen["active"] += 1
            seen["most"] = max(seen["most"], seen["active"])
        try:
            if state.step < state.total_steps:
                end = time.monotonic() + 30
                while state.step + 1 not in _logged_steps(Path(state.log_dir)) and time.monotonic() < end:
                    time.sleep(0.01)
                seen["overlapped"].append(state.step + 1 in _logged_steps(Path(state.log_dir)))
            return real(work_dir, state, *args, **kwargs)
        finally:
            with lock:
                seen["active"] -= 1

    monkeypatch.setattr(ckpt_io, "save_checkpoint", slow_write)
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(8))
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data, model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}}),
                      ["train.max_steps=4", "runtime.save_steps=1", "runtime.save_total_limit=-1",
                       "data.pack_to_max_length=false", "train.batch_size=1", "train.accumulative_counts=1"])
    res = train(cfg, "tiny", work_dir=tmp_path / "w")
    assert seen["overlapped"] == [True, True, True]  # the next step ran while each of steps 1-3 was written
    assert seen["most"] == 1  # never two writes at once
    assert res.checkpoint == tmp_path / "w" / "iter_4"
    assert (tmp_path / "w" / "last_checkpoint").read_text().strip() == "iter_4"
    assert all((tmp_path / "w" / f"iter_{i}" / "trainer_state.json").exists() for i in range(1, 5))

    # iter_2 was written while step 3 changed the weights and optimizer state: it still holds step 2's
    monkeypatch.setattr(ckpt_io, "save_checkpoint", real)
    shutil.copytree(tmp_path / "w" / "iter_2", tmp_path / "again" / "iter_2")
    again = train(cfg, "tiny", work_dir=tmp_path / "again", resume=True)
    ref = {r["step"]: r["loss"] for r in read_scalars(res.log_dir / "scalars.jsonl")}
    got = {r["step"]: r["loss"] for r in read_scalars(again.log_dir / "scalars.jsonl")}
    assert got == {3: ref[3], 4: ref[4]}


def _writer(tmp_path: Path) -> Writer:
    return Writer(RunLogger(tmp_path / "log", enabled=False), last=None)


def test_a_failed_write_fails_the_run_with_its_own_message(tmp_path):
    writer = _writer(tmp_path)

    def full_disk():
        raise TrainingError("could not save checkpoint iter_2: No space left on device")

    writer.submit(tmp_path / "iter_2", full_disk)
    with pytest.raises(TrainingError, match="^could not save checkpoint iter_2: No space left on device$"):
        writer.wait()
    assert writer.last is None  # the failed one is never named as saved


def test_every_way_out_waits_for_the_write_in_flight(tmp_path):
    done = tmp_path / "iter_1"

    def slow_write():
        time.sleep(0.5)
        done.mkdir()

    with pytest.raises(KeyboardInterrupt), _writer(tmp_path) as writer:
        writer.submit(done, slow_write)
        raise KeyboardInterrupt  # Ctrl-C twice: the run aborts, the checkpoint being written still completes
    assert done.is_dir()


def test_a_write_failing_while_the_run_fails_does_not_hide_the_run_error(tmp_path, capsys):
    def broken():
        raise TrainingError("could not save checkpoint iter_3: Read-only file system")

    with pytest.raises(ValueError, match="the run's own error"), _writer(tmp_path) as writer:
        writer.submit(tmp_path / "iter_3", broken)
        raise ValueError("the run's own error")
    assert "could not save checkpoint iter_3: Read-only file system" in capsys.readouterr().err


def test_checkpoint_files_follow_the_process_umask(tmp_path, tiny_model_dir):
    """safetensors writes 0600 files; a checkpoint is read by other users' jobs (convert, merge, a server)."""
    import os
    import stat

    data = write_jsonl(tmp_path / "data.jsonl", chat_records(4))
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, data), ["train.max_steps=1"])
    old = os.umask(0o022)
    try:
        res = train(cfg, "tiny", work_dir=tmp_path / "w")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [res.checkpoint, *res.checkpoint.rglob("*")]}
    assert modes["adapter_model.safetensors"] == modes["optimizer.safetensors"] == 0o644, modes
    assert modes[res.checkpoint.name] == 0o755 and set(modes.values()) == {0o644, 0o755}, modes
