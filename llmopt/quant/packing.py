"""Dense little-endian packing of int8/int4 values into int32 words, as compressed-tensors'
``pack-quantized`` format stores them: value + 2**(bits-1) as unsigned, element i at bit i*bits.

Written here (not imported) so that loading needs no compressed-tensors install; a test checks
byte equality with compressed-tensors' own ``pack_to_int32``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-bit values (int8 tensor, (rows, cols)) along dim 1 into int32 words."""
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit packing is supported, not {bits}")
    rows, cols = q.shape
    per_word = 32 // bits
    words = -(-cols // per_word)
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    u = F.pad(u, (0, words * per_word - cols))
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u.contiguous().reshape(-1).view(torch.int32).reshape(rows, words)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int32 words (rows, words) → signed int8 values (rows, cols)."""
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit packing is supported, not {bits}")
    rows = packed.shape[0]
    u = packed.contiguous().reshape(-1).view(torch.uint8).reshape(rows, -1)
    if bits == 4:
        u = torch.stack([u & 0xF, u >> 4], dim=-1).reshape(rows, -1)
    return (u[:, :cols].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
