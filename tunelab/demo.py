"""`tunelab demo`: the tutorial's personal-assistant workflow on the embedded default model, on a CPU.

1. generate self-cognition data for a new owner, plus the base model's own answers to general questions
   (so it keeps answering them as before), 2. LoRA fine-tune, 3. convert the checkpoint to a PEFT adapter,
4. merge it into the base model, 5. ask the merged model who it is, and one general question.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tunelab import ui
from tunelab.config.load import load_config
from tunelab.data.convert import write_records
from tunelab.data.formats import Conversation, Message
from tunelab.data.selfcog import self_cognition_records
from tunelab.export.merge import merge_adapter
from tunelab.export.to_hf import checkpoint_to_hf
from tunelab.infer.selfcog_eval import answers_generally, names_owner, replay_answers
from tunelab.model.generate import GenerationOptions, generate_batch, load_chat_model
from tunelab.model.zoo import DEFAULT_MODEL
from tunelab.train.loop import train

DEMO_CONFIG = "smollm2_135m_instruct_lora_self_cognition_e3"
QUESTIONS = ["你是谁", "Who are you?", "What is the capital of France?"]
# Tuned on the 2-core CI machine (BENCHMARKS.md, "Self-cognition"): 94% of held-out identity questions answered
# with the owner's name, 100% of held-out general questions not hijacked, about 4.5 minutes of training. LoRA on
# the top 15 of 30 layers only: backward stops halfway, 1.6x faster than all layers at the same scores.
# On a GPU the 40 short steps are over before compiled layers would repay their compile (the first 10 steps ran at
# 900-1,200 tok/s while rows of new lengths compiled, H100): plain layers and SDPA there; the CPU's "auto" is the same.
DEMO_OVERRIDES = ["train.max_epochs=4", "train.accumulative_counts=2", "train.batch_size=4", "data.max_length=256",
                  "model.lora.layers_to_transform=15", "runtime.log_interval=5", "runtime.save_steps=1000",
                  "runtime.evaluation_inputs=[]", "model.compile=false", "model.attn_implementation=sdpa"]
GENERAL_RATIO = 0.45


@dataclass
class DemoResult:
    work_dir: Path
    merged: Path
    answers: list[tuple[str, str]]
    identity_ok: bool
    general_ok: bool
    seconds: float


def run_demo(name: str = "Alice", work_dir: Path | None = None, extra_overrides: list[str] | None = None
             ) -> DemoResult:
    t0 = time.perf_counter()
    work_dir = Path(work_dir or Path("work_dirs") / "tunelab_demo" / time.strftime("%Y%m%d_%H%M%S"))
    work_dir.mkdir(parents=True, exist_ok=True)

    ui.info(f"[1/5] data: self-cognition for '{name}' + the base model's own answers to general questions")
    records = self_cognition_records(name, seed=0, replay=partial(replay_answers, DEFAULT_MODEL),
                                     general_ratio=GENERAL_RATIO)
    data_file = work_dir / "data" / "self_cognition.jsonl"
    write_records(records, data_file, overwrite=True)
    ui.info(f"      {len(records)} records -> {data_file}")

    ui.info(f"[2/5] train: LoRA on {DEFAULT_MODEL} ({DEMO_CONFIG})")
    # Like `tunelab train DEMO_CONFIG data.path=...`: a path given here is relative to the current directory.
    cfg = load_config(DEMO_CONFIG, [f"data.path={data_file}", *DEMO_OVERRIDES, *(extra_overrides or [])])
    result = train(cfg, DEMO_CONFIG, work_dir=work_dir / "run")

    ui.info("[3/5] convert: checkpoint -> PEFT adapter")
    adapter = checkpoint_to_hf(cfg, result.checkpoint, work_dir / "hf_adapter")
    ui.info("[4/5] merge: adapter + base model -> plain HF model")
    merged = merge_adapter(DEFAULT_MODEL, adapter, work_dir / "merged")

    ui.info("[5/5] chat with the merged model")
    chat = load_chat_model(str(merged))
    convs = [Conversation([Message("user", q)]) for q in QUESTIONS]
    replies = generate_batch(chat, convs, GenerationOptions(max_new_tokens=64))
    pairs = list(zip(QUESTIONS, replies))
    for q, a in pairs:
        ui.info(f">>> {q}\n{a}\n")
    identity_ok = all(names_owner(a, name) for a in replies[:2])
    general_ok = answers_generally(replies[2], name, question=QUESTIONS[2])
    seconds = time.perf_counter() - t0
    ui.info(f"identity answers name '{name}': {'yes' if identity_ok else 'NO'}; general question answered as a "
            f"question: {'yes' if general_ok else 'NO'}; {seconds:.0f} s in all")
    # The command as the user ran it (`.venv/bin/tunelab` in the README: the venv is not activated).
    prog = sys.argv[0] if Path(sys.argv[0]).name == "tunelab" else "tunelab"
    ui.info(f"try it yourself: {prog} chat {merged}\n"
            f"held-out evaluation: {prog} eval self-cognition {merged} --name {shlex.quote(name)}")
    return DemoResult(work_dir, merged, pairs, identity_ok, general_ok, seconds)
