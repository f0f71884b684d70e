"""What ``train_one`` does differently under ``torchrun`` (DDP): a no-op in one process.

N processes train the run one process trains (``docs/training.md``, "Several processes"):

* the same global batch: ``per_rank_batch`` splits ``batch_size x grad_accum`` over the ranks
  (the accumulation when it divides, else the batch), so every optimizer step averages the
  gradient of the same examples (accelerate hands rank r the batches r, r + N, ... of the one
  sampler order, so a step's N shards are the one-process step's batch);
* the same optimizer steps, and warmup on that true count (``l3m.trainer.MultiTaskTrainer``);
* the same masks and MLM draws: keyed per example and batch slot (``l3m.masking.collator``), so
  rank-distinct and equal to one process's.

The HF Trainer initialises the process group when launched by torchrun; ``process_group`` starts
it earlier where a run needs the ranks to agree before the Trainer exists (rank 0 takes the
run's lock and decides, ``l3m.experiment.run_planned``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The launch's process count (torchrun's ``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def per_rank_batch(batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """(per-process batch, per-process accumulation) whose product over ``world`` processes is the
    configured global batch ``batch_size x grad_accum``; refused when it does not split."""
    if world <= 1:
        return batch_size, grad_accum
    if grad_accum % world == 0:
        return batch_size, grad_accum // world
    if batch_size % world == 0:
        return batch_size // world, grad_accum
    raise ValueError(f"training.batch_size {batch_size} x grad_accum {grad_accum} does not split over {world} "
                     f"processes (one of them must be a multiple of {world}); N processes train the one-process "
                     "run only with the same global batch")


def process_group() -> None:
    """Start torchrun's process group now (the Trainer reuses it), so ranks can agree early."""
    if world_size() > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():  # as accelerate does: one GPU per local rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (rank 0 writes a run's files; the others read them after this)."""
    if is_distributed():
        dist.barrier()


def summed(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a copy; ``t`` itself in one process)."""
    if not is_distributed():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(device, copy=True)
    dist.all_reduce(out)
    return out.cpu()
