"""QLoRA under FSDP2: which 4-bit weight format shards better, bitsandbytes NF4 packed into bf16 storage (the
FSDP-QLoRA recipe, what `tunelab train` runs today) or torchao's NF4Tensor (which brings its own FSDP2 all-gather
hooks)? The same step as `tunelab train` (LoRA r64 on every linear layer of a 1.8B-shape model, checkpointing per
decoder layer, compiled layers, tunelab's loss module, the sharding of train/parallel.py, AdamW), one packed row
of 2048 tokens per process and step, 3 warm-up steps then 8 timed ones.

usage (one fresh launch per case):
  torchrun --standalone --nproc_per_node N bench/qlora_sharding.py --quant bnb|torchao --strategy none|zero2|zero3
      [--compile on|off] [--prof] [--shape 1_8b] [--models DIR] [--out FILE]
  --strategy none: no sharding (one process); --prof: rank 0 prints the profiler's busiest ops over 2 steps.
Prints one JSON line (rank 0): {"case": "qlora_sharding", "quant", "strategy", "gpus", "compile",
"tokens_per_s_per_gpu", "step_s", "peak_gib", "weights_gib", "losses", "dynamo", "gpu", "date"}.
On a CPU (a smoke test of this script): --shape tiny with gloo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_baseline import SHAPES, packed_batch  # noqa: E402  (the peer's shapes and workload, unchanged)
from train_throughput import TARGETS, to_rows  # noqa: E402

from tunelab.config.schema import LoraSettings, ModelSettings, TrainSettings  # noqa: E402
from tunelab.model import kernels  # noqa: E402
from tunelab.model.adapters import add_lora  # noqa: E402
from tunelab.model.load import load_model  # noqa: E402
from tunelab.train import parallel  # noqa: E402
from tunelab.train.loop import accumulate_gradients  # noqa: E402
from tunelab.train.loss import loss_module_for  # noqa: E402
from tunelab.train.optim import build_optimizer  # noqa: E402

SHAPES.setdefault("tiny", {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000})
SEQ = 2048


def model_folder(shape: str, root: Path, device: torch.device) -> Path:
    out = root / shape
    if not (out / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(str(out), max_shard_size="4GB")
    return out


def torchao_nf4(model: torch.nn.Module) -> int:
    """Every linear layer of the decoder (not the output head) gets an NF4Tensor weight, quantized where it lies
    (blocks of 64, scales quantized in blocks of 256, as bitsandbytes' double quantization). Returns how many."""
    from torchao.quantization import to_nf4

    head = model.get_output_embeddings()
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            mod.weight = torch.nn.Parameter(to_nf4(mod.weight.data), requires_grad=False)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", choices=["bnb", "torchao"], required=True)
    ap.add_argument("--strategy", choices=["none", "zero2", "zero3"], required=True)
    ap.add_argument("--compile", choices=["on", "off"], default="on")
    ap.add_argument("--shape", default="1_8b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prof", action="store_true")
    ap.add_argument("--models", default="/tmp/tl_models")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    par = parallel.setup("ddp" if args.strategy == "none" else args.strategy,
                         torch.device("cuda" if cuda else "cpu"))
    device = par.device
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    if par.is_main:
        model_folder(args.shape, root, device)
    parallel.barrier(par)
    settings = ModelSettings(path="bench", quantization="nf4",
                             lora=LoraSettings(r=64, alpha=16, dropout=0.0, target_modules=TARGETS),
                             gradient_checkpointing=True, compile="auto" if args.compile == "on" else False)
    attn = kernels.choose_attention("auto", device, SEQ)
    folder = str(model_folder(args.shape, root, device))
    t0 = time.perf_counter()
    if args.quant == "bnb":
        model = load_model(folder, dtype=torch.bfloat16, device=device, quantization="nf4", attn_implementation=attn,
                           quant_storage=torch.bfloat16 if par.shards else torch.uint8)
    else:
        model = load_model(folder, dtype=torch.bfloat16, device=device, attn_implementation=attn)
        torchao_nf4(model)
    if cuda:
        torch.cuda.empty_cache()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    model = add_lora(model, settings.lora)
    plan = kernels.prepare_for_training(model, settings, device, SEQ)
    model.train()
    loss_module = parallel.wrap(par, loss_module_for(model, plan, device), model,
                                torch.bfloat16, filled_on_rank0=False)
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, TrainSettings(lr=2e-4), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    gen = torch.Generator().manual_seed(1 + par.rank)
    seq = SEQ if args.shape != "tiny" else 256
    batches = [to_rows(*packed_batch(1, seq, SHAPES[args.shape]["vocab_size"], gen)[:3]) for _ in range(4)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(rows: list) -> float:
        loss, _ = accumulate_gradients(loss_module, [(rows, False)], par, autocast, scaler, 0)
        parallel.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = [], []
    for s in range(3 + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(round(step(batches[s % 4]), 5))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if args.prof and par.is_main:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
            for s in range(2):
                step(batches[s])
            if cuda:
                torch.cuda.synchronize()
        for key in ("self_cpu_time_total", "cuda_time_total" if cuda else "cpu_time_total"):
            print(p.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=70), flush=True)
    elif args.prof:
        for s in range(2):
            step(batches[s])
    timed = sorted(times[3:])
    step_s = timed[len(timed) // 2]
    res = {"case": "qlora_sharding", "impl": "tunelab", "quant": args.quant, "strategy": args.strategy,
           "gpus": par.world_size, "compile": args.compile, "shape": args.shape,
           "tokens_per_s_per_gpu": round(seq / step_s), "step_s": round(step_s, 4),
           "first_step_s": round(times[0], 1), "load_s": round(load_s, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "weights_gib": round(weights_gib, 2) if weights_gib is not None else None, "losses": losses,
           "plan": plan.describe(), "dynamo": dict(torch._dynamo.utils.counters["stats"]),
           "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
           "gpu": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__}
    if par.is_main:
        print(json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
    parallel.teardown(par)


if __name__ == "__main__":
    main()
