"""Child-Tuning_D (Xu et al., EMNLP 2021), task-driven: update only a Fisher-selected child network.

Before training, the Fisher information of each weight is estimated on the training data,
F(w) = 1/|D| * sum_j (dL(x_j, y_j)/dw)^2, and the top ``reserve_p`` fraction of weights under
one global threshold form the child network. For the whole run the gradients of all other
weights in the scope are zeroed.

Scope, as in the authors' code (``'layer' in name``): the Fisher selection covers trainable
parameters of the encoder's layer stack whose name contains ``spec.scope`` (``scoped_parameters``:
the layer list of every family, never an MLM head's ``layer_norm``), while embeddings and heads
are outside the selection and update normally.

Deviations of the authors' code (AliceMind/ChildTuning/ChildTuningD.py) from the paper, and
what is followed here (docs/tuning.md has the table):

* Fisher per mini-batch, not per example: they square the gradient of the *batch-mean* loss
  and average over batches. We follow the paper by default (``per_example=True``: one backward
  per training example, padding trimmed); ``per_example=False`` gives their estimate.
  With an auxiliary MLM, an "example" is a classification row plus its share of MLM rows.
* They clip each parameter's gradient to ``max_grad_norm`` before squaring. Not done here.
* Weight decay: their optimizer applies decoupled weight decay to every parameter, so weights
  outside the child network still shrink by (1 - lr*wd) each step. The paper's update rule
  leaves them unchanged, and so do we: their values are restored after every optimizer step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from l3m.config import TunerSpec
from l3m.tuning.base import FisherBatches, Tuner, register_tuner, scoped_parameters

log = logging.getLogger(__name__)


def _lead(batch: dict[str, Any], keys: list[str], prefix: str) -> torch.Tensor:
    lead = batch.get(prefix + "input_ids")
    if isinstance(lead, torch.Tensor):
        return lead
    return next(batch[k] for k in keys if isinstance(batch[k], torch.Tensor) and batch[k].dim() > 0)


def split_examples(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One-example units from a collated batch, trailing padding trimmed (for speed only).

    Tensors whose first dimension is the batch size B are sliced to row i. A separate MLM batch
    (``mlm_*`` keys with their own ``mlm_attention_mask``, e.g. labelled texts plus texts drawn
    from an unlabelled pool) has its own row count B': unit i takes its rows i, i+B, i+2B, ...,
    so each row lands in exactly one unit. Columns after the last attended position of the
    unit's rows are cut (with right padding: the example's own length; left padding: none).
    """
    own_mlm = isinstance(batch.get("mlm_attention_mask"), torch.Tensor)
    families: dict[str, list[str]] = {"": [], "mlm_": []}
    for key in batch:
        families["mlm_" if own_mlm and key.startswith("mlm_") else ""].append(key)
    size = _lead(batch, families[""], "").shape[0]
    for i in range(size):
        unit: dict[str, Any] = {}
        for prefix, keys in families.items():
            if not keys:
                continue
            rows_total = _lead(batch, keys, prefix).shape[0]
            rows = torch.arange(i, rows_total, size)
            mask = batch.get(prefix + "attention_mask")
            keep = None
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                attended = mask[rows].bool().any(0).nonzero()
                keep = int(attended.max()) + 1 if attended.numel() else None
            for key in keys:
                value = batch[key]
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows_total:
                    value = value[rows]
                    if keep is not None and mask is not None and value.dim() > 1 and value.shape[1] == mask.shape[1]:
                        value = value[:, :keep]
                unit[key] = value
        yield unit


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def estimate_fisher(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterable[dict[str, Any]],
    per_example: bool = True,
) -> list[torch.Tensor]:
    """Mean squared gradient of ``model(**batch).loss`` for each of ``params`` (fp32).

    Run in train mode (dropout on), as the authors do. Parameters outside ``params`` have
    ``requires_grad`` switched off meanwhile, so backward skips e.g. the embedding-matrix
    gradient; their flags are restored afterwards.
    """
    chosen = {id(p) for p in params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    was_training = model.training
    device = params[0].device
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    used = skipped = 0
    try:
        for p in others:
            p.requires_grad_(False)
        model.train()
        for batch in batches:
            for unit in split_examples(batch) if per_example else [batch]:
                for p in params:
                    p.grad = None
                loss = model(**_to(unit, device)).loss
                if not torch.isfinite(loss):
                    # e.g. an auxiliary MLM loss over an example with no selected token (0/0)
                    skipped += 1
                    continue
                loss.backward()
                for acc, p in zip(sums, params, strict=True):
                    if p.grad is not None:
                        acc.addcmul_(p.grad, p.grad)
                used += 1
    finally:
        for p in others:
            p.requires_grad_(True)
        for p in params:
            p.grad = None
        model.train(was_training)
    if used == 0:
        raise ValueError(f"Fisher estimation saw no finite loss ({skipped} units skipped)")
    if skipped:
        log.warning("Fisher estimation skipped %d of %d units with a non-finite loss", skipped, used + skipped)
    return [s.div_(used) for s in sums]


def select_child(fisher: list[torch.Tensor], reserve_p: float) -> tuple[list[torch.Tensor], float]:
    """Boolean masks of the top ``reserve_p`` fraction under one global threshold (Xu et al. 2021).

    Like the authors (``F >= percentile``), ties at the threshold are all kept, so the realised
    fraction can exceed ``reserve_p`` slightly when many scores are equal.
    """
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = max(1, min(flat.numel(), round(reserve_p * flat.numel())))
    threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values  # the keep-th largest value
    return [f >= threshold for f in fisher], float(threshold)


class ChildDCallback(TrainerCallback):
    """Zero non-child gradients before the step; restore non-child values after it.

    Masking the gradient keeps AdamW's moments of non-child weights at exactly zero (so their
    Adam update is 0), and the restore undoes the decoupled weight decay, which AdamW applies
    regardless of the gradient.
    """

    def __init__(self, params: list[nn.Parameter], masks: list[torch.Tensor]) -> None:
        self.params = params
        self.masks = masks
        self.frozen_out = [~m for m in masks]
        # Only the non-child entries are kept (1 - reserve_p of the scope), not a full copy.
        self.frozen_values = [p.detach()[f].clone() for p, f in zip(params, self.frozen_out, strict=True)]

    @torch.no_grad()
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer moves the model to its device after prepare(): follow the parameters there.
        self.masks = [m.to(p.device) for p, m in zip(self.params, self.masks, strict=True)]
        self.frozen_out = [f.to(p.device) for p, f in zip(self.params, self.frozen_out, strict=True)]
        self.frozen_values = [v.to(p.device) for p, v in zip(self.params, self.frozen_values, strict=True)]

    @torch.no_grad()
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for p, m in zip(self.params, self.masks, strict=True):
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for p, f, v in zip(self.params, self.frozen_out, self.frozen_values, strict=True):
            p.data.masked_scatter_(f, v)


class ChildDTuner(Tuner):
    def __init__(self, spec: TunerSpec, per_example: bool = True) -> None:
        super().__init__(spec)
        self.per_example = per_example
        self._params: list[nn.Parameter] = []
        self._names: list[str] = []
        self._masks: list[torch.Tensor] = []
        self.threshold: float | None = None
        self.child_fraction: float | None = None  # realised share of the scope that trains

    def prepare(self, model: nn.Module, fisher_batches: FisherBatches | None = None) -> nn.Module:
        if fisher_batches is None:
            raise ValueError("child_d needs fisher_batches to estimate Fisher information")
        named = list(scoped_parameters(model, self.spec.scope))
        if not named:
            raise ValueError(f"no trainable encoder-layer parameter name contains scope {self.spec.scope!r}")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if torch.cuda.is_available():  # the Fisher pass is a full backward per example: use the GPU
            model.to("cuda")
        fisher = estimate_fisher(model, self._params, fisher_batches(), self.per_example)
        self._masks, self.threshold = select_child(fisher, self.spec.reserve_p)
        kept = sum(int(m.sum()) for m in self._masks)
        self.child_fraction = kept / sum(m.numel() for m in self._masks)
        log.info("child_d: %d of scope %r parameters in the child network (%.3f)", kept, self.spec.scope,
                 self.child_fraction)
        return model

    def child_masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> boolean mask of the child network (True = trained)."""
        return dict(zip(self._names, self._masks, strict=True))

    def callbacks(self) -> list[TrainerCallback]:
        if not self._masks:
            raise RuntimeError("child_d: call prepare() before callbacks()")
        return [ChildDCallback(self._params, self._masks)]


register_tuner("child_d", ChildDTuner)
