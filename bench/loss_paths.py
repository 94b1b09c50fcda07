"""Why the bench's loss after 11 steps depends on the path (eager, compiled layers, checkpointed inside them).

Each path trains the same random-weight Llama with LoRA (r 64, alpha 16, every linear layer) for 10 AdamW steps at
the bench's learning rate (1e-5) on 4 cycled batches of random tokens, then computes the next batch's loss three
ways: through the path's own forward (what the bench reports as its 11th step's loss), through one bf16 eager
forward shared by every path, and through one float32 forward. If the paths trained the same adapters, the last
two agree across paths while the first need not. For bf16 paths it also measures how large the trained update of
the o_proj and down_proj outputs is in bf16 units of those outputs. One JSON line per path, to stdout and --out.

    python bench/loss_paths.py                      # the CPU run in BENCHMARKS.md (about a minute on 2 cores)
    python bench/loss_paths.py --device cuda --hidden 2048 --layers 24 --vocab 92544 --seqlen 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunelab.config.schema import ALL_LINEAR, LoraSettings, TrainSettings  # noqa: E402
from tunelab.model.adapters import add_lora  # noqa: E402
from tunelab.model.kernels import (  # noqa: E402
    checkpoint_inside,
    compile_layers,
    decoder_layers,
    skip_lora_input_cast,
)
from tunelab.model.load import load_model  # noqa: E402
from tunelab.train.optim import build_optimizer  # noqa: E402


def random_model(folder: Path, hidden: int, layers: int, vocab: int, device: torch.device) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 256), num_hidden_layers=layers, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:
        LlamaForCausalLM(cfg).save_pretrained(str(folder))


def update_in_bf16_units(model, ids: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """How large the trained LoRA update of the o_proj and down_proj outputs is next to one bf16 unit of the base
    layer's output there: the median ratio, and the share of outputs where it is below half a unit (where adding
    it to a bf16 output rounds it away). Medians and shares are averaged over the layers."""
    ratios, below = [], []

    def measure(module, inputs, _output):
        x = inputs[0]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            base = module.base_layer(x).float()
            update = (module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]).float()
        unit = (base.abs().clamp_min(1e-30).log2().floor() - 7).exp2()  # bf16 keeps 8 significant bits
        ratios.append(float((update.abs() / unit).median()))
        below.append(float((update.abs() < unit / 2).float().mean()))

    hooks = [m.register_forward_hook(measure) for name, m in model.named_modules()
             if name.endswith(("o_proj", "down_proj")) and hasattr(m, "lora_B")]
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), torch.autocast(device.type, dtype=torch.bfloat16):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return sum(ratios) / len(ratios), sum(below) / len(below)


def run_path(folder: Path, path: str, args: argparse.Namespace, batches: list[torch.Tensor]) -> dict:
    precision, mode = path.split(":")
    bf16 = precision == "bf16"
    device = torch.device(args.device)
    torch._dynamo.reset()
    model = load_model(str(folder), dtype=torch.bfloat16 if bf16 else torch.float32, device=device,
                       quantization="none", attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(1)
    model = add_lora(model, LoraSettings(r=64, alpha=16, dropout=0.0, target_modules=ALL_LINEAR))
    layers = decoder_layers(model.get_base_model())
    if mode == "inside":
        checkpoint_inside(layers)
    skip_lora_input_cast(model)
    if mode != "eager":
        compile_layers(layers)
    optimizer = build_optimizer(model, TrainSettings(lr=args.lr), device)
    params = [p for p in model.parameters() if p.requires_grad]

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    model.train()
    losses = []
    for step in range(10):
        ids = batches[step % 4]
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 6))
    ids = batches[10 % 4]
    with torch.no_grad(), autocast():
        own = float(model(input_ids=ids, labels=ids).loss)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        with autocast():
            shared_bf16 = float(model(input_ids=ids, labels=ids).loss)
    units, below_half = update_in_bf16_units(model, ids, device) if bf16 else (None, None)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        model.float()
        float32 = float(model(input_ids=ids, labels=ids).loss)
    del model, optimizer
    torch._dynamo.reset()
    return {"path": path, "losses": losses, "step11_own_forward": round(own, 6),
            "step11_bf16_eager_forward": round(shared_bf16, 6), "step11_float32_forward": round(float32, 6),
            "lora_update_in_bf16_units": units and round(units, 3),
            "share_of_outputs_update_below_half_unit": below_half and round(below_half, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--paths", nargs="+", default=["f32:eager", "bf16:eager", "bf16:compiled", "bf16:inside"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.rows, args.seqlen), generator=gen).to(args.device)
               for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        random_model(Path(tmp), args.hidden, args.layers, args.vocab, torch.device(args.device))
        for path in args.paths:
            line = json.dumps({**run_path(Path(tmp), path, args, batches), "device": args.device,
                               "shape": f"{args.layers}x{args.hidden}, vocab {args.vocab}", "lr": args.lr,
                               "torch": torch.__version__})
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
