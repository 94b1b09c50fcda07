"""tunelab/model/offload.py: checkpointing with CPU-offloaded layer inputs and the tiled MLP give the gradients of
the plain model; with LoRA dropout the recomputation replays the forward pass's random masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model.test_kernels import lora_grads, tiny_lora
from tunelab.model.kernels import decoder_layers
from tunelab.model.offload import OffloadPolicy, enable_offloaded_checkpointing, tile_mlps

IDS = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))


def assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=1e-5, atol=1e-7)


def test_offloaded_checkpointing_and_tiled_mlp_match_the_plain_model(tmp_path: Path) -> None:
    model = tiny_lora(tmp_path)
    ref = lora_grads(model, IDS)
    layers = decoder_layers(model.get_base_model())
    policy = OffloadPolicy()
    enable_offloaded_checkpointing(layers, policy)
    tile_mlps([layer.mlp for layer in layers], tile=16)  # 40 tokens: tiles of 16, 16 and 8
    assert_same(lora_grads(model, IDS), ref)
    assert policy.kept == 2 and policy.offloaded == 0  # on the CPU the input is already where it would go


def test_offloaded_checkpointing_replays_dropout(tmp_path: Path) -> None:
    model = tiny_lora(tmp_path, dropout=0.1)
    ref = lora_grads(model, IDS)
    enable_offloaded_checkpointing(decoder_layers(model.get_base_model()), OffloadPolicy())
    assert_same(lora_grads(model, IDS), ref)


def test_tiled_mlp_replays_dropout_tile_by_tile(tmp_path: Path) -> None:
    model = tiny_lora(tmp_path, dropout=0.1)
    mlps = [layer.mlp for layer in decoder_layers(model.get_base_model())]
    inner = [m.forward for m in mlps]
    for m, f in zip(mlps, inner):  # the reference: the same tiles, kept by autograd instead of recomputed
        m.forward = lambda x, f=f: torch.cat([f(x[:, s:s + 16]) for s in range(0, x.shape[1], 16)], dim=1)
    ref = lora_grads(model, IDS)
    for m, f in zip(mlps, inner):
        m.forward = f
    tile_mlps(mlps, tile=16)
    assert_same(lora_grads(model, IDS), ref)


def test_the_policy_keeps_cpu_tensors_where_they_are() -> None:
    assert OffloadPolicy().keep_on_device(torch.zeros(4))
