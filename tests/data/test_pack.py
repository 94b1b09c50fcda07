"""Packing: rows never exceed max_length, position ids restart per sample, and a sample's logits are the same
packed with others as alone (no sample attends to another)."""

import numpy as np
import pytest
import torch

from tunelab.data.pack import best_fit, collate, pack_samples, position_ids_for


def test_best_fit_respects_capacity_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    rows = best_fit(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # best-fit decreasing wastes little: fewer than 10% more rows than the lower bound
    assert len(rows) <= 1.1 * np.ceil(lengths.sum() / 128)


def test_rows_record_sample_boundaries_and_collate_restarts_positions():
    ids = [np.arange(5, dtype=np.int32), np.arange(3, dtype=np.int32) + 10, np.arange(4, dtype=np.int32) + 20]
    labels = [np.full(len(x), 1, dtype=np.int32) for x in ids]
    rows = pack_samples(ids, labels, max_length=8, pack=True)
    assert len(rows) == 2
    got = sorted(tuple(rows.row(i)[2].tolist()) for i in range(len(rows)))
    assert got == [(4,), (5, 3)]  # best fit: 3 goes where it leaves no space
    batch = collate([rows.row(i) for i in range(len(rows))], pad_id=0, multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    for b in range(2):
        seq = rows.row(b)[2].tolist()
        expect = np.concatenate([np.arange(n) for n in seq + [8 - sum(seq)]])
        assert batch["position_ids"][b].tolist() == expect.tolist()
        assert (batch["labels"][b, sum(seq):] == -100).all()


def test_position_ids_padding_is_its_own_segment():
    assert position_ids_for(np.array([2, 3]), 7).tolist() == [0, 1, 0, 1, 2, 0, 1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sample_logits_equal_unpacked(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(5, 300, (n,), generator=g) for n in (7, 12, 5)]
    with torch.no_grad():
        alone = [model(input_ids=s[None], position_ids=torch.arange(len(s))[None]).logits[0] for s in samples]
        rows = [(s.numpy(), np.full(len(s), -100), np.array([len(s)])) for s in samples]
        packed_ids = np.concatenate([r[0] for r in rows])
        seq = np.array([len(s) for s in samples])
        batch = collate([(packed_ids, np.full(len(packed_ids), -100), seq)], pad_id=0, multiple_of=8)
        # exactly how training calls the model: position ids, no attention mask, no KV cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    start = 0
    for s, ref in zip(samples, alone):
        torch.testing.assert_close(packed[start:start + len(s)], ref, rtol=1e-5, atol=1e-5)
        start += len(s)
    # and without the restart, the later samples would see the earlier ones: the check above can fail
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False,
                      position_ids=torch.arange(batch["input_ids"].shape[1])[None]).logits[0]
    assert not torch.allclose(leaky[7:19], alone[1], atol=1e-3)
