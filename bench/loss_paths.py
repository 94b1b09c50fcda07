"""Why the bench's loss after 11 steps depends on the path (eager, compiled layers, checkpointed inside them).

Each path trains the same random-weight Llama with LoRA (r 64, alpha 16, every linear layer) for 11 AdamW steps at
the bench's learning rate (1e-5) on 4 cycled batches of random tokens. At every step the batch's loss is taken
three ways, with the adapters as they are at that step:
- through the path's own training forward (what the bench reports),
- through one bf16 eager model shared by every path, and
- through one float32 eager model shared by every path,
the last two being separate models that are given the path's LoRA weights before each step. If the paths train
the same adapters, the shared forwards agree across paths while the path's own need not. For bf16 paths it also
measures how large the trained update of the o_proj and down_proj outputs is in bf16 units of those outputs.
Every model starts from the same adapters; after each path's line, a second line says how far apart training moved
its LoRA A and B matrices and the baseline path's (eager bf16). The last path is a control: eager bf16 at 1.5x the
learning rate. JSON lines to stdout and --out (which is rewritten).

    python bench/loss_paths.py                      # the CPU run in BENCHMARKS.md (23 s on 2 cores)
    python bench/loss_paths.py --device cuda --hidden 2048 --intermediate 8192 --layers 24 --vocab 92544 \\
        --seqlen 1024 --rows 4                      # the tutorial model's shape, recipe `loss_paths`

--probe adds, per step, the path's own model run eagerly and a held-out batch, and at the end a freshly built model
of the path given the trained adapters (recipe `loss_paths_probe`, with the path `emulated`).
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
from tunelab.model.adapters import add_lora, enable_checkpointing  # noqa: E402
from tunelab.model.kernels import (  # noqa: E402
    checkpoint_inside,
    compile_layers,
    decoder_layers,
    skip_lora_input_cast,
)
from tunelab.model.load import load_model  # noqa: E402
from tunelab.train.optim import build_optimizer  # noqa: E402


def random_model(folder: Path, args: argparse.Namespace) -> None:
    """Saved in bf16, so that the float32 and bf16 models start from the very same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate or args.hidden * 11 // 4,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                      num_hidden_layers=args.layers, vocab_size=args.vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(folder))


def lora_model(folder: Path, dtype: torch.dtype, device: torch.device):
    model = load_model(str(folder), dtype=dtype, device=device, quantization="none", attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(1)
    model = add_lora(model, LoraSettings(r=64, alpha=16, dropout=0.0, target_modules=ALL_LINEAR))
    # peft rounds a new adapter through its base layer's dtype (bf16 here) before tunelab makes it float32 again:
    # the float32 models start from the same rounded values, so that every model starts from the same adapters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(torch.bfloat16).float())
    return model


def autocast(device: torch.device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def shared_loss(reference, trained, ids: torch.Tensor, bf16: bool) -> float:
    """The batch's loss through an eager reference model given the trained model's LoRA weights."""
    weights = {name: p for name, p in trained.named_parameters() if "lora_" in name}
    copied = set()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(weights[name])
                copied.add(name)
    assert copied == set(weights), "the reference model lacks some of the trained LoRA weights"
    with torch.no_grad(), autocast(ids.device, bf16):
        return reference(input_ids=ids, labels=ids).loss.item()


def update_in_bf16_units(model, ids: torch.Tensor) -> tuple[float, float]:
    """How large the trained LoRA update of the o_proj and down_proj outputs is next to one bf16 unit of the base
    layer's output there: each layer's median ratio, and the share of outputs where it is below half a unit (where
    adding it to a bf16 output in bf16 rounds it away); both averaged over the layers."""
    ratios, below = [], []

    def measure(module, inputs, _output):
        x = inputs[0]
        with autocast(ids.device, True):
            base = module.base_layer(x).float()
            update = (module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]).float()
        unit = (base.abs().clamp_min(1e-30).log2().floor() - 7).exp2()  # bf16 keeps 8 significant bits
        ratios.append(float((update.abs() / unit).median()))
        below.append(float((update.abs() < unit / 2).float().mean()))

    hooks = [m.register_forward_hook(measure) for name, m in model.named_modules()
             if name.endswith(("o_proj", "down_proj")) and hasattr(m, "lora_B")]
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), autocast(ids.device, True):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    if not ratios:
        return None, None
    return sum(ratios) / len(ratios), sum(below) / len(below)


def path_model(folder: Path, mode: str, bf16: bool, device: torch.device):
    """A path's model in training mode: LoRA, then the path's checkpointing and compilation."""
    model = lora_model(folder, torch.bfloat16 if bf16 else torch.float32, device)
    layers = decoder_layers(model.get_base_model())
    if mode == "inside":
        checkpoint_inside(layers)
    elif mode == "ckpt":  # transformers' checkpointing around the compiled layers (the bench's ckpt=on,compile=on)
        enable_checkpointing(model.get_base_model())
    skip_lora_input_cast(model)
    if mode != "eager":
        compile_layers(layers, mode="reduce-overhead" if mode == "graphs" else None)  # graphs: CUDA only
    return model.train()


def training_forward(model, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    with autocast(ids.device, bf16):
        return model(input_ids=ids, labels=ids).loss


def run_path(folder: Path, path: str, args: argparse.Namespace, batches: list[torch.Tensor],
             references: dict[str, torch.nn.Module]) -> tuple[dict, dict[str, torch.Tensor]]:
    """One path's run: its JSON record, and how far training moved each of its LoRA weights. Mode "emulated" is
    compiled layers with Inductor's emulate_precision_casts (its fused kernels round where eager rounds)."""
    import torch._inductor.config as inductor_config

    emulate = inductor_config.emulate_precision_casts  # TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 sets it for all
    inductor_config.emulate_precision_casts = emulate or path.split(":")[1] == "emulated"
    try:
        return train_path(folder, path, args, batches, references)
    finally:
        inductor_config.emulate_precision_casts = emulate
        torch._dynamo.reset()


def train_path(folder: Path, path: str, args: argparse.Namespace, batches: list[torch.Tensor],
               references: dict[str, torch.nn.Module]) -> tuple[dict, dict[str, torch.Tensor]]:
    precision, mode, *lr_scale = path.split(":")
    bf16 = precision == "bf16"
    lr = args.lr * float(lr_scale[0] if lr_scale else 1)
    device = torch.device(args.device)
    torch._dynamo.reset()
    model = path_model(folder, mode, bf16, device)
    initial = lora_weights(model)
    optimizer = build_optimizer(model, TrainSettings(lr=lr), device)
    params = [p for p in model.parameters() if p.requires_grad]
    record: dict = {"path": path, "lr": lr, "own_forward": [], "shared_bf16_eager_forward": [],
                    "shared_float32_forward": []}
    if args.probe:
        record |= {"own_forward_forced_eager": [], "heldout_own_forward": [], "heldout_shared_float32_forward": []}
    heldout = batches[4]
    for step in range(args.steps):
        ids = batches[step % 4]
        # the shared models see the adapters this step's forward trains with, before the update
        record["shared_bf16_eager_forward"].append(round(shared_loss(references["bf16"], model, ids, True), 6))
        record["shared_float32_forward"].append(round(shared_loss(references["float32"], model, ids, False), 6))
        if args.probe:  # the path's own model run eagerly (does it hold state the adapters do not?), and a batch
            # it never trains on, through its own training forward (no backward) and the float32 model
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                record["own_forward_forced_eager"].append(round(training_forward(model, ids, bf16).item(), 6))
            record["heldout_own_forward"].append(round(training_forward(model, heldout, bf16).item(), 6))
            record["heldout_shared_float32_forward"].append(
                round(shared_loss(references["float32"], model, heldout, False), 6))
        loss = training_forward(model, ids, bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["own_forward"].append(round(loss.item(), 6))
    units, below_half = update_in_bf16_units(model, batches[0]) if bf16 else (None, None)
    trained = lora_weights(model)
    moved = {name: p - initial[name] for name, p in trained.items()}
    if args.probe:  # the trained model's own forward on batch 0, and a freshly built one's given its adapters
        record["trained_batch0_own_forward"] = round(training_forward(model, batches[0], bf16).item(), 6)
        del model, optimizer
        torch._dynamo.reset()  # compiled anew too
        fresh = path_model(folder, mode, bf16, device)
        with torch.no_grad():
            for name, p in fresh.named_parameters():
                if "lora_" in name:
                    p.copy_(trained[name])
        record["fresh_model_batch0_own_forward"] = round(training_forward(fresh, batches[0], bf16).item(), 6)
        del fresh
    else:
        del model, optimizer
    import torch._inductor.config as inductor_config

    return {**record, "emulate_precision_casts": inductor_config.emulate_precision_casts,
            "lora_update_in_bf16_units": units and round(units, 3),
            "share_of_outputs_update_below_half_unit": below_half and round(below_half, 3)}, moved


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if "lora_" in name}


def distance(moved: dict, baseline: dict, which: str) -> float:
    """How far apart training moved a path's LoRA `which` matrices and the baseline path's, next to how far it
    moved the baseline's `which` matrices."""
    apart = sum(float((moved[n] - baseline[n]).norm() ** 2) for n in baseline if which in n) ** 0.5
    moved = sum(float(baseline[n].norm() ** 2) for n in baseline if which in n) ** 0.5
    return apart / moved if moved else None  # one step moves no A matrix: B starts at zero, so A gets no gradient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=0, help="default: 11/4 of --hidden")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--paths", nargs="+", default=["bf16:eager", "bf16:compiled", "bf16:inside", "bf16:ckpt",
                                                   "f32:eager", "bf16:eager:1.5"],
                    help="precision:path[:lr scale]. Paths: eager, compiled (compiled layers), inside (checkpointed "
                         "inside them), ckpt (transformers' checkpointing around them), emulated (compiled layers "
                         "rounding where eager rounds), graphs (compiled layers with CUDA graphs, GPU only). The "
                         "baseline comes first, so that every later path's distance line is written as it finishes; "
                         "the last default is the control, at 1.5x the lr")
    ap.add_argument("--baseline", default="bf16:eager", help="the path whose adapters the later ones are measured "
                    "against (in parameters, as a share of how far training moved the baseline's)")
    ap.add_argument("--probe", action="store_true", help="also, at each step, the path's own model run eagerly "
                    "and a held-out batch's loss (own forward, float32 model); at the end, a freshly built model of "
                    "the path given the trained adapters")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for path in args.paths:
        precision, mode, *scale = path.split(":") + [""]
        modes = ("eager", "compiled", "inside", "ckpt", "emulated", "graphs")
        if precision not in ("bf16", "f32") or mode not in modes or len(scale) > 2 \
                or not _is_number(scale[0] or "1") or (mode == "graphs" and args.device == "cpu"):
            ap.error(f"bad path {path}: precision bf16 or f32, then eager, compiled, inside, ckpt, emulated or graphs "
                     "(graphs on a GPU only), then optionally a learning-rate scale")
    if args.paths[0] != args.baseline:
        ap.error(f"--baseline {args.baseline} must be the first of --paths (the later paths are measured against it)")
    if args.device == "cpu":
        torch.set_num_threads(2)  # the figures in BENCHMARKS.md come from a 2-core machine
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32 on a GPU
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    # four cycled training batches, then a held-out one (--probe); the first four are those of earlier runs
    batches = [torch.randint(0, args.vocab, (args.rows, args.seqlen), generator=gen).to(device) for _ in range(5)]
    if args.out:
        args.out.write_text("")
    with tempfile.TemporaryDirectory() as tmp:
        random_model(Path(tmp), args)
        references = {"bf16": lora_model(Path(tmp), torch.bfloat16, device).eval(),
                      "float32": lora_model(Path(tmp), torch.float32, device).eval()}
        moved, failed = {}, []
        for path in args.paths:
            try:
                result, moved[path] = run_path(Path(tmp), path, args, batches, references)
            except Exception as err:  # one path's failure (CUDA graphs, say) keeps the later paths' lines
                write(args.out, {"path": path, "error": f"{type(err).__name__}: {err}"[:500]})
                failed.append(path)
                continue
            write(args.out, {**result, "device": args.device, "torch": torch.__version__,
                             "shape": f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
                                      f"{args.rows}x{args.seqlen} tokens per step"})
            baseline = moved.get(args.baseline)
            if baseline is not None:  # how far apart training moved this path's adapters and the baseline's
                write(args.out, {"path": path, "baseline": args.baseline,
                                 **{f"{which}_moved_apart_from_baseline": rounded(distance(moved[path], baseline,
                                                                                           which))
                                    for which in ("lora_A", "lora_B")}})
    if failed:  # the lines of the paths that ran are written; the run as a whole did not succeed
        sys.exit(f"failed: {', '.join(failed)}" + (f" (the baseline {args.baseline}: no distance lines)"
                                                   if args.baseline in failed else ""))


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write(out: Path | None, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
