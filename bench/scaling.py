"""Scaling over several GPUs, measured through the command a user types: `torchrun ... -m tunelab train CFG
--deepspeed NAME`, one fresh launch per case, with tunelab's GPU defaults (no speed keys in the config).

Cases (random-weight models of the peer's shapes, bench/peer_baseline.py; word-level synthetic text packed into
4096-token rows; bf16):
  lora_1_8b      1.8B LoRA r64, 4 x 4096 rows per GPU and micro-batch: the 1-GPU run (plain) takes as many
                 micro-batches per step as the largest run has GPUs, so every run trains on the same rows per
                 step and its losses can be compared; then ddp, zero2 and zero3 on each larger GPU count.
  full_7b        7B-shape full fine-tune, zero3, 4 x 4096 rows per GPU, on the largest GPU count (tokens/s per
                 GPU, peak memory per GPU).
  qlora_1_8b     1.8B QLoRA r64, 1 x 4096 rows per GPU: one GPU (bitsandbytes NF4), then zero3 on the largest GPU
                 count with each NF4 format (auto = torchao's NF4Tensor; bitsandbytes packed in bf16), and
                 zero3_offload (auto); every run trains on the same rows per step.
  qlora_cudagraphs  the tutorial's QLoRA (1.8B, 1 x 1024, 4 micro-batches per step) on one GPU, with each
                 --variants pair of model.compile and model.attn_implementation.
  lora_cudagraphs  the same for 1.8B LoRA, 1 x 4096, 4 micro-batches per step.
  qlora_70b      70B-shape QLoRA r64, zero3 on the largest GPU count, 1 x 2048 rows per GPU, 6 steps: does it
                 fit, at what memory and speed. The random weights are saved in float8 (a 70B model in bf16,
                 140 GB, exceeds the host's disk); loading casts them to bf16 and quantizes them to NF4.
  nodes          two "nodes" on one host (torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT,
                 one process and one GPU each), zero3, 1.8B LoRA 1 x 2048: trains 4 steps and saves; then
                 --resume with max_steps 8 on the same two nodes.

usage: python bench/scaling.py [--gpus 1,2] [--steps 10] [--root DIR] [--out FILE] CASE [...]
Prints one JSON line per run: {"case", "impl": "tunelab", "strategy", "gpus", "tokens_per_s" (all GPUs),
"tokens_per_s_per_gpu", "efficiency" (per-GPU rate over the 1-GPU run's), "peak_gib" (rank 0), "losses",
"max_rel_diff_vs_1gpu", "startup_s", "gpu", "date"}; --out appends them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_baseline import SHAPES  # noqa: E402  (bench/ on the path first)
from sharded_check import WORDS, make_model, word_tokenizer  # noqa: E402  (random-weight models, peer shapes)

# a smoke test of this script on a CPU: --shape tiny
SHAPES.setdefault("tiny", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": len(WORDS) + 4})
# ... and of qlora_1_8b, wide enough for torchao's NF4 blocks: --shape small
SHAPES.setdefault("small", {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                            "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": len(WORDS) + 4})

SHAPES.setdefault("70b", {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                          "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256})  # Llama-3-70B

ROW = 4096


def make_fp8_model(shape: str, root: Path, shard_bytes: int = 4 << 30) -> Path:
    """A random-weight Llama of the shape in float8 files (norms in bf16), written one tensor at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / f"{shape}_fp8"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shp in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shp, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02).to(torch.float8_e4m3fn)
        shard[name] = t.cpu()
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    cfg.save_pretrained(str(out))
    word_tokenizer().save_pretrained(str(out))
    return out


def make_data(root: Path, n_docs: int = 2400) -> Path:
    """Documents of 200..1500 words (one token each): about 500 rows of 4096 tokens."""
    out = root / "scaling_text.jsonl"
    if not out.exists():
        rng = random.Random(0)
        docs = [" ".join(rng.choices(WORDS, k=rng.randint(200, 1500))) for _ in range(n_docs)]
        out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return out


LOG_INTERVAL = 1  # --log-interval
SAVE_STEPS = 10_000  # --save-steps
EVAL_EVERY = 0  # --eval-every: runtime.evaluation_freq, with two evaluation questions (0: none)
LORA_DROPOUT = 0.0  # --lora-dropout (the peer's cases use 0, the built-in XTuner configs 0.1)


def write_config(folder: Path, model: Path, data: Path, *, lora: bool, rows: int, accum: int, steps: int,
                 max_length: int = ROW, **model_keys) -> Path:
    cfg = {"model": {"path": str(model), "lora": {"r": 64, "alpha": 16, "dropout": LORA_DROPOUT} if lora else None,
                     **model_keys},
           "data": {"path": str(data), "format": "pretrain", "max_length": max_length, "pack_to_max_length": True},
           "train": {"batch_size": rows, "accumulative_counts": accum, "max_steps": steps,
                     "lr": 2e-4 if lora else 1e-5, "dtype": "bfloat16", "seed": 0},
           "runtime": {"log_interval": LOG_INTERVAL, "save_steps": SAVE_STEPS, "save_total_limit": 1,
                       **({"evaluation_freq": EVAL_EVERY, "evaluation_inputs": ["w1 w2 w3", "w4 w5"]}
                          if EVAL_EVERY else {})}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def launch(cfg: Path, work: Path, gpus: int, strategy: str, timeout: int, extra: tuple[str, ...] = ()) -> dict:
    """One `torchrun -m tunelab train` run; its figures read back from the run's own log files."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
           "-m", "tunelab", "train", str(cfg), "--work-dir", str(work), *extra]
    if strategy != "ddp":
        cmd += ["--deepspeed", strategy]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:  # what it logged until then still counts
        tail = (e.stderr or b"")[-1500:]
        return {"rc": "timeout", "wall_s": round(time.time() - t0), **read_run(work),
                "error": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    return {"rc": proc.returncode, "wall_s": round(time.time() - t0), **read_run(work),
            **({"error": child_error(proc.stderr + proc.stdout)} if proc.returncode else {})}


def child_error(text: str) -> str:
    """The failing process's own last lines: torchrun's report of the failure, which follows them, says nothing."""
    cut = text.find("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
    cut = text.rfind("Traceback (most recent call last)", 0, cut) if cut >= 0 else -1
    return (text[:cut] if cut > 0 else text)[-1500:]


def read_run(work: Path) -> dict:
    scalars = sorted(work.rglob("scalars.jsonl"))
    logs = sorted(work.rglob("train.log"))
    if not scalars:
        return {}
    rows = [json.loads(x) for x in scalars[-1].read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in rows[2 if LOG_INTERVAL == 1 else 1:] if "tokens_per_s" in r)
    out = {"losses": [round(r["loss"], 5) for r in rows], "steps": [rows[0].get("step"), rows[-1].get("step")]
           if rows else None,
           "tokens_per_s": round(speeds[len(speeds) // 2]) if speeds else None,
           "peak_gib": round(max((r.get("memory_gib", 0) for r in rows), default=0), 2),
           "mfu": round(sorted(r["mfu"] for r in rows[2:] if "mfu" in r)[len(speeds) // 2], 4)
           if speeds and "mfu" in rows[-1] else None}
    if SAVE_STEPS < 10_000 or EVAL_EVERY:  # each logged interval's rate: the steps around a checkpoint or an
        # evaluation against the others
        out["tokens_per_s_by_step"] = {r.get("step"): round(r["tokens_per_s"]) for r in rows if "tokens_per_s" in r}
    if logs:
        m = re.search(r"first step done ([\d.]+) s after the process started \(start-up ([\d.]+) s",
                      logs[-1].read_text())
        if m:
            out.update(first_step_s=float(m.group(1)), startup_s=float(m.group(2)))
        if EVAL_EVERY:  # evaluations started and answers written
            text = logs[-1].read_text()
            out["evaluations"] = [len(re.findall(r"eval step \d+: answering", text)), text.count("\n  A: ")]
        # the rank lines come after the first step and again at the end: the last one per rank wins
        hosts = dict(re.findall(r"rank (\d+): .*peak host ([\d.]+) GiB", logs[-1].read_text()))
        if hosts:
            out["peak_host_gib_per_rank"] = [float(hosts[k]) for k in sorted(hosts, key=int)]
    return out


def rel_diff(a: list[float], b: list[float]) -> float | None:
    pairs = list(zip(a, b))
    return round(max(abs(x - y) / abs(y) for x, y in pairs), 5) if pairs else None


def per_gpu(r: dict, n: int, base: dict | None = None) -> dict:
    """Adds tokens/s per GPU and, against the one-GPU run `base`, the scaling efficiency."""
    if r.get("tokens_per_s"):
        r["tokens_per_s_per_gpu"] = round(r["tokens_per_s"] / n)
    if n > 1 and base and base.get("tokens_per_s_per_gpu") and r.get("tokens_per_s_per_gpu"):
        r["efficiency"] = round(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 3)
    return r


def lora_scaling(root: Path, gpus: list[int], steps: int, emit, shape: str,
                 strategies: tuple[str, ...] = ("ddp", "zero2", "zero3")) -> None:
    model, data = make_model(shape, root), make_data(root)
    rows_per_step = 4 * max(gpus)
    base = None
    for n in gpus:
        for strategy in (["ddp"] if n == 1 else strategies):
            work = root / "runs" / f"lora_{n}_{strategy}"
            shutil.rmtree(work, ignore_errors=True)
            cfg = write_config(work, model, data, lora=True, rows=4, accum=rows_per_step // (4 * n), steps=steps)
            r = launch(cfg, work, n, strategy, timeout=300)
            r.update(case="lora_1_8b", strategy=strategy if n > 1 else "single", gpus=n,
                     rows_per_step=rows_per_step)
            per_gpu(r, n, base)
            if n == 1:
                base = r
            elif base:
                r["max_rel_diff_vs_1gpu"] = rel_diff(r.get("losses", []), base.get("losses", []))
            emit(r)
            shutil.rmtree(work, ignore_errors=True)  # the checkpoint (~0.8 GB)


def full_7b(root: Path, gpus: list[int], steps: int, emit) -> None:
    model, data = make_model("7b", root), make_data(root)
    n = max(gpus)
    work = root / "runs" / f"full7b_{n}_zero3"
    cfg = write_config(work, model, data, lora=False, rows=4, accum=1, steps=steps)
    r = launch(cfg, work, n, "zero3", timeout=420)
    r.update(case="full_7b", strategy="zero3", gpus=n)
    emit(per_gpu(r, n))
    shutil.rmtree(work, ignore_errors=True)  # weights and sharded optimizer state, ~80 GB


def qlora(root: Path, gpus: list[int], steps: int, emit, shape: str) -> None:
    model, data = make_model(shape, root), make_data(root)
    n = max(gpus)
    base = None
    runs = [(1, "single", "auto")] + [(n, s, f) for s, f in (("zero3", "auto"), ("zero3", "bitsandbytes"),
                                                              ("zero3_offload", "auto"))]
    for k, strategy, fmt in runs:
        work = root / "runs" / f"qlora_{k}_{strategy}_{fmt}"
        shutil.rmtree(work, ignore_errors=True)
        cfg = write_config(work, model, data, lora=True, rows=1, accum=n // k, steps=steps, quantization="nf4",
                           nf4_format=fmt)
        r = launch(cfg, work, k, "ddp" if k == 1 else strategy, timeout=300)
        log = "".join(p.read_text() for p in work.rglob("train.log"))
        m = re.search(r"nf4 \((\w+)\)", log)
        r.update(case="qlora_1_8b", strategy=strategy, gpus=k, nf4_format=fmt, stored_as=m.group(1) if m else None)
        emit(per_gpu(r, k, base))
        base = base or r
        shutil.rmtree(work, ignore_errors=True)


def cudagraphs_cli(root: Path, steps: int, emit, shape: str, variants: str, case: str, gpus: int = 1,
                   strategy: str = "ddp") -> None:
    """CUDA graphs through `tunelab train` on `gpus` GPUs (`strategy`), 4 micro-batches of one row per step and process:
    the tutorial's QLoRA (qlora_cudagraphs, 1,024-token rows) or 1.8B LoRA (lora_cudagraphs, 4,096-token rows);
    `variants` lists model.compile:model.attn_implementation pairs, the one under test first."""
    quantization, length = {"qlora_cudagraphs": ("nf4", 1024), "lora_cudagraphs": ("none", 4096)}[case]
    model, data = make_model(shape, root), make_data(root)
    for variant in variants.split(","):
        compile_mode, attn = variant.split(":")
        work = root / "runs" / f"{case}_{compile_mode}_{attn}"
        shutil.rmtree(work, ignore_errors=True)
        cfg = write_config(work, model, data, lora=True, rows=1, accum=4, steps=steps, max_length=length,
                           quantization=quantization, compile=compile_mode, attn_implementation=attn)
        r = launch(cfg, work, gpus, strategy, timeout=300)
        emit(per_gpu({**r, "case": case, "compile": compile_mode, "attn": attn, "gpus": gpus, "strategy": strategy},
                     gpus))
        shutil.rmtree(work, ignore_errors=True)


def qlora_70b(root: Path, gpus: list[int], steps: int, emit) -> None:
    t0 = time.time()
    model, data = make_fp8_model("70b", root), make_data(root)
    made_s = round(time.time() - t0)
    n = max(gpus)
    work = root / "runs" / f"qlora70b_{n}_zero3"
    shutil.rmtree(work, ignore_errors=True)
    cfg = write_config(work, model, data, lora=True, rows=1, accum=1, steps=steps, max_length=2048,
                       quantization="nf4")
    r = launch(cfg, work, n, "zero3", timeout=max(60, 560 - made_s))
    r.update(case="qlora_70b", strategy="zero3", gpus=n, model_written_s=made_s)
    emit(per_gpu(r, n))
    shutil.rmtree(work, ignore_errors=True)


def two_nodes(root: Path, emit, shape: str, port: int = 29571) -> None:
    """Two torchrun launches that meet at one rendezvous, as two nodes would; each sees one GPU."""
    model, data = make_model(shape, root), make_data(root)
    work = root / "runs" / "nodes"
    shutil.rmtree(work, ignore_errors=True)
    results = {}
    for phase, steps in (("train", 4), ("resume", 8)):
        cfg = write_config(work, model, data, lora=True, rows=1, accum=1, steps=steps, max_length=2048)
        procs = []
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"tl_{phase}",
                   "-m", "tunelab", "train", str(cfg), "--work-dir", str(work / "run"), "--deepspeed", "zero3"]
            if phase == "resume":
                cmd.append("--resume")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(node)}
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outs = [p.communicate(timeout=240)[0] for p in procs]
        results[phase] = {"rc": [p.returncode for p in procs], **read_run(work / "run"),
                          "tail": outs[0][-600:] if any(p.returncode for p in procs) else ""}
    checkpoints = sorted(str(p.relative_to(work)) for p in work.rglob("adapter_model.safetensors"))
    emit({"case": "two_nodes_one_host", "strategy": "zero3", "gpus": 2, "nodes": 2, **results,
          "checkpoints": checkpoints})


def profile_startup(root: Path, shape: str, out: Path) -> None:
    """Where a fresh `tunelab train` process spends its time before and in its first steps (cProfile)."""
    import pstats

    work = root / "runs" / "profile"
    shutil.rmtree(work, ignore_errors=True)
    cfg = write_config(work, make_model(shape, root), make_data(root), lora=True, rows=4, accum=1, steps=2)
    prof = out / "startup.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "tunelab", "train", str(cfg),
                    "--work-dir", str(work)], env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}, check=False,
                   capture_output=True, timeout=300)
    with open(out / "startup_profile.txt", "w") as f:
        stats = pstats.Stats(str(prof), stream=f)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+", choices=["lora_1_8b", "full_7b", "qlora_1_8b", "qlora_cudagraphs", "lora_cudagraphs",
                                          "qlora_70b", "nodes"])
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--root", default="/tmp/tl_models")
    ap.add_argument("--strategies", default="ddp,zero2,zero3", help="lora_1_8b on more than one GPU")
    ap.add_argument("--out")
    ap.add_argument("--profile-startup", action="store_true",
                    help="lora_1_8b: also run the 1-GPU case once under cProfile (2 steps), stats to --out's folder")
    ap.add_argument("--shape", default="1_8b", help="lora_1_8b, qlora_1_8b and nodes: the model shape (tiny: a CPU smoke test)")
    ap.add_argument("--variants", default="cudagraphs:auto,auto:auto",
                    help="qlora_cudagraphs, lora_cudagraphs: model.compile:model.attn_implementation pairs, comma-separated")
    ap.add_argument("--strategy", default="ddp", help="qlora_cudagraphs, lora_cudagraphs: the runs' --deepspeed "
                    "strategy (ddp: none)")
    ap.add_argument("--log-interval", type=int, default=1, help="the runs' runtime.log_interval (1: every step)")
    ap.add_argument("--save-steps", type=int, default=10_000, help="the runs' runtime.save_steps (a checkpoint's "
                    "cost: each step's rate is reported)")
    ap.add_argument("--eval-every", type=int, default=0, help="the runs answer two evaluation questions every N "
                    "steps and at the end (runtime.evaluation_freq)")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="the runs' model.lora.dropout")
    a = ap.parse_args()
    global LOG_INTERVAL, SAVE_STEPS, EVAL_EVERY, LORA_DROPOUT
    LOG_INTERVAL, SAVE_STEPS, EVAL_EVERY, LORA_DROPOUT = a.log_interval, a.save_steps, a.eval_every, a.lora_dropout
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    gpus = [int(x) for x in a.gpus.split(",")]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = time.strftime("%Y%m%d")

    def emit(r: dict) -> None:
        r.update(impl="tunelab", gpu=name, date=date, torch=torch.__version__)
        line = json.dumps(r)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    for case in a.cases:
        if case == "lora_1_8b":
            lora_scaling(root, gpus, a.steps, emit, a.shape, tuple(a.strategies.split(",")))
            if a.profile_startup:
                profile_startup(root, a.shape, Path(a.out).parent if a.out else root)
        elif case == "full_7b":
            full_7b(root, gpus, max(4, a.steps // 2), emit)
        elif case == "qlora_1_8b":
            qlora(root, gpus, a.steps, emit, a.shape)
        elif case in ("qlora_cudagraphs", "lora_cudagraphs"):
            cudagraphs_cli(root, a.steps, emit, a.shape, a.variants, case, max(gpus), a.strategy)
        elif case == "qlora_70b":
            qlora_70b(root, gpus, 6, emit)
        else:
            two_nodes(root, emit, a.shape)


if __name__ == "__main__":
    main()
