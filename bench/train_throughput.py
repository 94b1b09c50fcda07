"""Training throughput and peak GPU memory of tunelab's own training step on the peer's workloads.

Same cases as bench/peer_baseline.py (copied unchanged from ../shared/bench): real model shapes with random
weights, packed rows of 64..1024-token documents with position ids restarting per document and the first 40%
of each document out of the loss. tunelab's path is the one `tunelab train` runs: a saved model folder ->
load_model (quantization, attention backend) -> Liger kernels -> activation checkpointing -> LoRA or full ->
LossModule -> accumulate_gradients -> clip -> AdamW. Prints one JSON line per case.

usage: python bench/train_throughput.py CASE [CASE...]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_baseline import SHAPES, packed_batch  # noqa: E402  (the peer's workload generator, unchanged)

from tunelab.config.schema import LoraSettings, TrainSettings  # noqa: E402
from tunelab.model.adapters import add_lora, enable_checkpointing, make_full_trainable  # noqa: E402
from tunelab.model.load import apply_liger, load_model  # noqa: E402
from tunelab.train.loop import accumulate_gradients  # noqa: E402
from tunelab.train.loss import LossModule, choose_loss  # noqa: E402
from tunelab.train.parallel import Parallel  # noqa: E402
from tunelab.train.optim import build_optimizer  # noqa: E402

# name: (shape, method, batch, seqlen, liger, attention, activation checkpointing)
CASES = {
    "lora_sdpa": ("1_8b", "lora", 4, 4096, False, "sdpa", True),
    "lora_sdpa_liger": ("1_8b", "lora", 4, 4096, True, "sdpa", True),
    "lora_flex_liger": ("1_8b", "lora", 4, 4096, True, "flex_attention", True),
    "full_sdpa_liger": ("1_8b", "full", 4, 4096, True, "sdpa", True),
    "qlora7b_sdpa": ("7b", "qlora", 1, 2048, False, "sdpa", True),
    "qlora7b_sdpa_liger": ("7b", "qlora", 1, 2048, True, "sdpa", True),
    "tutorial_qlora": ("1_8b", "qlora", 1, 1024, False, "sdpa", True),
    "tutorial_lora": ("1_8b", "lora", 1, 1024, False, "sdpa", True),
    # tunelab-only variants: what a user can switch on when memory allows
    "lora_flex_liger_nockpt": ("1_8b", "lora", 4, 4096, True, "flex_attention", False),
    "tutorial_qlora_nockpt": ("1_8b", "qlora", 1, 1024, False, "sdpa", False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FOLDERS: dict[str, Path] = {}


def model_folder(shape: str, root: Path) -> Path:
    """A saved random-weight model of the case's shape (made once per shape and run)."""
    if shape not in _FOLDERS:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        out = root / shape
        model.save_pretrained(str(out), max_shard_size="4GB")
        del model
        torch.cuda.empty_cache()
        _FOLDERS[shape] = out
    return _FOLDERS[shape]


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


def run_case(name: str, root: Path) -> dict:
    shape, method, bsz, seqlen, liger, attn, ckpt = CASES[name]
    device = torch.device("cuda")
    folder = model_folder(shape, root)
    torch.cuda.empty_cache()
    model = load_model(str(folder), dtype=torch.bfloat16, device=device,
                       quantization="nf4" if method == "qlora" else "none", attn_implementation=attn)
    if liger:
        apply_liger(model)
    if ckpt:
        enable_checkpointing(model)
    if method == "full":
        model = make_full_trainable(model)
    else:
        model = add_lora(model, LoraSettings(r=64, alpha=16, dropout=0.0, target_modules=TARGETS))
    model.train()
    torch.cuda.empty_cache()
    model_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    loss_module = LossModule(model, choose_loss(liger, device))
    optimizer = build_optimizer(model, TrainSettings(lr=1e-5), device)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    gen = torch.Generator().manual_seed(0)
    batches = [to_rows(*packed_batch(bsz, seqlen, SHAPES[shape]["vocab_size"], gen)[:3]) for _ in range(4)]
    times, loss = [], float("nan")
    for s in range(3 + 8):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = accumulate_gradients(loss_module, [(batches[s % 4], False)], Parallel(device=device),
                                       torch.autocast("cuda", dtype=torch.bfloat16), scaler, 0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if s >= 3:
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    res = {"impl": "tunelab", "case": name, "tokens_per_s": round(bsz * seqlen / step), "step_s": round(step, 4),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "model_gib": round(model_gib, 2),
           "loss": round(float(loss), 3),
           "ckpt": ckpt, "attn": attn, "liger": liger}
    del model, optimizer, loss_module
    torch.cuda.empty_cache()
    return res


def check_packed_attention() -> dict:
    """Packed rows must give the same loss under every attention backend, and equal the sum of the
    documents' losses computed one by one (no document attends to another)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.data.pack import collate
    from tunelab.train.loss import causal_lm_loss

    cfg = LlamaConfig(**{**SHAPES["1_8b"], "num_hidden_layers": 2}, max_position_embeddings=8192,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    rows = to_rows(*packed_batch(1, 4096, cfg.vocab_size, gen)[:3])
    out = {"check": "packed_attention"}
    with torch.no_grad():
        for attn in ("sdpa", "flex_attention", "eager"):
            model.config._attn_implementation = attn
            batch = {k: v.cuda() for k, v in collate(rows, 0).items()}
            out[attn] = float(causal_lm_loss(model, batch)[0])
        model.config._attn_implementation = "sdpa"
        ids, labels, lens = rows[0]
        start, alone = 0, 0.0
        for n in lens.tolist():
            one = (ids[start:start + n], labels[start:start + n], np.array([n]))
            alone += float(causal_lm_loss(model, {k: v.cuda() for k, v in collate([one], 0).items()})[0])
            start += n
        out["documents_alone"] = alone
    ref = out["documents_alone"]
    out["max_rel_diff"] = max(abs(out[a] - ref) / abs(ref) for a in ("sdpa", "flex_attention", "eager"))
    return out


if __name__ == "__main__":
    import peft
    import transformers

    print(json.dumps({"impl": "tunelab", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "peft": peft.__version__}), flush=True)
    if "--check" in sys.argv:
        print(json.dumps(check_packed_attention()), flush=True)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for name in [a for a in sys.argv[1:] if not a.startswith("--")]:
            t0 = time.time()
            try:
                r = run_case(name, Path(tmp))
            except Exception as e:
                traceback.print_exc()
                r = {"impl": "tunelab", "case": name, "error": repr(e)[:300]}
            r["wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(r), flush=True)
