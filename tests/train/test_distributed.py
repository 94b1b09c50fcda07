"""Several processes under torchrun (gloo on CPU): the same loss curve as one process with the same rows per
step, and only rank 0 writes logs and checkpoints."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import chat_records, run_cli, tiny_config, write_jsonl
from tunelab.train.log import read_scalars


def logged(work: Path) -> list[dict]:
    logs = [p for p in work.iterdir() if p.is_dir() and not p.name.startswith("iter_")]
    assert len(logs) == 1, logs  # one log folder: rank 1 wrote nothing
    return read_scalars(logs[0] / "scalars.jsonl")


def test_two_processes_match_one_process(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(16))
    cfg = tiny_config(tmp_path, tiny_model_dir, data, data={"pack_to_max_length": False},
                      train={"max_epochs": 2, "batch_size": 1, "accumulative_counts": 2})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tunelab",
                          "train", str(cfg), "--work-dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout
    single = run_cli("train", str(cfg), "--work-dir", str(tmp_path / "one"), "train.accumulative_counts=4",
                     env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    ddp, one = logged(tmp_path / "ddp"), logged(tmp_path / "one")
    assert len(ddp) == len(one) == 8
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "ddp").glob("iter_*")) == ["iter_8"]


def test_resume_under_torchrun_continues_every_process_dropout_stream(tmp_path, tiny_model_dir):
    """Each process's random state is saved and restored by rank: with dropout on, rows of different lengths
    use the generators differently per rank, so restoring rank 0's state everywhere would change the losses."""
    records = [{"messages": [{"role": "user", "content": "word " * (1 + i % 7)},
                             {"role": "assistant", "content": "answer " * (2 + i % 5)}]} for i in range(16)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, data={"pack_to_max_length": False},
                      model={"lora": {"r": 4, "alpha": 8, "dropout": 0.3}},
                      train={"max_steps": 4, "batch_size": 1, "accumulative_counts": 2},
                      runtime={"save_steps": 2, "save_total_limit": -1})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(work: Path, *extra: str) -> None:
        res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tunelab",
                              "train", str(cfg), "--work-dir", str(work), *extra],
                             capture_output=True, text=True, timeout=600, env=env, check=False)
        assert res.returncode == 0, res.stderr[-3000:]

    launch(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "iter_2", tmp_path / "resumed" / "iter_2")
    launch(tmp_path / "resumed", "--resume")
    full = read_scalars(next((tmp_path / "full").glob("2*/scalars.jsonl")))
    resumed = read_scalars(next((tmp_path / "resumed").glob("2*/scalars.jsonl")))
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[2:]]
