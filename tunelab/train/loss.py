"""The training loss, computed by one function that a fused kernel can replace.

Labels arrive already shifted (labels[t] is the target after position t, or -100). The decoder runs once;
the output head and cross-entropy run only on positions that have a target, which skips the (large) vocabulary
projection for prompt and padding tokens. The function returns the *sum* of token losses and the token count,
so gradient accumulation can weight every token in the accumulated batch equally.

`LossModule` holds the model and the loss function: it is what DDP wraps and what FSDP shards as its root, so
the decoder and the head run inside the root's forward, where a sharded run has gathered their parameters. Under
CUDA graphs with flex attention it also builds the attention mask (model/block_mask.py), in tensors that keep
their addresses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.encode import IGNORE
from tunelab.model.block_mask import StaticBlockMask

LossFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]

# Models whose logits are exactly `lm_head(final hidden state)`; others go through the full forward.
_PLAIN_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LossModule(torch.nn.Module):
    """Model + loss in one module: one forward pass that DDP and FSDP see whole."""

    def __init__(self, model: Any, loss_fn: LossFn, block_mask: Callable[[torch.Tensor], Any] | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.block_mask = block_mask

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.block_mask is not None:
            batch = {**batch, "attention_mask": self.block_mask(batch["position_ids"])}
        return self.loss_fn(self.model, batch)


def split_decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    decoder = getattr(base, "model", None)
    cfg = base.config
    if decoder is None or not isinstance(head, torch.nn.Linear):
        return None
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _PLAIN_HEAD_ATTRS):
        return None
    return decoder, head


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over target tokens, number of target tokens)."""
    labels = batch["labels"]
    parts = split_decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch.get("attention_mask"), use_cache=False).logits
        flat = labels.reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=IGNORE,
                               reduction="sum")
        return loss, (flat != IGNORE).sum()
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
    h, targets = _target_hidden(hidden, batch)
    logits = head(h).float()
    return F.cross_entropy(logits, targets, reduction="sum"), targets.new_tensor(targets.numel())


def _target_hidden(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at target positions, gathered by an index computed on the CPU (no device sync)."""
    if "target_index" in batch:
        return hidden.reshape(-1, hidden.size(-1)).index_select(0, batch["target_index"]), batch["targets"]
    keep = batch["labels"] != IGNORE
    return hidden[keep], batch["labels"][keep]


def liger_causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract, with Liger's fused linear cross-entropy: the logits are never materialised whole."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    parts = split_decoder_and_head(model)
    if parts is None:
        return causal_lm_loss(model, batch)
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
    h, targets = _target_hidden(hidden, batch)
    loss = liger_fused_linear_cross_entropy(h, head.weight, targets, head.bias, ignore_index=IGNORE,
                                            reduction="sum", chunk_mem_const=_chunk_budget(h, head.weight))
    return loss, targets.new_tensor(targets.numel())


def _chunk_budget(h: torch.Tensor, weight: torch.Tensor, rows: int = 2048) -> int:
    """Liger computes the logits a chunk of rows at a time, chunks sized so that the transient logits stay near
    chunk_mem_const x the input's size. Its default (1) gives 64-row chunks for a 4096-token micro-batch and a
    92k vocabulary: 39 passes over the output head's weight. Aim for chunks of about `rows` rows instead (a few
    hundred MB of logits); long rows keep the default, which already gives large chunks."""
    vocab, hidden = weight.shape
    return max(1, (vocab * rows) // max(1, h.shape[0] * hidden))


def choose_loss(use_liger: bool, device: torch.device) -> LossFn:
    if use_liger and device.type == "cuda":
        return liger_causal_lm_loss
    return causal_lm_loss


def loss_module_for(model: Any, plan: Any, device: torch.device) -> LossModule:
    """The loss module a speed plan (model.kernels.SpeedPlan) asks for: Liger's fused loss where planned, and
    tunelab's own block mask where CUDA graphs replay flex attention."""
    return LossModule(model, choose_loss(plan.liger_loss, device), StaticBlockMask() if plan.static_mask else None)
