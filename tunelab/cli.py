"""Command line: argument parsing and dispatch only, one small function per command.

Exit codes: 0 success; 1 an error the user can fix (one line, no traceback; --debug shows it); 2 bad usage;
130/143 training stopped by Ctrl-C/SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from tunelab import __version__, ui
from tunelab.errors import ConfigError, TunelabError, missing_module_message

# ---------------------------------------------------------------------------------------------- helpers


def _load_config(source: str, overrides: list[str]):
    """A config file or the name of a built-in config, and the run's name."""
    from tunelab.config.load import config_name, load_config

    return load_config(source, overrides), config_name(source)


def _generation_options(args: argparse.Namespace):
    from tunelab.model.generate import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                             stop_words=list(args.stop_words or []))


def _in_range(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a number of `kind` in [low, high] (or (low, high] with low_open)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text}") from None
        if (v <= low if low_open else v < low) or (high is not None and v > high):
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound} (got {text})")
        return v
    return parse


def _add_generation_args(p: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    p.add_argument("--adapter", help="a PEFT adapter folder to apply on top of MODEL")
    p.add_argument("--prompt-template", help="XTuner template name or 'hf' (default: the one the model was "
                   "trained with, from its tunelab.json, else the tokenizer's own)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the model quantized to 4 or 8 bits")
    p.add_argument("--temperature", type=_in_range(float, 0, 100), default=temperature, help="0 = greedy decoding")
    p.add_argument("--top-p", type=_in_range(float, 0, 1, low_open=True), default=1.0)
    p.add_argument("--top-k", type=_in_range(int, 0), default=0, help="0 = no top-k filtering")
    p.add_argument("--repetition-penalty", type=_in_range(float, 0, low_open=True), default=1.0)
    p.add_argument("--max-new-tokens", type=_in_range(int, 1), default=512)
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--stop-words", nargs="*", default=[], help="extra strings that end an answer")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


# ---------------------------------------------------------------------------------------------- commands


def cmd_version(args: argparse.Namespace) -> int:
    print(f"tunelab {__version__}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import platform

    import bitsandbytes
    import datasets
    import peft
    import torch
    import transformers

    from tunelab.cache import cache_root
    from tunelab.model.zoo import default_model_dir

    rows = {
        "tunelab": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__, "datasets": datasets.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else "not available (CPU)",
        "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "cpu threads": torch.get_num_threads(), "cache": str(cache_root()),
        "default model": str(default_model_dir()) + ("" if (default_model_dir() / "config.json").exists()
                                                     else " (converted on first use)"),
    }
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_list_cfg(args: argparse.Namespace) -> int:
    from tunelab.config.catalog import list_configs, near_models

    names = list_configs(args.pattern)
    if not names:
        near = near_models(args.pattern or "")
        hint = f"; did you mean '{near[0]}' (tunelab list-cfg -p {near[0]})?" if len(near) == 1 else \
            f"; models with those words: {', '.join(near)}" if near else ""
        raise ConfigError(f"no built-in config matches '{args.pattern}'{hint}")
    print("\n".join(names))
    return 0


def cmd_copy_cfg(args: argparse.Namespace) -> int:
    from tunelab.config.catalog import copy_config

    out = copy_config(args.name, Path(args.dir), overwrite=args.overwrite)
    print(f"copied {args.name} to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        overrides.insert(0, resume)  # `--resume key=value`: the override was taken for the checkpoint path
        resume = True
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    given = list(overrides)  # as typed (the continue-with command adds --deepspeed itself)
    if args.deepspeed:  # XTuner's flag: the same choice as the train.strategy key
        from tunelab.config.schema import normalize_strategy

        try:
            overrides.append(f"train.strategy={normalize_strategy(args.deepspeed)}")
        except ValueError as e:
            raise ConfigError(f"--deepspeed: {e}") from None
    cfg, name = _load_config(args.config, overrides)
    from tunelab.train.loop import train

    train(cfg, name, work_dir=Path(args.work_dir) if args.work_dir else None, resume=resume or False,
          resume_force=args.resume_force, config_source=args.config, overrides=given)
    return 0


def cmd_convert_to_hf(args: argparse.Namespace) -> int:
    from tunelab.export.to_hf import checkpoint_to_hf

    cfg, _ = _load_config(args.config, args.overrides)
    checkpoint_to_hf(cfg, args.checkpoint, args.out, overwrite=args.overwrite)
    return 0


def cmd_convert_merge(args: argparse.Namespace) -> int:
    from tunelab.export.merge import merge_adapter

    merge_adapter(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size, device=args.device,
                  trust_remote_code=args.trust_remote_code, overwrite=args.overwrite)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.infer.chat import run_chat
    from tunelab.model.generate import load_chat_model

    chat = load_chat_model(args.model, adapter=args.adapter, bits=args.bits, template=args.prompt_template,
                           trust_remote_code=args.trust_remote_code, device=args.device)
    return run_chat(chat, _generation_options(args), system=args.system, stream=not args.no_streamer,
                    as_json=args.json, keep_history=True if args.history else False if args.no_history else None)


def cmd_data_self_cognition(args: argparse.Namespace) -> int:
    from tunelab.data.convert import write_records
    from tunelab.data.selfcog import self_cognition_records

    replay = None
    if args.replay_model:
        from functools import partial

        from tunelab.infer.selfcog_eval import replay_answers

        replay = partial(replay_answers, args.replay_model)
    records = self_cognition_records(args.name, model_desc=args.model_desc, n=args.n, seed=args.seed,
                                     system=args.system, general_file=args.general,
                                     replay=replay, general_ratio=args.general_ratio)
    write_records(records, Path(args.out), args.format, overwrite=args.overwrite)
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from tunelab.data.dataset import prepare_data
    from tunelab.model.load import load_tokenizer, resolve_model_path

    cfg, _ = _load_config(args.config, args.overrides)
    tok = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    print(json.dumps(prepare_data(cfg.data, tok, seed=cfg.train.seed).summary()))
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from tunelab.data.convert import convert_file

    n = convert_file(Path(args.input), Path(args.output), args.from_format, args.to_format, overwrite=args.overwrite)
    print(f"converted {n} records to {args.output}")
    return 0


def cmd_eval_self_cognition(args: argparse.Namespace) -> int:
    from tunelab.infer.selfcog_eval import evaluate_self_cognition, held_out_questions
    from tunelab.model.generate import load_chat_model

    chat = load_chat_model(args.model, adapter=args.adapter, template=args.prompt_template,
                           trust_remote_code=args.trust_remote_code, device=args.device)
    total = len(held_out_questions())
    print(f"answering {total} held-out questions on {chat.device} (a few minutes on a CPU)", file=sys.stderr,
          flush=True)
    with ui.progress(total, "answering") as answered:
        rep = evaluate_self_cognition(chat, args.name, system=args.system, model_desc=args.model_desc,
                                      answered=answered)
    if args.verbose:
        print("\n".join(rep.lines()))
    print(json.dumps(rep.summary()))
    return 0


def cmd_check_dataset(args: argparse.Namespace) -> int:
    from tunelab.data.inspect import check_dataset
    from tunelab.model.load import load_tokenizer, resolve_model_path

    cfg, name = _load_config(args.config, args.overrides)
    tok = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    hist = Path(args.hist) if args.hist else Path(f"{name}_lengths.png")
    return check_dataset(cfg, tok, hist)


def cmd_log_dataset(args: argparse.Namespace) -> int:
    from tunelab.data.inspect import log_dataset
    from tunelab.model.load import load_tokenizer, resolve_model_path

    cfg, _ = _load_config(args.config, args.overrides)
    tok = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    return log_dataset(cfg, tok, args.n)


def _load_for_serving(args: argparse.Namespace):
    from tunelab.model.generate import load_chat_model

    return load_chat_model(args.model, adapter=args.adapter, bits=args.bits, template=args.prompt_template,
                           trust_remote_code=args.trust_remote_code, device=args.device)


def cmd_web(args: argparse.Namespace) -> int:
    import gradio  # noqa: F401  (a missing package is reported before the slow model load)

    from tunelab.infer.ports import ensure_port_free
    from tunelab.infer.web import serve_web

    ensure_port_free(args.host, args.port)  # before the (slow) model load
    return serve_web(_load_for_serving(args), host=args.host, port=args.port, system=args.system,
                     defaults=_generation_options(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.infer.api.server import serve_api
    from tunelab.infer.ports import ensure_port_free

    ensure_port_free(args.host, args.port)  # before the (slow) model load
    return serve_api(_load_for_serving(args), host=args.host, port=args.port, system=args.system,
                     defaults=_generation_options(args), model_name=args.model_name, max_batch=args.max_batch)


def cmd_export_app(args: argparse.Namespace) -> int:
    from tunelab.export.app import export_app

    export_app(args.model, Path(args.out), adapter=args.adapter, template=args.prompt_template, system=args.system,
               hub_id=args.hub_id, overwrite=args.overwrite)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tunelab.demo import run_demo

    run_demo(args.name, Path(args.work_dir) if args.work_dir else None)
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="a YAML config file or a built-in config name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys (data.max_length=512)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune LLMs with QLoRA, LoRA or full fine-tuning.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and library messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_setup_commands, _add_convert_commands, _add_chat_command, _add_data_commands,
                _add_eval_commands, _add_serving_commands):
        add(sub)
    return p


def _add_setup_commands(sub) -> None:
    s = sub.add_parser("version", help="print the tunelab version")
    s.set_defaults(func=cmd_version)
    s = sub.add_parser("env", help="versions of tunelab and its stack, GPUs, cache folder")
    s.set_defaults(func=cmd_env)

    s = sub.add_parser("list-cfg", help="list built-in configs")
    s.add_argument("-p", "--pattern", help="substring or glob to filter names")
    s.set_defaults(func=cmd_list_cfg)
    s = sub.add_parser("copy-cfg", help="copy a built-in config to DIR/NAME_copy.yaml")
    s.add_argument("name")
    s.add_argument("dir")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_copy_cfg)

    s = _with_config(sub.add_parser("train", help="fine-tune with a config"))
    s.add_argument("--work-dir", help="run folder (default: work_dirs/<config name>)")
    s.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from CKPT, or from the work dir's last checkpoint")
    s.add_argument("--resume-force", action="store_true", help="resume even if the config changed")
    s.add_argument("--seed", type=int)
    s.add_argument("--deepspeed", metavar="STRATEGY",
                   help="how several processes share the work (= train.strategy): ddp, zero1, zero2, zero2_offload, "
                        "zero3, zero3_offload; XTuner's deepspeed_zero2 etc. work too (FSDP2 underneath)")
    s.set_defaults(func=cmd_train)


def _add_convert_commands(sub) -> None:
    conv = sub.add_parser("convert", help="convert checkpoints (to-hf / pth_to_hf) and merge adapters")
    csub = conv.add_subparsers(dest="convert_command", metavar="WHAT")
    csub.required = True
    for alias in ("to-hf", "pth_to_hf"):
        s = csub.add_parser(alias, help="checkpoint -> Hugging Face adapter or model folder")
        s.add_argument("config")
        s.add_argument("checkpoint", help="iter_N folder (iter_N.pth accepted) or the run's work dir")
        s.add_argument("out")
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
        s.add_argument("--overwrite", action="store_true")
        s.set_defaults(func=cmd_convert_to_hf)
    s = csub.add_parser("merge", help="merge a PEFT adapter into its base model")
    s.add_argument("base")
    s.add_argument("adapter")
    s.add_argument("out")
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert_merge)


def _add_chat_command(sub) -> None:
    s = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Chat with a model. At a terminal the questions are one conversation. When "
                                   "stdin is not a terminal (questions piped in, one per line), each line is "
                                   "answered on its own; --history makes them one conversation.")
    s.add_argument("model", help="model folder, hub id or smollm2-135m-instruct")
    _add_generation_args(s)
    s.add_argument("--no-streamer", action="store_true", help="print whole answers instead of streaming")
    s.add_argument("--json", action="store_true", help="print each answer as a JSON line")
    history = s.add_mutually_exclusive_group()
    history.add_argument("--history", action="store_true",
                         help="keep the conversation when questions are piped in (default: each line on its own)")
    history.add_argument("--no-history", action="store_true",
                         help="answer every question on its own, at a terminal too")
    s.set_defaults(func=cmd_chat)


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="make, convert and prepare datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="WHAT")
    dsub.required = True
    s = dsub.add_parser("self-cognition", help="generate identity Q&A for a new owner")
    s.add_argument("--name", required=True, help="the owner's name")
    s.add_argument("--model-desc", help="what the model is (goes into every answer)")
    s.add_argument("--system", help="system prompt to put in every record")
    s.add_argument("--n", type=int, help="number of identity records (default: two per phrasing)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--general", help="a dataset file whose records are mixed in")
    s.add_argument("--replay-model", help="mix in this model's own answers to built-in general questions")
    s.add_argument("--general-ratio", type=float, default=0.3, help="share of general records in the output")
    s.add_argument("--format", choices=["openai", "conversation"], default="openai")
    s.add_argument("--out", required=True, help=".jsonl or .json file")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_data_self_cognition)
    s = _with_config(dsub.add_parser("prepare", help="tokenise, pack and cache a config's data ahead of training"))
    s.set_defaults(func=cmd_data_prepare)
    s = dsub.add_parser("convert", help="convert a dataset file between formats")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--from", dest="from_format", default="auto",
                   choices=["auto", "alpaca", "sharegpt", "openai", "conversation", "oasst1", "pretrain"])
    s.add_argument("--to", dest="to_format", default="openai", choices=["openai", "conversation", "pretrain"])
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_data_convert)


def _add_eval_commands(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model")
    esub = ev.add_subparsers(dest="eval_command", metavar="WHAT")
    esub.required = True
    s = esub.add_parser("self-cognition", help="identity and general-question rates on held-out questions")
    s.add_argument("model")
    s.add_argument("--adapter")
    s.add_argument("--name", required=True)
    s.add_argument("--model-desc", help="the description used in the training data (default: tunelab's)")
    s.add_argument("--system")
    s.add_argument("--prompt-template")
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("-v", "--verbose", action="store_true", help="print every question and answer")
    s.set_defaults(func=cmd_eval_self_cognition)

    for alias in ("check-dataset", "check-custom-dataset"):
        s = _with_config(sub.add_parser(alias, help="read every record, report bad ones, count tokens, plot "
                                                   "sample lengths"))
        s.add_argument("--hist", help="where to save the length histogram PNG (default: <config>_lengths.png)")
        s.set_defaults(func=cmd_check_dataset)
    s = _with_config(sub.add_parser("log-dataset", help="print rendered samples with the no-loss spans marked"))
    s.add_argument("-n", type=int, default=3, help="how many samples")
    s.set_defaults(func=cmd_log_dataset)


def _add_serving_commands(sub) -> None:
    for name, port, help_text in (("web", 7860, "a web chat page (Gradio)"),
                                  ("serve", 8000, "an OpenAI-compatible HTTP API")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("model")
        _add_generation_args(s)
        s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
        s.add_argument("--port", type=_in_range(int, 0, 65535), default=port)
        if name == "serve":
            s.add_argument("--model-name", help="the model id reported by /v1/models (default: folder name)")
            s.add_argument("--max-batch", type=int, default=8,
                           help="queued greedy requests answered together (default: %(default)s; 1: one at a time)")
        s.set_defaults(func=cmd_web if name == "web" else cmd_serve)
    s = sub.add_parser("export-app", help="write a folder deployable as a Gradio app (e.g. a hub Space)")
    s.add_argument("model")
    s.add_argument("out")
    s.add_argument("--adapter")
    s.add_argument("--prompt-template")
    s.add_argument("--system")
    s.add_argument("--hub-id", help="reference the model by this hub id instead of copying its files")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export_app)

    s = sub.add_parser("demo", help="fine-tune the default model to a new identity on CPU, then chat with it")
    s.add_argument("--name", default="Alice", help="the new owner's name")
    s.add_argument("--work-dir")
    s.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`train cfg.yaml --work-dir w data.max_length=512`).
    if "--debug" in extra:  # also accepted after the command (`tunelab train cfg.yaml --debug`)
        extra = [x for x in extra if x != "--debug"]
        args.debug = True
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    ui.quiet_libraries(args.debug)
    try:
        return int(args.func(args) or 0)
    except TunelabError as e:
        if args.debug:
            traceback.print_exc()
        ui.error(str(e))
        return e.exit_code
    except ModuleNotFoundError as e:
        if args.debug or not e.name:
            traceback.print_exc()
        ui.error(missing_module_message(e) if e.name else str(e))
        return 1
    except KeyboardInterrupt:
        ui.error("interrupted")
        return 130
    except BrokenPipeError:
        return 1
    except Exception:
        traceback.print_exc()
        ui.error("unexpected failure (the traceback above says where); please report it")
        return 1


if __name__ == "__main__":
    sys.exit(main())
