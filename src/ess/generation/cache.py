"""A KV cache that writes where it is told.

transformers' caches append (DynamicCache) or ignore the write position (StaticCache). ESS needs
to overwrite the [CLS] slot in place when [CLS] is re-evaluated, in the same forward pass as the
next token, and only for the rows being re-evaluated. So the generator sets, before each
forward, the slot each query row writes to and which (row, query) pairs may write; attention
then sees the whole buffer, and the 4D mask from `ess.masks` decides what each row reads.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, preallocated as [batch, kv_heads, capacity, head_dim]."""

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        shape = (batch, heads, self.cache.capacity, dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots, write = self.cache.slots, self.cache.write
        if write is not None:
            # Rows that must keep their old entry (e.g. a [CLS] slot not re-evaluated this step).
            keep = ~write[:, None, :, None]
            key_states = torch.where(keep, self.keys[:, :, slots], key_states)
            value_states = torch.where(keep, self.values[:, :, slots], value_states)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.capacity, 0

    def get_seq_length(self) -> int:
        return self.cache.capacity

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.slots: torch.Tensor | None = None
        self.write: torch.Tensor | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def target(self, slots: torch.Tensor, write: torch.Tensor | None = None) -> None:
        """Where the next forward writes: `slots` [q] for its q query rows, `write` [b, q] which may."""
        self.slots, self.write = slots, write

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` names, in its order (a row may be named more than once)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
