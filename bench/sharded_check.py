"""Sharded training on one GPU, through the path `tunelab train` takes (set-up, FSDP2 wrapping, the step, the
checkpoint): do zero3 and zero3_offload give the unsharded run's losses, and what do they cost?

Cases (random-weight models of the peer's shapes, bench/peer_baseline.py; synthetic packed text; bf16):
  lora_1_8b_{ddp,zero3,zero3_offload}    1.8B LoRA r64, 1 x 2048 packed, activation checkpointing, 8 steps
  qlora_1_8b_{ddp,zero3,zero3_offload}   the same with NF4 weights (stored as bf16 so FSDP can shard them)
  full_7b_zero3_offload                  7B-shape full fine-tune, 1 x 2048, 4 steps: does it fit one H100?
`ddp` on one process is the plain, unsharded run each sharded case is compared with.

usage (one GPU; each case runs in a fresh `torchrun --standalone --nproc_per_node 1` process, so peak host
memory is the case's own):
  python bench/sharded_check.py                       # every case
  python bench/sharded_check.py lora_1_8b qlora_1_8b  # cases whose name starts with these
Prints one JSON line per case: {"case", "strategy", "method", "shape", "losses", "max_rel_diff_vs_ddp",
"peak_gpu_gib", "peak_host_gib", "tokens_per_s", "gpu", "date"}; results also go to
bench/results/<date>_<gpu>_sharded_check.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_baseline import SHAPES  # noqa: E402  (the peer shapes, unchanged)

# name: (shape, method, strategy, steps)
CASES = {f"{m}_1_8b_{s}": ("1_8b", m, s, 8) for m in ("lora", "qlora") for s in ("ddp", "zero3", "zero3_offload")}
CASES["full_7b_zero3_offload"] = ("7b", "full", "zero3_offload", 4)
SEQ = 2048
WORDS = [f"w{i}" for i in range(2000)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of the script itself


def word_tokenizer():
    """A word-level tokenizer of WORDS (no network on the GPU host)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    # a plain chat template, so that runs can answer evaluation questions (timing only: the weights are random)
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return fast


def make_model(shape: str, root: Path) -> Path:
    """A random-weight Llama of the shape, saved with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / shape
    if (out / "config.json").exists():
        if not (out / "tokenizer.json").exists():  # train_throughput.py's folder of the shape saves none
            word_tokenizer().save_pretrained(str(out))
        return out
    fast = word_tokenizer()
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), max_shard_size="4GB")
    fast.save_pretrained(str(out))
    del model
    return out


def make_data(root: Path) -> Path:
    """Documents of 200..1500 words (one token each): packed into 2048-token rows."""
    out = root / "text.jsonl"
    if not out.exists():
        rng = random.Random(0)
        docs = [" ".join(rng.choices(WORDS, k=rng.randint(200, 1500))) for _ in range(400)]
        out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return out


def run_one(name: str, root: Path) -> dict:
    """One case in this process (launched by torchrun): a real tunelab training run."""
    from tunelab.config.schema import Config
    from tunelab.train.log import read_scalars
    from tunelab.train.loop import train

    shape, method, strategy, steps = CASES[name]
    lora = None if method == "full" else {"r": 64, "alpha": 16, "dropout": 0.0}
    cfg = Config.model_validate({
        "model": {"path": str(make_model(shape, root)), "lora": lora, "gradient_checkpointing": True,
                  "quantization": "nf4" if method == "qlora" else "none"},
        "data": {"path": str(make_data(root)), "format": "pretrain", "max_length": SEQ, "pack_to_max_length": True,
                 "cache": False},
        "train": {"batch_size": 1, "accumulative_counts": 1, "max_steps": steps, "lr": 1e-5 if method == "full"
                  else 2e-4, "dtype": "bfloat16", "seed": 0, "strategy": strategy, "device": DEVICE},
        "runtime": {"log_interval": 1, "save_steps": 10_000, "save_total_limit": 1}})
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = train(cfg, name, work_dir=root / "runs" / name)
    rows = read_scalars(res.log_dir / "scalars.jsonl")
    speeds = sorted(r["tokens_per_s"] for r in rows[2:] if "tokens_per_s" in r)
    return {"case": name, "strategy": strategy, "method": method, "shape": shape,
            "losses": [round(r["loss"], 5) for r in rows],
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
            "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "tokens_per_s": round(speeds[len(speeds) // 2]) if speeds else None, "wall_s": round(time.time() - t0)}


def drive(prefixes: list[str]) -> None:
    names = [n for n in CASES if not prefixes or any(n.startswith(p) for p in prefixes)]
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    date = time.strftime("%Y%m%d")
    short = next((k.lower() for k in ("H100", "H200", "A100") if k in gpu), gpu.split()[0].lower())
    results = HERE / "results" / f"{date}_{short}_sharded_check.jsonl"
    keep = os.environ.get("TL_MODELS")  # a folder that keeps the models between calls (bench/scaling.py's too)
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        ref: dict[str, list[float]] = {}
        for name in names:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   __file__, "--one", name, tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"case"')]
            r = json.loads(lines[-1]) if lines else {"case": name, "error": (proc.stderr or proc.stdout)[-800:]}
            shape, method, strategy, _ = CASES[name]
            if strategy == "ddp" and "losses" in r:
                ref[f"{method}_{shape}"] = r["losses"]
            base = ref.get(f"{method}_{shape}")
            if base and "losses" in r and strategy != "ddp":
                r["max_rel_diff_vs_ddp"] = round(max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base)), 5)
            r.update(gpu=gpu, date=date, torch=torch.__version__)
            print(json.dumps(r), flush=True)
            with open(results, "a") as f:
                f.write(json.dumps(r) + "\n")
            for p in (Path(tmp) / "runs").glob("*"):  # checkpoints of a 7B full fine-tune are ~40 GB
                subprocess.run(["rm", "-rf", str(p)], check=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(run_one(sys.argv[2], Path(sys.argv[3]))), flush=True)
    else:
        drive(sys.argv[1:])
