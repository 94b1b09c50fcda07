"""tunelab/model/block_mask.py: flex attention's mask for packed rows, refilled in the same tensors, computes what
transformers' own packed mask computes (flex attention runs forward-only on the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_model
from tunelab.data.pack import collate
from tunelab.model.block_mask import StaticBlockMask, document_ids, supports_static_mask
from tunelab.train.loss import LossModule, causal_lm_loss


def test_document_ids_start_a_document_wherever_the_position_does_not_go_up_by_one() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 1]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 2, 2]]


def test_only_plain_causal_models_take_the_fixed_mask() -> None:
    from transformers import LlamaConfig, Qwen2Config

    assert supports_static_mask(LlamaConfig())
    windowed = LlamaConfig()
    windowed.sliding_window = 64
    assert not supports_static_mask(windowed)
    assert supports_static_mask(Qwen2Config(use_sliding_window=False))
    assert not supports_static_mask(Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1,
                                                num_hidden_layers=2))
    from transformers import Gemma3Config  # multimodal: the sliding window sits in the text model's config

    assert not supports_static_mask(Gemma3Config())


def test_the_mask_is_refilled_in_place_and_gives_the_losses_of_transformers_own_mask(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path, vocab_size=64)
    model.eval()
    rng = np.random.default_rng(0)

    def row(lengths: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = rng.integers(4, 64, sum(lengths))
        return ids, np.concatenate([ids[1:], [-100]]), np.array(lengths)

    # micro-batches of one width (256) whose documents differ, the second row of each padded; the third holds
    # fewer rows (an epoch's last micro-batch), then a full one again
    batches = [collate([row([100, 60, 96]), row([200, 50])], 0, pad_to=256),
               collate([row([30, 200, 26]), row([7, 9, 11, 220])], 0, pad_to=256),
               collate([row([128, 128])], 0, pad_to=256),
               collate([row([256]), row([1, 255])], 0, pad_to=256)]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")  # transformers builds its packed mask from the position ids
        expected = [float(causal_lm_loss(model, b)[0]) for b in batches]
        model.set_attn_implementation("flex_attention")
        mask = StaticBlockMask()
        module = LossModule(model, causal_lm_loss, mask)
        got, tables = [], []
        for b in batches:
            got.append(float(module(b)[0]))
            docs, block_mask = mask.masks[(len(b["input_ids"]), 256, "cpu")]
            tables.append([(name, t.data_ptr()) for name, t in vars(block_mask).items()
                           if isinstance(t, torch.Tensor)] + [("docs", docs.data_ptr())])
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)
    # the same tensors for each shape (block tables and the document ids the mask function reads), holding the
    # last micro-batch's documents
    assert len(tables[0]) > 4 and tables[0] == tables[1] == tables[3] != tables[2]
    assert len(mask.masks) == 2
    assert torch.equal(mask.masks[(2, 256, "cpu")][0], document_ids(batches[3]["position_ids"]))
