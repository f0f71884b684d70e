"""Bit-packing of binary weight masks: one bit per weight (np.packbits, big-endian bit order).

A BERT-base weight mask of ~85M entries packs into ~10.6 MB, vs 340 MB for the fp32 weights
it selects from -- the storage argument of Zhao et al. (2020).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor of any shape -> uint8 tensor of ceil(numel / 8) bytes (row-major order)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    bits = mask.detach().to("cpu").contiguous().numpy().reshape(-1)
    return torch.from_numpy(np.packbits(bits))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | list[int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`; ``shape`` is needed because the last byte is zero-padded."""
    count = math.prod(shape)
    if packed.numel() != (count + 7) // 8:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold a mask of shape {tuple(shape)}")
    bits = np.unpackbits(packed.to("cpu").numpy().astype(np.uint8, copy=False), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))
