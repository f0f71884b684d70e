"""The LossWeighting interface and its registry (in the style of ``l3m.masking`` / ``l3m.tuning``).

A weighting decides how the classification and MLM losses of a multi-task run combine. It
never owns the training loop; ``l3m.trainer.MultiTaskTrainer`` hands it each micro-batch when
``needs_task_grads`` is set, and the stock Trainer path (the model's own fixed-lambda loss)
runs otherwise. Hooks:

1. ``prepare(dev, collate)``: the encoded dev split and the clean collator, for weightings
   that measure agreement with the end task on dev data;
2. ``accumulate(model, inputs, accum, ctx)``: one micro-batch: add the weighted gradients to
   ``p.grad`` and return the (weighted, accumulation-scaled) loss for logging;
3. ``callbacks()``: TrainerCallbacks, e.g. the weight update after each optimizer step;
4. ``log``: one row per optimizer step (weights and diagnostics), written by ``l3m.weighting.report``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import TrainerCallback

from l3m.config import WeightingSpec
from l3m.plugins import Registry

# The two tasks of a multi-task run, in the order weights and logits are kept.
TASKS = ("cls", "mlm")
Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


class LossWeighting:
    """Fixed-weight semantics; subclasses override what they change."""

    kind: ClassVar[str] = ""
    # True: the trainer delegates each micro-batch to ``accumulate`` instead of backpropagating
    # the model's own loss.
    needs_task_grads: ClassVar[bool] = False

    def __init__(self, spec: WeightingSpec, mlm_weight: float, seed: int) -> None:
        self.spec = spec
        self.mlm_weight = mlm_weight
        self.seed = seed
        self.log: list[dict[str, Any]] = []

    def weights(self) -> dict[str, float]:
        """The current weight of each task's loss."""
        return {"cls": 1.0, "mlm": self.mlm_weight}

    def combine(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_t w_t * L_t over the tasks present (a run without MLM inputs has only ``cls``)."""
        w = self.weights()
        total = w["cls"] * losses["cls"]
        if "mlm" in losses:
            total = total + w["mlm"] * losses["mlm"]
        return total

    def prepare(self, dev: Any, collate: Collate) -> None:
        """Receive the encoded dev split and its collator (unused by fixed weights)."""

    def accumulate(self, model: nn.Module, inputs: dict[str, Any], accum: int,
                   ctx: Callable[[], AbstractContextManager[Any]]) -> torch.Tensor:
        raise NotImplementedError(f"weighting {self.kind!r} trains through the model's own loss")

    def callbacks(self) -> list[TrainerCallback]:
        return []


_REGISTRY: Registry[LossWeighting] = Registry("loss weighting")


def register_weighting(kind: str, cls: type[LossWeighting]) -> type[LossWeighting]:
    """Register ``cls`` under ``kind`` (a ``WeightingSpec.kind`` value); returns ``cls``."""
    return _REGISTRY.register(kind, cls)


def build_weighting(spec: WeightingSpec, mlm_weight: float, seed: int) -> LossWeighting:
    return _REGISTRY.get(spec.kind)(spec, mlm_weight, seed)


def registered_weightings() -> list[str]:
    return _REGISTRY.kinds()
