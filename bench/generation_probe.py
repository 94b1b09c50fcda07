"""Per-token cost of decoding through LoRA layers, on any device (a CPU shows the host-side cost that dominates
GPU decoding of small batches): a deep, narrow random Llama (24 layers, LoRA r8 on every linear layer) answers 2
prompts with 128 greedy tokens, as the base model, with peft's LoRA layers, and with them merged for generation
(tunelab.model.adapters.merged_for_generation, what a training run's evaluation uses). One JSON line per variant.

usage: python3 bench/generation_probe.py [--device cpu|cuda] [--hidden 64] [--out RESULTS.jsonl]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.model.adapters import merged_for_generation

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    heads = max(4, a.hidden // 64)  # head size 64 from hidden 256 on (--hidden 2048: the 1.8B model's width)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_attention_heads=heads,
                      num_key_value_heads=max(2, heads // 4), num_hidden_layers=24, vocab_size=512, pad_token_id=0,
                      eos_token_id=None)
    base = LlamaForCausalLM(cfg).to(dev, dtype).eval()
    ids = torch.randint(1, 512, (2, 40), device=dev)
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 128, "min_new_tokens": 128, "do_sample": False,
          "pad_token_id": 0, "use_cache": True}

    def timed(model, label: str) -> list[int]:
        with torch.inference_mode():
            model.generate(input_ids=ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
            times = []
            for _ in range(3):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = model.generate(input_ids=ids, **kw)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        line = {"case": "generation_probe", "variant": label, "ms_per_token": round(sorted(times)[1] * 1000 / 128, 2),
                "layers": 24, "hidden": a.hidden, "device": str(dev)}
        print(json.dumps(line), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(line) + "\n")
        return out[:, ids.shape[1]:].tolist()

    timed(base, "base model")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)).eval()
    plain = timed(lora, "peft LoRA layers")
    with merged_for_generation(lora) as n:
        merged = timed(lora, f"LoRA merged for generation ({n} layers)")
    print(json.dumps({"same_tokens": plain == merged}))


if __name__ == "__main__":
    main()
