"""GPU-only correctness checks of tunelab's speed paths, and the generation-during-training timing.

--check: on 2-layer models of the 1.8B shape (random weights), every speed path computes what the plain path does:
  packed_attention  a packed 4096-token row's summed loss under SDPA, flex and eager equals the sum of its
                    documents' losses computed one at a time;
  default_path      loss and LoRA gradients of tunelab's GPU defaults (flex attention with tunelab's block mask,
                    compiled layers under CUDA graphs, Liger's fused loss) against eager SDPA with PyTorch's
                    cross-entropy, and the packed loss against the documents alone;
  qlora_compiled    the same for NF4 QLoRA (checkpointed inside its compiled layers), compiled against eager;
  offload           checkpointing with CPU-offloaded layer inputs and the tiled MLP against plain checkpointing
                    on one 32k-token document;
  cudagraphs_accumulation  NF4 QLoRA with CUDA graphs (checkpointed inside its compiled layers), 4 micro-batches
                    accumulated into one step's gradients
                    (kept allocated: optim.keep_gradients), against the same 4 in eager mode;
  qlora_dropout     the QLoRA default with LoRA dropout 0.1 (float32): its gradient against a finite difference
                    of the loss, each loss drawing the same masks;
  dropout_graphs    dropout in a LoRA-shaped layer under CUDA graphs, checkpointed inside the compiled region
                    (QLoRA's default) or not at all: the backward uses the forward's mask, and each replay draws
                    a new one.
--generate TOKENIZER_DIR: a 1.8B LoRA model being trained with the GPU defaults answers 2 evaluation questions of
  128 new tokens through kernels.generation_mode (SDPA, eager layers, LoRA merged), twice: the first evaluation
  of a run, then a later one.

usage: python bench/gpu_checks.py [--models DIR] [--out FILE] [--check [--only NAME...]] [--generate TOKENIZER_DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_baseline import SHAPES, packed_batch  # noqa: E402
from train_throughput import TARGETS, emit, model_folder, to_rows  # noqa: E402

from tunelab.config.schema import LoraSettings, ModelSettings  # noqa: E402
from tunelab.data.pack import collate  # noqa: E402
from tunelab.model import kernels  # noqa: E402
from tunelab.model.adapters import add_lora  # noqa: E402
from tunelab.model.load import load_model  # noqa: E402
from tunelab.train.loss import causal_lm_loss, liger_causal_lm_loss, loss_module_for  # noqa: E402

CUDA = torch.device("cuda")


def small_folder(root: Path) -> Path:
    out = root / "1_8b_2layers"
    if not (out / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**{**SHAPES["1_8b"], "num_hidden_layers": 2}, max_position_embeddings=65536,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(out))
    return out


def lora_model(root: Path, settings: ModelSettings, attn: str, tokens: int, dtype: torch.dtype = torch.bfloat16,
               dropout: float = 0.0):
    model = load_model(str(small_folder(root)), dtype=dtype, device=CUDA,
                       quantization=settings.quantization, attn_implementation=attn)
    torch.manual_seed(1)
    model = add_lora(model, LoraSettings(r=64, alpha=16, dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero: give it values so every gradient is non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    plan = kernels.prepare_for_training(model, settings, CUDA, tokens)
    model.train()
    return model, plan


def loss_and_grads(model, loss_fn, rows: list) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(CUDA) for k, v in collate(rows, 0).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = loss_fn(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    return num / max(sum(float(b[k].norm() ** 2) for k in b) ** 0.5, 1e-30)


def alone_loss(model, rows: list) -> float:
    ids, labels, lens = rows[0]
    total, start = 0.0, 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for n in lens.tolist():
            one = (ids[start:start + n], labels[start:start + n], np.array([n]))
            total += float(causal_lm_loss(model, {k: v.to(CUDA) for k, v in collate([one], 0).items()})[0])
            start += n
    return total


def check(root: Path):
    """Yields one result per check."""
    gen = torch.Generator().manual_seed(1)
    rows = to_rows(*packed_batch(1, 4096, SHAPES["1_8b"]["vocab_size"], gen)[:3])
    # packed attention under each backend (no adapters, no compile)
    model = load_model(str(small_folder(root)), dtype=torch.bfloat16, device=CUDA, attn_implementation="sdpa")
    res = {"check": "packed_attention"}
    with torch.no_grad():
        for attn in ("sdpa", "flex_attention", "eager"):
            model.config._attn_implementation = attn
            res[attn] = float(causal_lm_loss(model, {k: v.to(CUDA) for k, v in collate(rows, 0).items()})[0])
    model.config._attn_implementation = "sdpa"
    res["documents_alone"] = alone_loss(model, rows)
    res["max_rel_diff"] = max(abs(res[a] - res["documents_alone"]) / res["documents_alone"]
                              for a in ("sdpa", "flex_attention", "eager"))
    yield res
    del model
    yield from compiled_paths(root, ("default_path", "qlora_compiled"))
    yield check_offload(root)
    yield check_cudagraphs_accumulation(root)
    yield check_dropout_graphs(inside=True)
    yield check_dropout_graphs(inside=False)
    yield check_qlora_dropout(root)


def compiled_paths(root: Path, names: tuple[str, ...]):
    """default_path (LoRA) and qlora_compiled (NF4 QLoRA, checkpointed inside the compiled layers) against eager."""
    gen = torch.Generator().manual_seed(1)
    rows = to_rows(*packed_batch(1, 4096, SHAPES["1_8b"]["vocab_size"], gen)[:3])
    other = to_rows(*packed_batch(1, 4096, SHAPES["1_8b"]["vocab_size"], gen)[:3])
    for name in names:
        quant = {"default_path": "none", "qlora_compiled": "nf4"}[name]
        eager = ModelSettings(path="x", quantization=quant, gradient_checkpointing=False, compile=False,
                              use_liger=False)
        ref_model, _ = lora_model(root, eager, "sdpa", 4096)
        ref_loss, ref = loss_and_grads(ref_model, causal_lm_loss, rows)
        alone = alone_loss(ref_model, rows)
        del ref_model
        torch._dynamo.reset()
        fast = ModelSettings(path="x", quantization=quant, gradient_checkpointing="auto")
        model, plan = lora_model(root, fast, kernels.choose_attention("auto", CUDA, 4096), 4096)
        module = loss_module_for(model, plan, CUDA)  # with CUDA graphs and flex: tunelab's static block mask
        # compiled code from the second call on; with CUDA graphs the first records, the third replays, on a row
        # whose documents differ from the recorded one's (the block mask refilled in place)
        for r in (other, other, rows):
            loss, grads = loss_and_grads(model, lambda m, b: module(b), r)
        yield {"check": name, "plan": plan.describe(), "reference": "eager sdpa, torch cross-entropy",
               "loss": loss, "reference_loss": ref_loss, "documents_alone": alone,
               "loss_rel_diff": abs(loss - ref_loss) / ref_loss,
               "packed_vs_alone_rel_diff": abs(loss - alone) / alone, "grad_rel_diff": rel(grads, ref)}
        del model


def check_dropout_graphs(inside: bool) -> dict:
    """A LoRA-shaped layer with dropout under CUDA graphs, as a QLoRA run with LoRA dropout compiles it: checkpointed
    inside the compiled region (`inside`, kernels.checkpoint_inside: the compiler saves the masks' random state and
    recomputes the rest), or not at all at torch's budget 1 (gradient_checkpointing: false). The backward must use
    the forward's mask, and each replay must draw a new one. With one scalar weight w, out = w * f(...) and
    d(sum out)/dw = sum(out) / w only for the same mask; 4 calls (warm-up, recording, replays)."""
    import torch._functorch.config as functorch_config
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator(device=CUDA).manual_seed(0)
    frozen = torch.randn(2048, 8192, device=CUDA, generator=gen) / 45
    a = torch.nn.Parameter(torch.randn(2048, 64, device=CUDA, generator=gen) / 45)
    b = torch.nn.Parameter(torch.randn(64, 8192, device=CUDA, generator=gen) / 8)
    w = torch.nn.Parameter(torch.tensor(1.5, device=CUDA))

    def layer(x: torch.Tensor) -> torch.Tensor:
        h = x @ frozen + (torch.nn.functional.dropout(x, 0.1, training=True) @ a) @ b
        return torch.sin(h * 2.0 + 0.1) * w

    def checkpointed(x: torch.Tensor) -> torch.Tensor:  # as kernels.checkpoint_inside does
        return checkpoint(layer, x, use_reentrant=False, context_fn=kernels.recompute_everything)

    torch._dynamo.reset()
    diffs, sums = [], []
    with functorch_config.patch(activation_memory_budget=1.0):
        compiled = torch.compile(checkpointed if inside else layer, mode="reduce-overhead")
        x = torch.randn(4096, 2048, device=CUDA, generator=gen, requires_grad=inside)
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            for p in (a, b, w, x):
                p.grad = None  # each is an output of the recorded backward, overwritten by the next replay
            out = compiled(x)
            total = float(out.detach().sum())
            out.sum().backward()
            diffs.append(abs(float(w.grad) - total / 1.5) / abs(total / 1.5))
            sums.append(total)
    torch._dynamo.reset()
    return {"check": "dropout_graphs", "checkpointing": "inside the compiled region" if inside else "off",
            "budget": 1.0, "max_rel_diff": max(diffs), "masks_differ": len(set(sums)) == len(sums)}


def check_qlora_dropout(root: Path, control: bool = False) -> dict:
    """The QLoRA default (CUDA graphs, flex attention with tunelab's mask, checkpointed inside the compiled layers,
    Liger's loss) with LoRA dropout 0.1, in float32 so that a finite difference is exact enough: the gradient g
    must match (L(w + eps g) - L(w - eps g)) / 2 eps = |g|^2, each loss drawing the same masks (the same seed, the
    same recorded graphs, grad enabled). `control`: the negative control, no checkpointing and the compiler budget
    0 set behind tunelab's back (it refuses that budget with dropout), whose backward may draw other masks."""
    import torch._functorch.config as functorch_config

    gen = torch.Generator().manual_seed(5)
    rows = to_rows(*packed_batch(1, 4096, SHAPES["1_8b"]["vocab_size"], gen)[:3])
    torch._dynamo.reset()
    settings = ModelSettings(path="x", quantization="nf4", gradient_checkpointing=False if control else "auto")
    model, plan = lora_model(root, settings, kernels.choose_attention("auto", CUDA, 4096), 4096,
                             dtype=torch.float32, dropout=0.1)
    if control:
        functorch_config.activation_memory_budget = 0.0  # read at the first compile, below
    module = loss_module_for(model, plan, CUDA)
    batch = {k: v.to(CUDA) for k, v in collate(rows, 0).items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_at(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return module(batch)[0]

    for _ in range(2):  # compile, record
        model.zero_grad(set_to_none=True)
        loss_at(0).backward()
    diffs = []
    for seed in (11, 12):
        model.zero_grad(set_to_none=True)
        loss = loss_at(seed)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        norm2 = sum(float((g * g).sum()) for g in grads)
        eps = 1e-3 * abs(float(loss.detach())) / norm2  # moves the loss by about 0.1%
        moved = []
        for sign in (1, -2, 1):
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=sign * eps)
            moved.append(float(loss_at(seed).detach()))
        diffs.append(abs((moved[0] - moved[1]) / (2 * eps) - norm2) / norm2)
    same_seed = float(loss_at(11).detach()) == float(loss_at(11).detach())
    other_seed = float(loss_at(11).detach()) != float(loss_at(12).detach())
    del model
    torch._dynamo.reset()
    functorch_config.activation_memory_budget = 1.0
    return {"check": "qlora_dropout" + ("_negative_control_budget0" if control else ""), "plan": plan.describe(),
            "dtype": "float32", "lora_dropout": 0.1,
            "finite_difference_rel_diff": max(diffs), "same_seed_same_loss": same_seed,
            "other_seed_other_loss": other_seed}


def saved_activations(root: Path):
    """What NF4 QLoRA's compiled layers save for the backward (2 layers of the 1.8B shape, one 4096-token row, no
    CUDA graphs): checkpointed inside the compiled layers, or not at all at the compiler budget 0. Per variant, the
    saved tensors that are not parameters, grouped by shape and dtype, largest total first."""
    import torch._functorch.config as functorch_config

    gen = torch.Generator().manual_seed(1)
    rows = to_rows(*packed_batch(1, 4096, SHAPES["1_8b"]["vocab_size"], gen)[:3])
    plain = ModelSettings(path="x", quantization="nf4", gradient_checkpointing=False, compile=False, use_liger=False)
    for variant, budget in (("inside", 1.0), ("budget0", 0.0)):
        torch._dynamo.reset()
        model, _ = lora_model(root, plain, "sdpa", 4096)
        layers = kernels.decoder_layers(model.get_base_model())
        if variant == "inside":
            kernels.checkpoint_inside(layers)
        functorch_config.activation_memory_budget = budget
        kernels.compile_layers(layers)
        params = {p.data_ptr() for p in model.parameters()}
        for _ in range(2):
            groups: dict[str, list[int]] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                if t.data_ptr() not in params and t.device.type == "cuda":
                    g = groups.setdefault(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}", [0, 0])
                    g[0] += 1
                    g[1] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = loss_and_grads(model, causal_lm_loss, rows)
        top = sorted(groups.items(), key=lambda kv: -kv[1][1])[:12]
        yield {"check": "saved_activations", "variant": variant, "total_mib": round(sum(g[1] for g in groups.values())
                                                                                     / 2**20, 1),
               "top": [[k, n, round(b / 2**20, 1)] for k, (n, b) in top]}
        functorch_config.activation_memory_budget = 1.0
        del model


def check_cudagraphs_accumulation(root: Path) -> dict:
    from tunelab.train.optim import keep_gradients

    gen = torch.Generator().manual_seed(3)
    micro = [to_rows(*packed_batch(1, 1024, SHAPES["1_8b"]["vocab_size"], gen)[:3]) for _ in range(4)]

    def accumulate(model, loss_fn, keep: bool) -> tuple[float, dict[str, torch.Tensor]]:
        params = [p for p in model.parameters() if p.requires_grad]
        if keep:  # as `tunelab train` does with CUDA graphs: allocated once, zeroed in place
            keep_gradients(params)
            for p in params:
                p.grad.zero_()
        else:
            model.zero_grad(set_to_none=True)
        total = 0.0
        for rows in micro:
            batch = {k: v.to(CUDA) for k, v in collate(rows, 0).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = loss_fn(model, batch)
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    eager = ModelSettings(path="x", quantization="nf4", gradient_checkpointing=False, compile=False, use_liger=False)
    ref_model, _ = lora_model(root, eager, "sdpa", 1024)
    ref_loss, ref = accumulate(ref_model, causal_lm_loss, keep=False)
    del ref_model
    torch._dynamo.reset()
    graphs = ModelSettings(path="x", quantization="nf4", compile="cudagraphs", use_liger=False)  # checkpointed inside
    model, plan = lora_model(root, graphs, "sdpa", 1024)
    runs = [accumulate(model, causal_lm_loss, keep=True) for _ in range(3)]  # recordings, then replays
    loss, grads = runs[-1]
    return {"check": "cudagraphs_accumulation", "plan": plan.describe(), "micro_batches": len(micro),
            "loss": loss, "reference_loss": ref_loss, "loss_rel_diff": abs(loss - ref_loss) / ref_loss,
            "grad_rel_diff": rel(grads, ref),
            "grad_rel_diff_between_runs": rel(runs[-1][1], runs[-2][1])}


def check_offload(root: Path) -> dict:
    from tunelab.model.offload import OffloadPolicy, enable_offloaded_checkpointing, tile_mlps

    n = 32768
    ids = torch.randint(100, SHAPES["1_8b"]["vocab_size"], (n,), generator=torch.Generator().manual_seed(2))
    labels = np.full(n, -100)
    labels[n // 2:n - 1] = ids[n // 2 + 1:].numpy()
    rows = [(ids.numpy(), labels, np.array([n]))]
    settings = ModelSettings(path="x", gradient_checkpointing=True, compile=False, use_liger=True)
    model, _ = lora_model(root, settings, "sdpa", n)
    ref_loss, ref = loss_and_grads(model, liger_causal_lm_loss, rows)
    layers = kernels.decoder_layers(model.get_base_model())
    policy = OffloadPolicy(reserve_bytes=1 << 50)  # force every layer input to CPU memory
    enable_offloaded_checkpointing(layers, policy)
    tile_mlps([layer.mlp for layer in layers], tile=8192)
    loss, grads = loss_and_grads(model, liger_causal_lm_loss, rows)
    return {"check": "offload", "tokens": n, "offloaded_layers": policy.offloaded, "loss_rel_diff":
            abs(loss - ref_loss) / ref_loss, "grad_rel_diff": rel(grads, ref)}


def generate(root: Path, tokenizer_dir: str, profile_to: str | None = None):
    """Yields one timing per evaluation; `profile_to`: a cProfile file of the first."""
    from tunelab.data.templates import get_template
    from tunelab.model.generate import from_training
    from tunelab.model.load import load_tokenizer
    from tunelab.train.evaluate import evaluate_chat

    tok = load_tokenizer(tokenizer_dir)
    settings = ModelSettings(path="x", lora=LoraSettings(r=64, alpha=16, dropout=0.0, target_modules=TARGETS))
    model = load_model(str(model_folder("1_8b", root)), dtype=torch.bfloat16, device=CUDA,
                       attn_implementation=kernels.choose_attention("auto", CUDA, 4096))
    model = add_lora(model, settings.lora)
    plan = kernels.prepare_for_training(model, settings, CUDA, 4096)
    model.train()
    fn = liger_causal_lm_loss if plan.liger_loss else causal_lm_loss
    gen = torch.Generator().manual_seed(0)
    rows = to_rows(*packed_batch(1, 4096, 49152, gen)[:3])
    for _ in range(2):  # as in training: the layers and flex attention are compiled for training first
        loss_and_grads(model, fn, rows)
    chat = from_training(model, tok, get_template("hf", tok), CUDA)
    questions = ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    for label in ("generation_mode", "generation_mode_again"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        prof = cProfile.Profile() if label == "generation_mode" and profile_to else None
        with prof or nullcontext():
            answers = [r["answer"] for r in evaluate_chat(chat, questions, None, 128)]
            torch.cuda.synchronize()
        if prof:
            prof.dump_stats(profile_to)
        yield {"check": "eval_generation", "path": label, "seconds": round(time.perf_counter() - t, 2),
               "questions": 2, "max_new_tokens": 128, "answer_chars": [len(a) for a in answers],
               "plan": plan.describe()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/tl_models")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--generate", metavar="TOKENIZER_DIR")
    ap.add_argument("--profile", metavar="FILE", help="with --generate: cProfile the first evaluation into FILE")
    ap.add_argument("--only", nargs="+", choices=["default_path", "qlora_compiled", "cudagraphs_accumulation",
                                                  "dropout_graphs", "saved_activations", "qlora_dropout"], help="with --check: these checks alone")
    args = ap.parse_args()
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    def chosen():  # runs when read
        for name in args.only:
            if name == "cudagraphs_accumulation":
                yield check_cudagraphs_accumulation(root)
            elif name == "qlora_dropout":
                yield check_qlora_dropout(root)
                yield check_qlora_dropout(root, control=True)
            elif name == "saved_activations":
                yield from saved_activations(root)
            elif name == "dropout_graphs":
                yield check_dropout_graphs(inside=True)
                yield check_dropout_graphs(inside=False)
            else:
                yield from compiled_paths(root, (name,))

    checks = chosen() if args.only else check(root)
    runs = ([checks] if args.check else []) + ([generate(root, args.generate, args.profile)] if args.generate else [])
    for run in runs:
        try:
            for r in run:
                emit({"impl": "tunelab", **r}, args.out)
        except Exception as e:  # noqa: BLE001  (the next group still runs)
            traceback.print_exc()
            emit({"impl": "tunelab", "check": "error", "error": repr(e)[:300]}, args.out)


if __name__ == "__main__":
    main()
