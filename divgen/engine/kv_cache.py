"""The slot-based static KV cache: allocated once per engine, one slot per decode row.

    cache = KVCache(layers, slots, kv_heads, max_len, head_dim, dtype, device)
    cache.k, cache.v      # [layers, slots, kv_heads, max_len, head_dim]

A slot holds one row's keys and values at positions [0, length). Lengths live with the decode
state (``pos``, one per slot) on the device, so nothing here is read on the host during a step.
A slot is reused by writing a new prompt over it from position 0; decode attention masks every
position at or beyond the slot's length, so stale values of the previous row are never read.
Buffers of an ``nn.Module``: a compiled step sees them as static (CUDA graphs keep their address).
"""
from __future__ import annotations

import torch
from torch import nn

from divgen.engine.errors import DivgenError


class KVCache(nn.Module):
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.slots, self.max_len = slots, max_len

    def check_fits(self, prompt_len: int, max_new_tokens: int, group_rows: int = 1) -> None:
        """Raise one clear error when a request cannot fit, naming the knob to raise."""
        if prompt_len + max_new_tokens > self.max_len:
            raise DivgenError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) does not fit the KV cache "
                f"of {self.max_len} positions: raise max_len to at least {prompt_len + max_new_tokens} "
                "or lower max_new_tokens")
        if group_rows > self.slots:
            raise DivgenError(
                f"a guidance group of {group_rows} rows does not fit {self.slots} KV slots: raise the batch size "
                f"(max_batch_rows / --batch-rows) to at least {group_rows}")
