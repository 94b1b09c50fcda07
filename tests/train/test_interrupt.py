"""Faults with real processes: kill -9 at any moment, SIGTERM, and a kill in the middle of a checkpoint save.
A resumed run logs exactly the losses of an uninterrupted one (fp32 on CPU)."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import chat_records, run_cli, tiny_config, write_jsonl
from tunelab.train.log import read_scalars

STEPS = 40


def losses(work: Path) -> dict[int, float]:
    out = {}
    for log in sorted(p for p in work.iterdir() if p.is_dir() and not p.name.startswith(("iter_", "."))):
        for r in read_scalars(log / "scalars.jsonl"):
            out[r["step"]] = r["loss"]  # log folders sort by start time: a resumed run's value wins
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("interrupt")
    data = write_jsonl(tmp / "data.jsonl", chat_records(16))
    cfg = tiny_config(tmp, tiny_model_dir, data,
                      train={"max_epochs": 10, "batch_size": 1, "accumulative_counts": 1, "max_steps": STEPS},
                      data={"pack_to_max_length": False},
                      model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                      runtime={"save_steps": 5, "save_total_limit": 2, "log_interval": 5})
    ref = run_cli("train", str(cfg), "--work-dir", str(tmp / "ref"))
    assert ref.returncode == 0, ref.stderr
    ref_losses = losses(tmp / "ref")
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    return tmp, cfg, ref_losses


def start(cfg: Path, work: Path, env: dict | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), *args, "--work-dir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"training ended before the fault could be injected: {proc.stderr.read()}"
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_kill_9_then_resume_gives_the_uninterrupted_losses(setup):
    tmp, cfg, ref = setup
    work = tmp / "killed"
    proc = start(cfg, work)
    wait_for(lambda: (work / "last_checkpoint").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = (work / "last_checkpoint").read_text().strip()
    assert int(done.split("_")[1]) < STEPS
    res = run_cli("train", str(cfg), "--work-dir", str(work), "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resumed from {work / done}" in res.stdout
    assert losses(work) == ref  # every step from the checkpoint on: bitwise the same loss


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_non_zero(setup, sig, code):
    tmp, cfg, ref = setup
    work = tmp / f"sig{int(sig)}"
    proc = start(cfg, work)
    wait_for(lambda: any(losses_file.exists() for losses_file in work.glob("*/scalars.jsonl"))
             and losses(work), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    step = int((work / "last_checkpoint").read_text().strip().split("_")[1])
    assert 0 < step < STEPS
    assert f"stopped by {sig.name} at step {step}/{STEPS}" in err
    # the command to continue names the real config file, ready to paste
    assert f"continue with: tunelab train {cfg} --work-dir {work} --resume" in err and "Traceback" not in err
    res = run_cli("train", str(cfg), "--work-dir", str(work), "--resume")
    assert res.returncode == 0, res.stderr
    assert losses(work) == ref


def test_the_continue_with_command_keeps_the_command_line_overrides_and_works_as_printed(setup):
    tmp, cfg, _ = setup
    work = tmp / "overrides"
    proc = start(cfg, work, args=("train.seed=5", "runtime.log_interval=1"))
    wait_for(lambda: (work / "last_checkpoint").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    printed = next(line for line in err.splitlines() if "continue with: " in line).split("continue with: ", 1)[1]
    assert printed == f"tunelab train {cfg} train.seed=5 runtime.log_interval=1 --work-dir {work} --resume"
    res = subprocess.run([sys.executable, "-m", *shlex.split(printed)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "differs" not in res.stderr


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(setup):
    tmp, cfg, ref = setup
    work = tmp / "killsave"
    proc = start(cfg, work, env={"TUNELAB_DEBUG_SLOW_SAVE": "2"})
    wait_for(lambda: (work / "last_checkpoint").exists() and list(work.glob(".iter_*.tmp*")), proc, timeout=180)
    pointer = (work / "last_checkpoint").read_text().strip()
    partial = list(work.glob(".iter_*.tmp*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial and pointer != partial[0].name
    assert (work / pointer / "trainer_state.json").exists()  # the pointer names a complete checkpoint
    res = run_cli("train", str(cfg), "--work-dir", str(work), "--resume")
    assert res.returncode == 0, res.stderr
    assert "removed an unfinished checkpoint" in res.stdout
    assert f"resumed from {work / pointer}" in res.stdout
    assert not list(work.glob(".iter_*.tmp*"))
    assert losses(work) == ref
