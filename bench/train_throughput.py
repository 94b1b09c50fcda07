"""Training throughput and peak GPU memory of tunelab's own training step on the peer's workloads.

Same cases as bench/peer_baseline.py (copied unchanged from ../shared/bench): real model shapes with random
weights, packed rows of 64..1024-token documents with position ids restarting per document and the first 40%
of each document out of the loss. tunelab's path is the one `tunelab train` runs: a saved model folder ->
load_model -> LoRA or full -> kernels.prepare_for_training (the "auto" speed settings) -> LossModule ->
accumulate_gradients -> clip -> AdamW. Prints one JSON line per case (and appends it to --out).

A case runs with tunelab's defaults unless a variant follows its name, e.g.
    lora_flex_liger                      defaults: every speed setting "auto", micro-batches of 1 row
    lora_flex_liger:ckpt=full,compile=off,liger=on,attn=flex_attention,mb=4,cast=on   the 2026-11-22 path
keys: ckpt=auto|on|off|offload|inside (inside: kernels.checkpoint_inside with any compile setting; give budget=1)
      compile=auto|on|off|cudagraphs  liger=auto|on|off  attn=auto|sdpa|flex_attention
      budget=F (compiled layers: activation memory budget, 0..1)  rows=N (rows per step instead of the case's)
      mb=N (rows per micro-batch; the step is always the case's rows)  cast=on (keep peft's input cast)
      dropout=F (LoRA dropout; the peer's cases use 0, the XTuner configs 0.1)
      prof=1 (print the profiler's top kernels for two steps)  prof=trace (one step's Chrome trace, gzipped, into
      $OUT or /tmp, for bench/trace_gaps.py)
      data=cli (train on the rows `tunelab train` makes of bench/scaling.py's documents, packed by tunelab's data
      pipeline, instead of the peer's: the CLI-against-bench comparison on the same rows)

usage: python bench/train_throughput.py [--models DIR] [--out FILE] CASE[:VARIANT] [...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_baseline import SHAPES, packed_batch  # noqa: E402  (the peer's workload generator, unchanged)

from tunelab.config.schema import LoraSettings, ModelSettings, TrainSettings  # noqa: E402
from tunelab.model import kernels  # noqa: E402
from tunelab.model.adapters import add_lora, make_full_trainable  # noqa: E402
from tunelab.model.load import load_model  # noqa: E402
from tunelab.train.loop import accumulate_gradients  # noqa: E402
from tunelab.train.loss import loss_module_for  # noqa: E402
from tunelab.train.optim import build_optimizer, keep_gradients, zero_gradients  # noqa: E402
from tunelab.train.parallel import Parallel  # noqa: E402

# name: (shape, method, rows per step, row length) -- the peer's cases
CASES = {
    "lora_sdpa": ("1_8b", "lora", 4, 4096),
    "lora_sdpa_liger": ("1_8b", "lora", 4, 4096),
    "lora_flex_liger": ("1_8b", "lora", 4, 4096),
    "full_sdpa_liger": ("1_8b", "full", 4, 4096),
    "qlora7b_sdpa": ("7b", "qlora", 1, 2048),
    "qlora7b_sdpa_liger": ("7b", "qlora", 1, 2048),
    "tutorial_qlora": ("1_8b", "qlora", 1, 1024),
    "tutorial_lora": ("1_8b", "lora", 1, 1024),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ON_OFF = {"on": True, "off": False, "auto": "auto", "offload": "offload", "full": True, "cudagraphs": "cudagraphs",
          "inside": False}  # inside: checkpointed inside the compiled layers by build() itself


def model_folder(shape: str, root: Path, max_positions: int = 8192) -> Path:
    """A saved random-weight bf16 model of the case's shape, made once per shape in `root`."""
    out = root / shape
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), max_shard_size="4GB")
    del model
    torch.cuda.empty_cache()
    return out


def to_rows(ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor) -> list:
    """The peer's packed batch as tunelab rows: per-document lengths and labels shifted within documents."""
    rows = []
    for b in range(ids.shape[0]):
        p = pos[b].numpy()
        starts = np.flatnonzero(p == 0).tolist() + [len(p)]
        lab = labels[b].numpy()
        shifted = np.full(len(p), -100, dtype=np.int64)
        for s, e in zip(starts, starts[1:]):
            shifted[s:e - 1] = lab[s + 1:e]
        rows.append((ids[b].numpy(), shifted, np.diff(starts)))
    return rows


def parse_variant(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(",") if kv) if text else {}


def settings_for(method: str, var: dict[str, str], max_length: int) -> tuple[ModelSettings, str]:
    s = ModelSettings(path="bench", quantization="nf4" if method == "qlora" else "none",
                      lora=None if method == "full" else LoraSettings(r=64, alpha=16,
                                                                      dropout=float(var.get("dropout", 0.0)),
                                                                      target_modules=TARGETS),
                      gradient_checkpointing=ON_OFF[var.get("ckpt", "auto")],
                      use_liger=ON_OFF[var.get("liger", "auto")], compile=ON_OFF[var.get("compile", "auto")],
                      attn_implementation=var.get("attn", "auto"))
    return s, kernels.choose_attention(s.attn_implementation, torch.device("cuda"), max_length)


def build(shape: str, method: str, var: dict[str, str], root: Path, seqlen: int, mb: int):
    device = torch.device("cuda")
    settings, attn = settings_for(method, var, seqlen)
    model = load_model(str(model_folder(shape, root)), dtype=torch.bfloat16, device=device,
                       quantization=settings.quantization, attn_implementation=attn)
    model = make_full_trainable(model) if method == "full" else add_lora(model, settings.lora)
    budget = float(var["budget"]) if "budget" in var else None
    inside = var.get("ckpt") == "inside"
    if inside:
        kernels.checkpoint_inside(kernels.decoder_layers(model.get_base_model() if method != "full" else model))
    plan = kernels.prepare_for_training(model, settings, device, tokens_per_micro_batch=mb * seqlen,
                                        memory_budget=budget)
    if inside:
        plan.checkpointing = "compiled"  # done above, so that the plan the results record says so
    if var.get("cast") == "on":
        for mod in model.modules():
            if hasattr(mod, "cast_input_dtype_enabled"):
                mod.cast_input_dtype_enabled = True
    model.train()
    return model, plan


def run_case(spec: str, root: Path) -> dict:
    name, _, vtext = spec.partition(":")
    shape, method, bsz, seqlen = CASES[name]
    var = parse_variant(vtext)
    bsz = int(var.get("rows", bsz))
    mb = int(var.get("mb", 1))
    device = torch.device("cuda")
    torch._dynamo.reset()
    torch._functorch.config.activation_memory_budget = 1.0  # a variant before may have lowered it
    torch.cuda.empty_cache()
    t_load = time.perf_counter()
    model, plan = build(shape, method, var, root, seqlen, mb)
    load_s = time.perf_counter() - t_load
    torch.cuda.empty_cache()
    model_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    loss_module = loss_module_for(model, plan, device)
    optimizer = build_optimizer(model, TrainSettings(lr=1e-5), device)
    params = [p for p in model.parameters() if p.requires_grad]
    keep = plan.cudagraphs and bsz > mb  # as `tunelab train` does (train/setup.py): several micro-batches
    if keep:
        keep_gradients(params)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    gen = torch.Generator().manual_seed(0)
    if var.get("data") == "cli":
        batches = cli_rows(root, shape, seqlen, bsz)
    else:
        batches = [to_rows(*packed_batch(bsz, seqlen, SHAPES[shape]["vocab_size"], gen)[:3]) for _ in range(4)]
    counter = kernels.flop_counter(model)

    def step(rows: list) -> float:
        micro = [(rows[i:i + mb], False) for i in range(0, len(rows), mb)]
        loss, _ = accumulate_gradients(loss_module, micro, Parallel(device=device),
                                       torch.autocast("cuda", dtype=torch.bfloat16), scaler, 0,
                                       seqlen if plan.cudagraphs else None)  # as `tunelab train` pads them
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        zero_gradients(optimizer, keep)
        return float(loss)

    times, flops, loss, losses = [], [], float("nan"), []
    for s in range(3 + 8):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(batches[s % 4])
        losses.append(round(loss, 5))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        flops.append(kernels.step_flops(counter, batches[s % 4]))
    if var.get("prof") == "trace":
        trace(step, batches[0], f"{name}_{vtext.replace('=', '').replace(',', '_')}")
    elif var.get("prof"):
        profile(step, batches)
    timed = sorted(range(3, 11), key=lambda i: times[i])
    mid = timed[len(timed) // 2]
    step_s = times[mid]
    peak = kernels.peak_flops(device)
    res = {"impl": "tunelab", "case": name, "variant": vtext or "defaults", "tokens_per_s": round(bsz * seqlen / step_s),
           "step_s": round(step_s, 4), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "model_gib": round(model_gib, 2), "mfu": round(flops[mid] / step_s / peak, 4) if peak else None,
           "loss": round(loss, 3), "losses": losses, "micro_batch_rows": mb, "plan": plan.describe(),
           "load_s": round(load_s, 1), "first_step_s": round(times[0], 1),
           "dynamo": {k: v for k, v in torch._dynamo.utils.counters["stats"].items()}}
    return res  # the model and optimizer go with this frame; main() empties the cache


def cli_rows(root: Path, shape: str, seqlen: int, bsz: int) -> list:
    """4 steps of rows as `tunelab train` packs bench/scaling.py's documents (its model folder's word tokenizer)."""
    from scaling import make_data
    from sharded_check import make_model

    from tunelab.config.schema import DataSettings
    from tunelab.data.dataset import prepare_data
    from tunelab.model.load import load_tokenizer

    folder = make_model(shape, root)  # scaling.py's folder, with the tokenizer the CLI uses
    data = DataSettings(path=str(make_data(root)), format="pretrain", max_length=seqlen, pack_to_max_length=True,
                        cache=False)
    rows = prepare_data(data, load_tokenizer(str(folder)), seed=0).rows
    return [[rows.row(i * bsz + j) for j in range(bsz)] for i in range(4)]


def profile(step, batches: list) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for s in range(2):
            step(batches[s])
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)


def trace(step, rows: list, label: str) -> None:
    import gzip
    import os
    import shutil

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    path = Path(os.environ.get("OUT", "/tmp")) / f"trace_{label}.json"
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        step(rows)
        torch.cuda.synchronize()
    p.export_chrome_trace(str(path))
    with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()


def emit(res: dict, out: Path | None) -> None:
    res.update(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"))
    line = json.dumps(res)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/tl_models", help="folder for the random-weight model folders")
    ap.add_argument("--out", type=Path, help="append the JSON lines here too")
    ap.add_argument("cases", nargs="+")
    args = ap.parse_args()
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    for spec in args.cases:
        t0 = time.time()
        try:
            r = run_case(spec, root)
        except Exception as e:  # noqa: BLE001  (one failing case must not hide the others)
            traceback.print_exc()
            name, _, v = spec.partition(":")
            r = {"impl": "tunelab", "case": name, "variant": v or "defaults", "error": repr(e)[:300]}
        r["wall_s"] = round(time.time() - t0, 1)
        emit(r, args.out)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
