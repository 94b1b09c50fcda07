"""Longest context tunelab trains at: Llama-3-8B shape, QLoRA r64 (NF4, double quantisation), batch 1, one
document per row (the first half out of the loss, as in peer_long_context.py), tunelab's defaults: for rows this
long "auto" picks SDPA (FlashAttention), activation checkpointing with the layer inputs offloaded to CPU memory
where the GPU has no room, the MLP in tiles, and Liger's fused loss. One training step per length, longest last;
stops at the first out-of-memory.

usage: python bench/long_context.py [--models DIR] [--out FILE] LENGTH [LENGTH...]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import TARGETS, emit, model_folder  # noqa: E402

from tunelab.config.schema import LoraSettings, ModelSettings, TrainSettings  # noqa: E402
from tunelab.model import kernels  # noqa: E402
from tunelab.model.adapters import add_lora  # noqa: E402
from tunelab.model.load import load_model  # noqa: E402
from tunelab.model.offload import OffloadPolicy  # noqa: E402
from tunelab.train.loop import accumulate_gradients  # noqa: E402
from tunelab.train.loss import loss_module_for  # noqa: E402
from tunelab.train.optim import build_optimizer  # noqa: E402
from tunelab.train.parallel import Parallel  # noqa: E402

CUDA = torch.device("cuda")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/tl_models")
    ap.add_argument("--out", type=Path)
    ap.add_argument("lengths", nargs="+", type=int)
    args = ap.parse_args()
    t0 = time.time()
    folder = model_folder("8b", Path(args.models))
    settings = ModelSettings(path="bench", quantization="nf4",
                             lora=LoraSettings(r=64, alpha=16, dropout=0.0, target_modules=TARGETS))
    attn = kernels.choose_attention("auto", CUDA, max(args.lengths))
    model = load_model(str(folder), dtype=torch.bfloat16, device=CUDA, quantization="nf4", attn_implementation=attn)
    model = add_lora(model, settings.lora)
    plan = kernels.prepare_for_training(model, settings, CUDA, max(args.lengths))
    model.train()
    emit({"impl": "tunelab", "case": "qlora8b_setup", "plan": plan.describe(), "built_s": round(time.time() - t0, 1),
          "model_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}, args.out)
    loss_module = loss_module_for(model, plan, CUDA)
    optimizer = build_optimizer(model, TrainSettings(lr=1e-5), CUDA)
    ckpt_fn = getattr(kernels.decoder_layers(model.get_base_model())[0], "_gradient_checkpointing_func", None)
    policy = next((a for a in getattr(ckpt_fn, "args", ()) if isinstance(a, OffloadPolicy)), None)
    for n in args.lengths:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = np.random.default_rng(n).integers(100, 128000, n)
        labels = np.full(n, -100)
        labels[n // 2:n - 1] = ids[n // 2 + 1:]
        rows = [(ids, labels, np.array([n]))]
        res = {"impl": "tunelab", "case": f"qlora8b_ctx{n}", "seqlen": n, "plan": plan.describe()}
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss, _ = accumulate_gradients(loss_module, [(rows, False)], Parallel(device=CUDA),
                                           torch.autocast("cuda", dtype=torch.bfloat16),
                                           torch.amp.GradScaler("cuda", enabled=False), 0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            step = time.perf_counter() - t
            res.update(ok=True, step_s=round(step, 1), tokens_per_s=round(n / step), loss=round(float(loss), 3),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       host_peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1))
            if policy is not None:
                res.update(layers_offloaded=policy.offloaded, layers_kept=policy.kept)
                policy.offloaded = policy.kept = 0
        except torch.OutOfMemoryError:
            res.update(ok=False, error="OOM")
            emit(res, args.out)
            break
        emit(res, args.out)


if __name__ == "__main__":
    main()
