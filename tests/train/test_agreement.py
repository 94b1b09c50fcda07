"""Choices that decide which collectives a step makes are the same on every process of a run, whatever each
process sees on its own."""

from tests.conftest import ROOT, chat_records, tiny_config, write_jsonl
from tests.train.test_sharded import torchrun


def test_processes_seeing_different_free_memory_choose_the_same_checkpointing(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(4))
    cfg = tiny_config(tmp_path, tiny_model_dir, data, data={"max_length": 512})
    res = torchrun(2, str(ROOT / "tests" / "train" / "speed_plans.py"), str(cfg), str(tmp_path), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    plans = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    # rank 1 has no room to keep the activations: every process checkpoints as rank 1 must
    assert plans[0] == plans[1] == "sdpa, activation checkpointing offloaded to CPU, tiled MLP"
    assert [(tmp_path / f"rank{r}.sharded").read_text() for r in range(2)] == ["True", "True"]  # zero3


def test_ddp_processes_plan_for_unsharded_weights(tmp_path, tiny_model_dir):
    """Several DDP processes hold whole weights: their speed plan may take CUDA graphs (one GPU's rules)."""
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(4))
    cfg = tiny_config(tmp_path, tiny_model_dir, data)
    res = torchrun(2, str(ROOT / "tests" / "train" / "speed_plans.py"), str(cfg), str(tmp_path), "--strategy", "ddp",
                   timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.sharded").read_text() for r in range(2)] == ["False", "False"]
    assert not any((tmp_path / f"rank{r}.txt").read_text().startswith("error") for r in range(2))


def test_processes_that_still_choose_differently_are_refused_with_one_line(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(4))
    cfg = tiny_config(tmp_path, tiny_model_dir, data)
    res = torchrun(2, str(ROOT / "tests" / "train" / "speed_plans.py"), str(cfg), str(tmp_path), "--bf16-on-rank-1",
                   timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert said[0] == said[1]  # every process stops with the same line
    assert said[0].startswith("error: the processes of this run chose different settings: rank 0 'torch.float32, "
                              "sdpa, ")
    assert "rank 1 'torch.bfloat16, sdpa, " in said[0]


def test_data_is_prepared_once_per_node_and_read_from_its_cache_by_the_others(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", chat_records(12))
    cfg = tiny_config(tmp_path, tiny_model_dir, data, data={"cache": True})
    res = torchrun(3, str(ROOT / "tests" / "train" / "data_once.py"), str(cfg), str(tmp_path), timeout=180,
                   TUNELAB_CACHE=str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    said = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(3)]
    rows = said[0][1]
    assert said == [["False", rows], ["True", rows], ["True", rows]]  # tokenised once, by local rank 0
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1
