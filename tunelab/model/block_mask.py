"""Flex attention's block mask for packed rows, kept in the same tensors from one micro-batch to the next.

transformers builds a new BlockMask for every forward, in tensors at new addresses. Compiled layers under CUDA
graphs take those tensors as inputs whose addresses are part of the recording, so every new set of addresses
records the graphs again (BENCHMARKS.md, note (l)): with flex attention, CUDA graphs never replayed through
`tunelab train`. `StaticBlockMask` copies each micro-batch's document ids and block tables into the tensors of
one BlockMask object, built once per shape of micro-batch, and the model receives that object as a prepared
mask (which transformers passes through unchanged). The mask is the one transformers builds from packed position ids:
causal, and a token sees only its own document (a document starts wherever the position does not go up by one).
"""

from __future__ import annotations

from typing import Any

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(rows, tokens) -> the index of each token's document within its row; computed on the device, no sync."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def supports_static_mask(config: Any) -> bool:
    """Only plain causal attention in every layer: a sliding window, chunked attention or mixed layer types need
    transformers' own masks. Multimodal models keep these settings in their text model's config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (config, text):
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
            return False
        if getattr(cfg, "attention_chunk_size", None):
            return False
        types = getattr(cfg, "layer_types", None)
        if types and any(t != "full_attention" for t in types):
            return False
    return True


class StaticBlockMask:
    """Call with a micro-batch's position ids (on the device): returns, for each shape of micro-batch, the same
    BlockMask object every time, its tensors refilled in place. One mask per shape: an epoch's last micro-batch may
    hold fewer rows, and the next epoch's first full one finds its own mask (and its recorded graphs) again."""

    def __init__(self) -> None:
        self.masks: dict[tuple[Any, ...], tuple[torch.Tensor, Any]] = {}

    def __call__(self, position_ids: torch.Tensor) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        docs = document_ids(position_ids)
        rows, width = docs.shape
        compile_mask = docs.device.type == "cuda"  # compiled, the dense mask is never materialised
        key = (rows, width, str(docs.device))
        if key not in self.masks:
            kept_docs = docs.clone()
            mask = create_block_mask(_document_causal(kept_docs), rows, None, width, width, device=docs.device,
                                     _compile=compile_mask)
            self.masks[key] = (kept_docs, mask)
            return mask
        kept_docs, mask = self.masks[key]
        kept_docs.copy_(docs)  # the mask function reads this tensor: its address stays the same
        fresh = create_block_mask(mask.mask_mod, rows, None, width, width, device=docs.device,
                                  _compile=compile_mask)
        for name, value in vars(fresh).items():
            if not isinstance(value, torch.Tensor):
                continue
            kept = getattr(mask, name, None)
            if not isinstance(kept, torch.Tensor) or kept.shape != value.shape:
                self.masks[key] = (kept_docs, fresh)  # a table in a new shape: new addresses, recorded once more
                return fresh
            kept.copy_(value)
        return mask


def _document_causal(docs: torch.Tensor) -> Any:
    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    return mask_mod
