"""Child-Tuning_F (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"), task-free.

At every optimizer step each gradient element is kept with probability p and the kept ones are
scaled by 1/p (w <- w - lr * (g * M / p), M ~ Bernoulli(p)), so the expected gradient is
unchanged while each step updates a random "child network".

Where it plugs in: ``on_pre_optimizer_step``, which transformers' Trainer calls after gradient
clipping and before ``optimizer.step()``. The authors' ``ChildTuningAdamW`` drew the mask inside
``step()`` -- also after the Trainer's clipping -- so the order clip -> mask -> Adam is the same.
Scope: the authors' optimizer applies the F mask to *every* parameter it holds (embeddings,
encoder layers and classifier alike; only Child-Tuning_D restricts to names containing
"layer"), and so do we: every trainable parameter of the classifier. An auxiliary MLM head
(l3m's multi-task model) is not part of the network the authors tuned, and its gradients are
left unmasked, for every family. ``spec.scope`` is a Child-Tuning_D setting.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from l3m.tuning.base import FisherBatches, Tuner, classifier_parameters, register_tuner


@torch.no_grad()
def bernoulli_mask_gradients(params: list[nn.Parameter], p: float) -> None:
    """In place: grad <- grad * M / p with a fresh M ~ Bernoulli(p) per element."""
    if p >= 1.0:
        return  # keeping everything: the mask is all ones and the scale 1
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        # Drop where U >= p (probability 1 - p). rand_like + masked_fill_ is ~1.5x faster on CPU
        # than bernoulli_ + mul_; it draws from the default generator of grad's device, which
        # the Trainer seeds (args.seed), so a run is reproducible without a generator of our own.
        grad.masked_fill_(torch.rand_like(grad) >= p, 0.0).div_(p)


class ChildFCallback(TrainerCallback):
    def __init__(self, params: list[nn.Parameter] | None, p: float) -> None:
        self.params = params
        self.p = p

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        params = self.params
        if params is None:  # prepare() was not called: the classifier of the model the Trainer trains
            params = classifier_parameters(kwargs["model"])
        bernoulli_mask_gradients(params, self.p)


class ChildFTuner(Tuner):
    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._params: list[nn.Parameter] | None = None

    def prepare(self, model: nn.Module, fisher_batches: FisherBatches | None = None) -> nn.Module:
        self._params = classifier_parameters(model)
        return model

    def callbacks(self) -> list[TrainerCallback]:
        return [ChildFCallback(self._params, self.spec.reserve_p)]


register_tuner("child_f", ChildFTuner)
