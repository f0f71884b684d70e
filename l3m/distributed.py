"""What ``train_one`` does differently under ``torchrun`` (DDP): a no-op in one process.

The HF Trainer initialises the process group when launched by torchrun; these helpers only
act when it exists, so the same code runs in one process and in N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from l3m.masking.collator import MaskingStats


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (rank 0 writes a run's files; the others read them after this)."""
    if is_distributed():
        dist.barrier()


def summed_over_ranks(stats: MaskingStats) -> MaskingStats:
    """The masking counts of all ranks (each rank collates only its share of the batches)."""
    if not is_distributed():
        return stats
    t = torch.tensor([stats.content_tokens, stats.selected_tokens, stats.expected_selected], dtype=torch.float64)
    dist.all_reduce(t)
    return MaskingStats(int(t[0]), int(t[1]), float(t[2]))
