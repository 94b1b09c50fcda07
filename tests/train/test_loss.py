"""The loss function: equal to the model's own loss, isolated per packed sample, and gradient accumulation
that weights every token of the accumulated batch equally."""

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.data.pack import collate
from tunelab.train.loop import accumulate_gradients
from tunelab.train.loss import LossModule, causal_lm_loss
from tunelab.train.parallel import Parallel


def load(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


def random_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(6, 30))
        ids = rng.integers(5, 300, size=length).astype(np.int32)
        labels = np.where(rng.random(length) < 0.6, np.roll(ids, -1), -100).astype(np.int32)
        labels[-1] = -100
        rows.append((ids, labels, np.array([length], dtype=np.int32)))
    return rows


def test_matches_hf_loss(tiny_model_dir):
    model = load(tiny_model_dir)
    rows = random_rows(3)
    batch = collate(rows, pad_id=0)
    loss_sum, n = causal_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1), ignore_index=-100,
                          reduction="sum")
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-4)
    assert int(n) == sum(int((r[1] != -100).sum()) for r in rows)


def test_packed_loss_equals_sum_of_samples_alone(tiny_model_dir):
    model = load(tiny_model_dir)
    rows = random_rows(3, seed=1)
    alone = sum(causal_lm_loss(model, collate([r], pad_id=0))[0] for r in rows)
    packed_row = (np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]),
                  np.array([len(r[0]) for r in rows], dtype=np.int32))
    packed, _ = causal_lm_loss(model, collate([packed_row], pad_id=0))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)


def grads_after(model, batches):
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _ = accumulate_gradients(LossModule(model, causal_lm_loss), batches, Parallel(), nullcontext(), scaler, 0)
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_four_micro_batches_give_the_gradient_of_one_batch_of_four(tiny_model_dir):
    model = load(tiny_model_dir)
    rows = random_rows(4, seed=2)  # rows of different lengths and target counts
    loss_one, g_one = grads_after(model, [(rows, False)])
    loss_four, g_four = grads_after(model, [([r], False) for r in rows])
    assert abs(loss_one - loss_four) < 1e-5
    for name in g_one:
        torch.testing.assert_close(g_four[name], g_one[name], rtol=1e-4, atol=1e-6)
    # the naive mean of per-micro-batch means is a different (wrong) gradient: the test can tell them apart
    model.zero_grad(set_to_none=True)
    naive = sum(causal_lm_loss(model, collate([r], 0))[0] / int((r[1] != -100).sum()) for r in rows) / 4
    naive.backward()
    w = "model.embed_tokens.weight"
    rel = (dict(model.named_parameters())[w].grad - g_one[w]).norm() / g_one[w].norm()
    assert rel > 0.05
