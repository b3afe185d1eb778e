"""The static KV cache: one preallocated [slots, kv_heads, positions, head_dim] tensor pair per layer.

A sequence owns a slot from admission to retirement; its keys and values are written in place at
its positions, so nothing is reallocated or copied while the engine runs and a decode step has
fixed shapes (what CUDA graphs need). One extra position past ``max_seq`` is a scratch row: the
idle rows of a decode bucket write there, never into a live sequence's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.errors import InputError


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take across all layers (the one formula llmopt uses)."""
    return 2 * n_layers * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    max_batch: int
    max_seq: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, self.dtype)

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.max_batch * (self.max_seq + 1)


class KVCache:
    def __init__(self, shape: CacheShape, device: torch.device) -> None:
        self.shape = shape
        dims = (shape.max_batch, shape.n_kv_heads, shape.max_seq + 1, shape.head_dim)
        self.keys = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.n_layers)]
        self.values = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.n_layers)]

    @property
    def scratch_position(self) -> int:
        return self.shape.max_seq

    def layer(self, index: int, slot_start: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's cache for slots slot_start..slot_start+rows-1."""
        end = slot_start + rows
        return self.keys[index][slot_start:end], self.values[index][slot_start:end]


def fit_max_batch(per_token_bytes: int, max_seq: int, free_bytes: int, reserve_fraction: float = 0.1) -> int:
    """How many sequences of ``max_seq`` tokens fit in the free memory, keeping a reserve for
    activations and graphs; used when the user asks the cache to fill the device."""
    usable = int(free_bytes * (1.0 - reserve_fraction))
    per_sequence = per_token_bytes * (max_seq + 1)
    batch = usable // per_sequence
    if batch < 1:
        raise InputError(
            f"A single sequence of {max_seq} tokens needs {per_sequence / 2**30:.2f} GiB of KV cache "
            f"but only {usable / 2**30:.2f} GiB is free. Lower --max-seq."
        )
    return int(batch)
