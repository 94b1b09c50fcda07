"""How each forward responds to a small LoRA update: the float32 reference, eager bf16, compiled layers (bf16).

Trains LoRA in float32 for 10 steps at lr 1e-5 as bench/loss_paths.py does (its model and batches; 10 updates,
as its 11th step's forward sees them), then:
- the loss change the trained adapters make on batch 2, with LoRA B scaled by 0.5, 1 and 2 (B = 0 is the
  starting point), through each forward: float32's is linear in the scale; a bf16 forward's shows what it keeps;
- in the first decoder layer, the change the adapters make to the layer's output: its projection on float32's
  change (1 = the same size), the rounding noise around it (relative to float32's change), and the share of
  outputs left unchanged.
One JSON line per forward, to stdout and --out (rewritten).

    python bench/lora_response.py --out bench/results/cpu_20261126_lora_response.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss_paths import autocast, lora_model, random_model  # noqa: E402

from tunelab.config.schema import TrainSettings  # noqa: E402
from tunelab.model.kernels import compile_layers, decoder_layers, skip_lora_input_cast  # noqa: E402
from tunelab.train.optim import build_optimizer  # noqa: E402

SCALES = (0.5, 1.0, 2.0)


def train_float32(folder: Path, batches: list[torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    model = lora_model(folder, torch.float32, batches[0].device)
    optimizer = build_optimizer(model, TrainSettings(lr=lr), batches[0].device)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for step in range(10):
        loss = model(input_ids=batches[step % 4], labels=batches[step % 4]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def set_adapters(model, trained: dict[str, torch.Tensor], scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(trained[name] * scale if "lora_B" in name else trained[name])


def loss_response(model, trained: dict, ids: torch.Tensor, bf16: bool) -> dict[str, float]:
    losses = {}
    for scale in (0.0, *SCALES):
        set_adapters(model, trained, scale)
        with autocast(ids.device, bf16):  # grad enabled, as a training step's forward runs
            losses[scale] = model(input_ids=ids, labels=ids).loss.item()
    return {str(scale): round(losses[scale] - losses[0.0], 6) for scale in SCALES}


def first_layer_change(model, trained: dict, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    base = model.get_base_model()
    layer = decoder_layers(base)[0]
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    with torch.no_grad():
        hidden = base.model.embed_tokens(ids).to(torch.bfloat16 if bf16 else torch.float32)
        rope = base.model.rotary_emb(hidden, positions)
    outputs = []
    for scale in (0.0, 1.0):
        set_adapters(model, trained, scale)
        with autocast(ids.device, bf16):
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach().float())
    return outputs[1] - outputs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.intermediate, args.device = 0, "cpu"
    torch.set_num_threads(2)  # the figures in BENCHMARKS.md come from a 2-core machine
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (2, args.seqlen), generator=gen) for _ in range(4)]
    if args.out:
        args.out.write_text("")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        random_model(folder, args)
        trained = train_float32(folder, batches, args.lr)
        reference = lora_model(folder, torch.float32, torch.device("cpu")).train()
        reference_change = first_layer_change(reference, trained, batches[2], bf16=False)
        forwards = [("float32", reference, False)]
        for name in ("bf16 eager", "bf16 compiled layers"):
            model = lora_model(folder, torch.bfloat16, torch.device("cpu")).train()
            skip_lora_input_cast(model)
            if "compiled" in name:
                torch._dynamo.reset()
                compile_layers(decoder_layers(model.get_base_model()))
            forwards.append((name, model, True))
        for name, model, bf16 in forwards:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            change = first_layer_change(model, trained, batches[2], bf16)
            compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
            assert compiled == ("compiled" in name), f"{name}: the layer ran {'compiled' if compiled else 'eagerly'}"
            projection = float((change * reference_change).sum() / (reference_change ** 2).sum())
            noise = float((change - projection * reference_change).norm() / reference_change.norm())
            line = json.dumps({"forward": name, "loss_change_by_scale_of_B": loss_response(model, trained,
                                                                                           batches[2], bf16),
                               "first_layer_change_projection": round(projection, 3),
                               "first_layer_change_noise": round(noise, 3),
                               "first_layer_outputs_unchanged": round(float((change == 0).float().mean()), 3),
                               "lr": args.lr, "torch": torch.__version__,
                               "shape": f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}"})
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
