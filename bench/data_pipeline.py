"""Data pipeline speed: tokenise and pack N OpenAI-format conversations (default 20,000, about 6.9M tokens) into
max_length rows, cold and then from the cache, side by side with an XTuner-style peer pipeline in the same run.

The peer follows XTuner 0.1.x's documented steps with `datasets.map` (records -> conversation -> template ->
per-turn tokenisation -> concatenate-and-chunk packing), as a user of the anchor would run it.
Prints one JSON line per measurement.

usage: python bench/data_pipeline.py [--n 20000] [--max-length 2048] [--template internlm2_chat] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not has but "
         "model data train learn token language system answer question people time year work world school "
         "water energy city music history science river mountain computer network program function value "
         "number small large quickly carefully because however therefore example result method process").split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-3 turns; about 345 tokens each with a GPT-2 style BPE tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            msgs.append({"role": "user", "content": " ".join(sentence(rng, rng.randint(6, 14))
                                                             for _ in range(rng.randint(1, 3)))})
            msgs.append({"role": "assistant", "content": " ".join(sentence(rng, rng.randint(8, 20))
                                                                  for _ in range(rng.randint(3, 18)))})
        out.append({"messages": msgs})
    return out


def run_tunelab(path: Path, tokenizer, max_length: int, template: str, cache: Path) -> list[dict]:
    from tunelab.config.schema import DataSettings
    from tunelab.data.dataset import prepare_data

    os.environ["TUNELAB_CACHE"] = str(cache)
    data = DataSettings(path=str(path), format="openai", prompt_template=template, max_length=max_length)
    results = []
    for label in ("cold", "cached"):
        t = time.perf_counter()
        prepared = prepare_data(data, tokenizer)
        dt = time.perf_counter() - t
        s = prepared.stats
        results.append({"bench": "data_pipeline", "impl": "tunelab", "run": label, "seconds": round(dt, 3),
                        "from_cache": prepared.from_cache, "samples": s.samples, "tokens": s.tokens,
                        "rows": len(prepared.rows), "tokens_per_s": round(s.tokens / dt),
                        "fill": round(s.tokens / (len(prepared.rows) * max_length), 4)})
    return results


def run_peer(path: Path, tokenizer, max_length: int, num_proc: int) -> dict:
    """XTuner 0.1.x's offline pipeline, step by step, with `datasets.map`."""
    import datasets
    import numpy as np

    from tunelab.data.templates import TEMPLATES

    t = TEMPLATES["internlm2_chat"]
    bos = tokenizer.bos_token_id

    def openai_map_fn(ex):
        conv, system, inp = [], "", ""
        for m in ex["messages"]:
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                inp += m["content"]
            else:
                conv.append({"system": system, "input": inp, "output": m["content"]})
                system, inp = "", ""
        return {"conversation": conv}

    def template_map_fn(ex):
        out = []
        for i, turn in enumerate(ex["conversation"]):
            text = t.instruction.format(input=turn["input"], round=i + 1)
            if turn["system"]:
                text = t.system.format(system=turn["system"]) + text
            out.append({"input": text, "output": turn["output"] + t.suffix, "sep": t.sep})
        return {"conversation": out}

    def encode_fn(ex):
        ids, labels = [bos], [-100]
        for turn in ex["conversation"]:
            a = tokenizer.encode(turn["input"], add_special_tokens=False)
            b = tokenizer.encode(turn["output"], add_special_tokens=False)
            c = tokenizer.encode(turn["sep"], add_special_tokens=False)
            ids += a + b + c
            labels += [-100] * len(a) + b + [-100] * len(c)
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as hf_cache:
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=hf_cache)
        ds = ds.map(openai_map_fn, remove_columns=ds.column_names, num_proc=num_proc)
        ds = ds.map(template_map_fn, num_proc=num_proc)
        ds = ds.map(encode_fn, remove_columns=["conversation"], num_proc=num_proc)
        ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in ds["input_ids"]])
        n_rows = len(ids) // max_length  # XTuner's Packer: concatenate, cut into max_length chunks
        rows = ids[: n_rows * max_length].reshape(n_rows, max_length)
    dt = time.perf_counter() - t0
    return {"bench": "data_pipeline", "impl": "peer_xtuner_style", "run": "cold", "seconds": round(dt, 3),
            "tokens": int(len(ids)), "rows": int(rows.shape[0]), "tokens_per_s": round(len(ids) / dt)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--template", default="internlm2_chat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tunelab import ui
    from tunelab.model.load import load_tokenizer, resolve_model_path

    ui.quiet_libraries(False)
    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    print(json.dumps({"bench": "data_pipeline", "machine_cores": os.cpu_count(), "n": args.n,
                      "max_length": args.max_length, "template": args.template, "python": sys.version.split()[0]}),
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversations.jsonl"
        with open(path, "w") as f:
            for r in make_records(args.n):
                f.write(json.dumps(r) + "\n")
        cold, cached = [], []
        for i in range(args.repeats):
            res = run_tunelab(path, tok, args.max_length, args.template, Path(tmp) / f"cache{i}")
            for r in res:
                print(json.dumps(r), flush=True)
            cold.append(res[0]["seconds"])
            cached.append(res[1]["seconds"])
        summary = {"bench": "data_pipeline", "impl": "tunelab", "median_cold_s": statistics.median(cold),
                   "median_cached_s": statistics.median(cached)}
        if not args.no_peer:
            peer = [run_peer(path, tok, args.max_length, num_proc=os.cpu_count() or 1)
                    for _ in range(args.repeats)]
            for r in peer:
                print(json.dumps(r), flush=True)
            summary["peer_median_cold_s"] = statistics.median(r["seconds"] for r in peer)
            summary["speedup_cold_vs_peer"] = round(summary["peer_median_cold_s"] / summary["median_cold_s"], 2)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
