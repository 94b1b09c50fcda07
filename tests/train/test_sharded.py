"""Sharded training (FSDP2 on gloo, CPU processes under torchrun): 2 and 4 processes give the one-process loss
sequence for LoRA, DoRA, QLoRA and full fine-tuning; zero3 leaves each process 1/N of the model and optimizer state;
kill -9 of a 2-process run resumes on 1 and on 4 processes with the same losses, and its checkpoint converts
and merges; a dead rank and a missing model end every process with one clear line."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, chat_records, tiny_config, write_jsonl
from tunelab.config.load import load_config
from tunelab.errors import ConfigError, TrainingError
from tunelab.train.log import read_scalars
from tunelab.train.loop import train

TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 4  # 16 rows, 4 rows per optimizer step
FULL = ["model.lora=null", "train.lr=1e-4"]
# QLoRA across processes stores its weights as torchao's NF4Tensor ("auto", model/nf4.py), on a model wide enough
# for it; its one-process reference asks for the same format
QLORA = ["model.quantization=nf4", "model.path={nf4_model}"]
METHODS = {"lora": [], "full": FULL, "qlora": QLORA, "dora": ["model.lora.use_dora=true"],
           "qdora": ["model.quantization=nf4", "model.lora.use_dora=true"],  # DoRA keeps bitsandbytes' NF4
           "qsmall": ["model.quantization=nf4"]}  # the tiny model: too narrow for torchao's blocks, bitsandbytes
REF_ONLY = {"qlora": ["model.nf4_format=torchao"]}
# (processes, strategy, method): the one-process run each must reproduce, with the same rows per step
CASES = [(2, "zero3", "lora"), (2, "zero2", "full"), (2, "zero3", "full"), (2, "zero2", "lora"), (2, "zero3", "qlora"),
         (2, "zero3", "dora"), (2, "zero3", "qdora"), (2, "zero3", "qsmall"), (4, "zero3", "lora"), (4, "zero2", "full"),
         (4, "zero3", "full"), (4, "zero2", "lora")]


def overrides(method: str, nf4_model: Path) -> list[str]:
    return [o.format(nf4_model=nf4_model) for o in METHODS[method]]


def env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TUNELAB_DIST_TIMEOUT": "60", **extra}


def torchrun(n: int, *args: str, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` picks a free port, so tests never collide on one."""
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(n), *args], capture_output=True,
                          text=True, timeout=timeout, env=env(**extra_env), check=False)


def runs_of(work: Path) -> list[dict]:
    logs = sorted(p for p in work.iterdir() if p.is_dir() and not p.name.startswith(("iter_", ".")))
    return [r for log in logs for r in read_scalars(log / "scalars.jsonl")]


def log_text(work: Path) -> str:
    return "".join((p / "train.log").read_text() for p in sorted(work.iterdir()) if (p / "train.log").exists())


def assert_same_losses(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir, nf4_model_dir):
    tmp = tmp_path_factory.mktemp("sharded")
    data = write_jsonl(tmp / "data.jsonl", chat_records(16))
    cfg = tiny_config(tmp, tiny_model_dir, data, data={"pack_to_max_length": False},
                      train={"max_steps": STEPS, "batch_size": 1, "accumulative_counts": 4},
                      runtime={"save_steps": 2, "save_total_limit": -1, "evaluation_inputs": ["Who are you?"],
                               "evaluation_freq": 2, "evaluation_max_new_tokens": 4})
    refs = {}
    for method in METHODS:  # one process, in this process
        over = overrides(method, nf4_model_dir) + REF_ONLY.get(method, [])
        res = train(load_config(cfg, over), "tiny", work_dir=tmp / f"ref_{method}")
        refs[method] = res
    return tmp, cfg, refs


@pytest.fixture(scope="module")
def launched(base, nf4_model_dir):
    """Every case of CASES: one torchrun launch per process count, the runs one after another inside it."""
    tmp, cfg, _ = base
    out = {}
    for n in (2, 4):
        jobs = [{"config": str(cfg), "work_dir": str(tmp / f"{n}_{s}_{m}"),
                 "overrides": [f"train.strategy={s}", f"train.accumulative_counts={4 // n}",
                               *overrides(m, nf4_model_dir),
                               "model.gradient_checkpointing=true"]}
                for (k, s, m) in CASES if k == n]
        spec = tmp / f"jobs{n}.json"
        spec.write_text(json.dumps(jobs))
        res = torchrun(n, str(ROOT / "tests" / "train" / "sharded_runs.py"), str(spec), timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        out.update({(n, s, m): tmp / f"{n}_{s}_{m}" for (k, s, m) in CASES if k == n})
    return out


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_sharded_runs_give_the_one_process_losses(base, launched, case):
    _, _, refs = base
    work = launched[case]
    ref_dir = refs[case[2]].work_dir
    assert_same_losses(runs_of(work), runs_of(ref_dir))
    # evaluation ran through the sharded model on every rank; greedy answers match the one-process run
    evals = [json.loads(x) for log in work.glob("2*") for x in (log / "eval_outputs.jsonl").read_text().splitlines()]
    ref_evals = [json.loads(x) for x in (refs[case[2]].log_dir / "eval_outputs.jsonl").read_text().splitlines()]
    assert evals == ref_evals and [e["step"] for e in evals] == [2, 4]
    assert len([p for p in work.iterdir() if p.is_dir() and p.name.startswith("2")]) == 1  # only rank 0 logs
    log = log_text(work)
    assert f"strategy {case[1]} over {case[0]} processes" in log
    if case[2] in ("qlora", "qdora", "qsmall"):  # "auto": torchao's NF4Tensor, which FSDP2 shards, where it fits
        assert f"LoRA, nf4 ({'torchao' if case[2] == 'qlora' else 'bitsandbytes'})," in log
    if case[2] == "qsmall":
        assert ("nf4 weights: bitsandbytes, not torchao: only 0 of its 14 linear weights split into whole 64 x 256 "
                "blocks over 2 processes") in log


@pytest.mark.parametrize("n", [2, 4])
def test_zero3_leaves_each_process_one_nth_of_the_model_and_optimizer_state(launched, n):
    for method in ("lora", "full", "qlora") if n == 2 else ("lora", "full"):
        log = log_text(launched[(n, "zero3", method)])
        shares = re.findall(r"rank (\d): ([\d,]+) of ([\d,]+) parameter values .*optimizer state ([\d,]+) of "
                            r"([\d,]+) values, peak host ([\d.]+) GiB", log)
        final = shares[-n:]  # each rank's line at the end of the run
        assert sorted(int(r) for r, *_ in final) == list(range(n))
        for _, p_local, p_total, o_local, o_total, host in final:
            p_local, p_total, o_local, o_total = (int(x.replace(",", "")) for x in (p_local, p_total, o_local,
                                                                                    o_total))
            assert p_local == pytest.approx(p_total / n, rel=0.02)
            assert o_local == pytest.approx(o_total / n, rel=0.02) and o_total > 0
            assert float(host) > 0


def test_kill_9_then_resume_on_one_and_on_four_processes(base, tiny_model_dir):
    tmp, cfg, refs = base
    work = tmp / "killed"
    args = ["-m", "tunelab", "train", str(cfg), "--work-dir", str(work), "--deepspeed", "deepspeed_zero3",
            "train.accumulative_counts=2"]
    res = torchrun(2, *args, TUNELAB_DEBUG_KILL="*:4")  # every process dies as step 4 starts
    assert res.returncode != 0
    assert (work / "last_checkpoint").read_text().strip() == "iter_2"
    ref = runs_of(refs["lora"].work_dir)
    assert_same_losses(runs_of(work), ref[:3])

    one, plain, four = tmp / "resumed1", tmp / "resumed_plain", tmp / "resumed4"
    for w in (one, plain, four):
        shutil.copytree(work / "iter_2", w / "iter_2")
    # one process, sharded (a one-process group) and plain: the checkpoint does not depend on the strategy
    assert train(load_config(cfg, ["train.strategy=zero3"]), "tiny", work_dir=one, resume=True).steps == STEPS
    assert train(load_config(cfg), "tiny", work_dir=plain, resume=True).steps == STEPS
    res = torchrun(4, "-m", "tunelab", "train", str(cfg), "--work-dir", str(four), "--resume", "--deepspeed",
                   "zero3", "train.accumulative_counts=1")
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resumed from {four / 'iter_2'} at step 2/4" in res.stdout
    assert "resume: train.accumulative_counts 2 -> 1" in res.stdout
    for w in (one, plain, four):
        assert_same_losses(runs_of(w), ref[2:])

    # the sharded run's checkpoint is an ordinary one: to-hf gives the adapter the one-process run trained
    from tunelab.export.merge import merge_adapter
    from tunelab.export.to_hf import checkpoint_to_hf

    adapter = checkpoint_to_hf(load_config(cfg), four / "iter_4", tmp / "adapter")
    got = load_file(str(adapter / "adapter_model.safetensors"))
    want = load_file(str(refs["lora"].checkpoint / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    merged = merge_adapter(str(tiny_model_dir), adapter, tmp / "merged")
    assert list(merged.glob("*.safetensors"))


def test_a_dead_rank_makes_the_others_exit_naming_it(base):
    tmp, cfg, _ = base
    t0 = time.monotonic()
    res = torchrun(2, "-m", "tunelab", "train", str(cfg), "--work-dir", str(tmp / "dead"), "--deepspeed", "zero3",
                   "train.accumulative_counts=2", timeout=120, TUNELAB_DEBUG_KILL="1:3")
    assert res.returncode != 0
    assert time.monotonic() - t0 < 90
    assert "error: rank 1 of this run ended without an error message (killed? out of memory?); rank 0 stops " \
           "too" in res.stderr
    assert (tmp / "dead" / "last_checkpoint").read_text().strip() == "iter_2"


def test_zero3_with_a_missing_model_ends_every_process_with_one_line(base, tmp_path):
    _, cfg, _ = base
    res = torchrun(2, "-m", "tunelab", "train", str(cfg), "--work-dir", str(tmp_path / "w"), "--deepspeed",
                   "zero3", f"model.path={tmp_path / 'nope'}", timeout=120)
    assert res.returncode != 0
    assert re.findall(r"^error: .*", res.stderr, re.MULTILINE) == [f"error: model folder not found: {tmp_path / 'nope'}"]
    assert "[rank" not in res.stderr  # no process printed a traceback (torchrun's own summary follows)
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").glob("iter_*"))


@pytest.mark.parametrize("given, name", [("deepspeed_zero2", "zero2"), ("zero3", "zero3"),
                                         ("deepspeed_zero3_offload", "zero3_offload"), ("ZeRO1", "zero1")])
def test_xtuner_strategy_names_are_the_config_key(base, given, name):
    _, cfg, _ = base
    assert load_config(cfg, [f"train.strategy={given}"]).train.strategy == name


def test_the_tutorials_zero2_on_one_gpu_trains_as_the_plain_run(base):
    """XTuner's one-GPU tutorial passes --deepspeed deepspeed_zero2 without a launcher. In one process FSDP2 has
    nothing to split, so it trains as the plain run (which keeps CUDA graphs on a GPU; one-process FSDP2 was 8.7x
    slower there), says so, and its continue-with command keeps the flag."""
    tmp, cfg, refs = base
    work = tmp / "zero2_one"
    res = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg), "--work-dir", str(work), "--deepspeed",
                          "deepspeed_zero2"], capture_output=True, text=True, timeout=300, env=env(), check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    log = log_text(work)
    assert "strategy zero2 over 1 process (nothing to shard in one process: trains as the plain run)" in log
    assert_same_losses(runs_of(work), runs_of(refs["lora"].work_dir))
    from tunelab.train.loop import _resume_hint
    from tunelab.train.parallel import Parallel

    hint = _resume_hint("cfg.py", [], work, Parallel("zero2"))
    assert hint.endswith(f"--work-dir {shlex.quote(str(work))} --deepspeed zero2 --resume")
    assert "in one process has nothing to split" not in res.stderr  # zero3's warning, not zero2's
    # the offload strategies keep state in CPU memory; zero3 still runs FSDP2 in one process, with a warning
    assert [Parallel(s).shards for s in ("ddp", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")] == \
        [False, False, False, True, True, True]
    assert [Parallel(s, world_size=2).shards for s in ("ddp", "zero1", "zero2", "zero3")] == [False, True, True, True]


def test_the_speed_plan_hears_whether_the_weights_are_sharded(base, monkeypatch):
    """CUDA graphs are planned for unsharded weights only (one process or DDP): the set-up tells the plan whether
    FSDP2 shards them, not whether several processes run."""
    from tunelab.train import setup

    tmp, cfg, _ = base
    seen = []
    plan = setup.prepare_for_training
    monkeypatch.setattr(setup, "prepare_for_training", lambda *a, **k: seen.append(k["sharded"]) or plan(*a, **k))
    for strategy in ("zero2", "zero3"):  # one process: zero2 shards nothing, zero3 gathers each layer as it runs
        train(load_config(cfg, [f"train.strategy={strategy}", "train.max_steps=1"]), "tiny",
              work_dir=tmp / f"plan_{strategy}")
    assert seen == [False, True]


def test_an_unknown_strategy_lists_the_valid_ones(base):
    _, cfg, _ = base
    with pytest.raises(ConfigError, match=r"train\.strategy: unknown strategy 'zero4'; valid: ddp, zero1, zero2, "
                                          r"zero2_offload, zero3, zero3_offload"):
        load_config(cfg, ["train.strategy=zero4"])


def test_fp16_with_sharding_is_refused_before_anything_loads(base):
    tmp, cfg, _ = base
    with pytest.raises(TrainingError, match=r"train\.dtype float16 with strategy zero3: use bfloat16"):
        train(load_config(cfg, ["train.strategy=zero3", "train.dtype=float16"]), "tiny", work_dir=tmp / "fp16")


def test_torchao_nf4_in_a_one_process_sharded_run_is_refused_with_one_line(base):
    """FSDP2's one-process shortcut cannot rebuild an NF4Tensor; "auto" keeps bitsandbytes there."""
    from tunelab import ui

    tmp, cfg, _ = base
    warned = ui.warning_counts["one_process_zero3"]
    with pytest.raises(TrainingError, match=r"^model\.nf4_format torchao with strategy zero3_offload in one "
                                            r"process: .*use model\.nf4_format auto"):
        train(load_config(cfg, ["train.strategy=zero3_offload", "model.quantization=nf4",
                                "model.nf4_format=torchao"]), "tiny", work_dir=tmp / "nf4_one")
    assert ui.warning_counts["one_process_zero3"] == warned  # offloading does something in one process: no warning


def test_a_sharded_qlora_run_counts_the_flops_of_the_real_weights(base, tiny_model_dir):
    """MFU needs the FLOPs of the weights a 4-bit layer stands for; sharding stores them packed in other tensors."""
    from tunelab.model.adapters import add_lora
    from tunelab.model.kernels import flop_counter
    from tunelab.model.load import load_model
    from tunelab.train import parallel
    from tunelab.train.setup import open_folder, set_up

    tmp, cfg, _ = base
    plain = add_lora(load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"),
                                quantization="nf4"), load_config(cfg).model.lora)
    par = parallel.setup("zero3", torch.device("cpu"))
    try:
        folder = open_folder(tmp / "flops", False, par)
        with folder.logger:
            run = set_up(load_config(cfg, ["train.strategy=zero3", "model.quantization=nf4"]), par, folder, "", False)
            assert run.flops.per_token == pytest.approx(flop_counter(plain).per_token)
            del run
    finally:
        parallel.teardown(par)


def test_optimizer_state_too_large_to_gather_is_saved_in_shards(base):
    """Where the gathered optimizer state would not fit rank 0's memory (forced here: a limit of 0 bytes), each
    process writes its own shard (torch.distributed.checkpoint, safetensors); as many processes resume it with
    the same losses, another number is refused with one line."""
    from tunelab.errors import CheckpointError

    tmp, cfg, refs = base
    work, resumed = tmp / "dcp", tmp / "dcp_resumed"
    args = ["-m", "tunelab", "train", str(cfg), "--deepspeed", "zero3", *FULL, "train.accumulative_counts=2"]
    res = torchrun(2, *args, "--work-dir", str(work), TUNELAB_DEBUG_KILL="*:4", TUNELAB_GATHER_LIMIT_BYTES="0")
    assert res.returncode != 0
    ckpt = work / "iter_2"
    meta = json.loads((ckpt / "optimizer.json").read_text())
    assert (meta["format"], meta["world_size"]) == ("sharded", 2) and not (ckpt / "optimizer.safetensors").exists()
    shards = sorted((ckpt / "optimizer").iterdir())
    assert [p.suffix for p in shards] == [".safetensors"] * 2
    sizes = [sum(t.numel() for t in load_file(str(p)).values()) for p in shards]
    assert all(s == pytest.approx(sum(sizes) / 2, rel=0.1) for s in sizes)  # each process wrote its half

    ref = runs_of(refs["full"].work_dir)
    shutil.copytree(ckpt, resumed / "iter_2")
    res = torchrun(2, *args, "--work-dir", str(resumed), "--resume", TUNELAB_GATHER_LIMIT_BYTES="0")
    assert res.returncode == 0, res.stderr[-4000:]
    assert_same_losses(runs_of(resumed), ref[2:])
    with pytest.raises(CheckpointError, match=r"holds its optimizer state in 2 shards .*: resume it with 2 processes "
                                              r"and a zero strategy \(this run: 1 process, zero3\)"):
        train(load_config(cfg, ["train.strategy=zero3", *FULL]), "tiny", work_dir=tmp / "dcp_one",
              resume=str(ckpt))


def test_a_sharded_optimizer_state_in_several_files_resumes_and_a_lost_file_is_one_line(base, monkeypatch):
    """One process, sharded (a one-process group: a 7B full fine-tune with zero3_offload on one GPU), its
    optimizer state written in files of at most 20 kB (1 GiB in a run)."""
    from tunelab.errors import CheckpointError
    from tunelab.train import named_state

    tmp, cfg, _ = base
    monkeypatch.setenv("TUNELAB_GATHER_LIMIT_BYTES", "0")
    monkeypatch.setattr(named_state, "SHARD_FILE_BYTES", 20_000)
    over = ["train.strategy=zero3", *FULL]
    first = train(load_config(cfg, over), "tiny", work_dir=tmp / "dcp1")
    files = sorted((first.work_dir / "iter_2" / "optimizer").iterdir())
    parts = [load_file(str(p)) for p in files]
    assert len(files) > 3 and all(len(f) == 1 or sum(t.nbytes for t in f.values()) <= 20_000 for f in parts)
    shutil.copytree(first.work_dir / "iter_2", tmp / "dcp1_resumed" / "iter_2")
    again = train(load_config(cfg, over), "tiny", work_dir=tmp / "dcp1_resumed", resume=True)
    assert_same_losses(runs_of(again.work_dir), runs_of(first.work_dir)[2:])

    # zero1 and zero2 shard nothing in one process: the refusal says what resumes it
    with pytest.raises(CheckpointError, match=r"in 1 shard \(saved by 1 process with torch\.distributed\.checkpoint\): "
                                              r"resume it with 1 process and zero3, zero2_offload or zero3_offload "
                                              r"\(this run: 1 process, zero2; zero1 and zero2 shard nothing in one "
                                              r"process\)$"):
        train(load_config(cfg, ["train.strategy=zero2", *FULL]), "tiny", work_dir=tmp / "dcp1_zero2",
              resume=str(first.work_dir / "iter_2"))
    files[1].unlink()
    with pytest.raises(CheckpointError, match=r"optimizer: the optimizer shards cannot be read \(.+\)$"):
        train(load_config(cfg, over), "tiny", work_dir=first.work_dir, resume=str(first.work_dir / "iter_2"))


def test_offloaded_checkpointing_under_zero3_gives_the_one_process_losses(base):
    """The long-row memory path (layer inputs kept on the CPU, recomputed in backward) inside FSDP2's layers."""
    tmp, cfg, refs = base
    from tunelab import ui

    warned = ui.warning_counts["one_process_zero3"]
    res = train(load_config(cfg, ["train.strategy=zero3", "model.gradient_checkpointing=offload"]), "tiny",
                work_dir=tmp / "z3_offload")
    assert "activation checkpointing offloaded to CPU" in log_text(res.work_dir)
    # one process: FSDP2 still runs, and the user hears (once per process) that the plain run is faster
    assert ui.warning_counts["one_process_zero3"] == warned + 1
    assert "strategy zero3 in one process has nothing to split and runs slower" in ui._warning_text["one_process_zero3"]
    assert_same_losses(runs_of(res.work_dir), runs_of(refs["lora"].work_dir))
