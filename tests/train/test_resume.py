"""Resume tells the truth: schedule changes go on with one line each (old and new value, the learning rate before
and after the resume point), a run that is already done says so, a different number of rows per step is refused
with both layouts, and checkpoints from before optimizer state was saved by name still resume exactly."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import chat_records, tiny_config, write_jsonl
from tunelab.config.load import load_config
from tunelab.config.schema import TrainSettings
from tunelab.errors import CheckpointError
from tunelab.train.log import read_scalars
from tunelab.train.loop import train
from tunelab.train.optim import lr_at


def run(tmp_path, model_dir, overrides=(), resume=False, work="work"):
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(12))  # 12 rows, 4 per step: 3 steps per epoch
    cfg = load_config(tiny_config(tmp_path, model_dir, data, data={"pack_to_max_length": False}), list(overrides))
    return train(cfg, "tiny", work_dir=tmp_path / work, resume=resume)


def test_schedule_changes_go_on_with_one_line_each(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, ["train.max_steps=2"])
    res = run(tmp_path, tiny_model_dir, ["train.max_steps=4", "train.lr=5e-4"], resume=True)
    old, new = TrainSettings(lr=1e-3, max_steps=2), TrainSettings(lr=5e-4, max_steps=4)
    before, after = lr_at(2, 2, old), lr_at(2, 4, new)
    lines = [ln.split(" ", 2)[2] for ln in (res.log_dir / "train.log").read_text().splitlines()
             if " resume: " in ln]
    tail = f"(total steps 2 -> 4; lr at step 2: {before:.3e} before, {after:.3e} after)"
    assert lines == [f"resume: train.max_steps 2 -> 4 {tail}", f"resume: train.lr 0.001 -> 0.0005 {tail}"]
    assert before != after
    logged = read_scalars(res.log_dir / "scalars.jsonl")
    assert [r["step"] for r in logged] == [3, 4] and logged[0]["lr"] == pytest.approx(after)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, ["train.max_steps=2"])
    with pytest.raises(CheckpointError, match=r"iter_2 is at step 2 and the schedule now ends at step 2: nothing "
                                              r"to train \(raise train.max_steps"):
        run(tmp_path, tiny_model_dir, ["train.max_steps=2"], resume=True)


def test_other_rows_per_step_are_refused_with_both_layouts(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, ["train.max_steps=1"])
    with pytest.raises(CheckpointError, match=r"rows per optimizer step: 4 \(batch_size 2 x accumulative_counts 2 x "
                                              r"1 process\) -> 2 \(batch_size 2 x accumulative_counts 1 x 1 "
                                              r"process\); change accumulative_counts so the product stays 4"):
        run(tmp_path, tiny_model_dir, ["train.max_steps=2", "train.accumulative_counts=1"], resume=True)
    # the same rows per step in another layout is the same run
    res = run(tmp_path, tiny_model_dir, ["train.max_steps=2", "train.accumulative_counts=1", "train.batch_size=4"],
              resume=True)
    assert res.steps == 2


def to_old_format(ckpt):
    """Rewrite a checkpoint as tunelab wrote them before: optimizer state by position, the batch layout in the
    fingerprint instead of the rows per step."""
    meta = json.loads((ckpt / "optimizer.json").read_text())
    names = [n for g in meta["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    renamed = {}
    for key, t in tensors.items():
        owner, k = key.removeprefix("state.").rsplit(".", 1)
        renamed[f"state.{index[owner]}.{k}"] = t
    save_file(renamed, str(ckpt / "optimizer.safetensors"))
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    (ckpt / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": {}}))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    fp = state["fingerprint"]
    fp.pop("layout")
    fp.pop("rows_per_step")
    fp.update({"train.batch_size": 2, "train.accumulative_counts": 2, "world_size": 1})
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_a_checkpoint_of_the_old_by_position_format_resumes_exactly(tmp_path, tiny_model_dir):
    over = ["train.max_steps=4", "runtime.save_steps=2", "runtime.save_total_limit=-1"]
    full = run(tmp_path, tiny_model_dir, over)
    losses = [r["loss"] for r in read_scalars(full.log_dir / "scalars.jsonl")]
    work = tmp_path / "work"
    shutil.rmtree(work / "iter_4")
    (work / "last_checkpoint").write_text("iter_2\n")
    to_old_format(work / "iter_2")
    resumed = run(tmp_path, tiny_model_dir, over, resume=True)
    assert [r["loss"] for r in read_scalars(resumed.log_dir / "scalars.jsonl")] == losses[2:]
    assert json.loads((resumed.checkpoint / "optimizer.json").read_text())["format"] == "by_name"
