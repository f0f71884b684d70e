"""META-TARTAN task weighting (Dery et al. 2021) as the L3Masking authors run it.

Task weights are a softmax over one logit per task (cls, mlm), starting equal. Per micro-batch:
each task's gradient w.r.t. every trainable parameter (``torch.autograd.grad``); a *dev head*
(a fresh classifier head fitted on dev rows with the encoder frozen, refitted once per
optimizer step) gives the dev gradient w.r.t. the encoder ("body"); each logit's gradient is
-cos(task body gradient, dev body gradient) / grad_accum; the parameters receive
sum_t w_t * g_t / grad_accum. After each optimizer step the logits take one SGD step of
``meta_lr``. The authors' code: scripts/alpha_generator.py (MetaWeighter) and
scripts/endtask_aware.py (learn_dev_head, classifier_sample_grad). Deviations from it are
listed in docs/training.md, "Loss weighting".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from l3m.config import WeightingSpec
from l3m.optim import head_param_names
from l3m.tuning.base import find_classifier
from l3m.weighting.base import TASKS, Collate, LossWeighting, register_weighting

STATE_FILE = "weighting.json"
# The authors' dev-head AdamW betas (run_mlm_auxiliary_PLT-Masking.py --classf_betas).
HEAD_BETAS = (0.9, 0.98)
_ENCODER_KEYS = ("input_ids", "attention_mask", "token_type_ids")

Grads = Sequence[torch.Tensor | None]


class DevHead(nn.Module):
    """The authors' dev head: first-token pooling, one tanh feed-forward layer, a linear output."""

    def __init__(self, hidden: int, num_labels: int, generator: torch.Generator, std: float = 0.02) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_labels)
        with torch.no_grad():
            for layer in (self.dense, self.out):
                layer.weight.normal_(0.0, std, generator=generator)
                layer.bias.zero_()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(pooled)))


def cosine(a: Grads, b: Grads) -> float:
    """Cosine of two gradients given as aligned tensor lists (``None`` = no gradient there).

    0 when either is all zero (e.g. a micro-batch with no masked token): the authors' formula
    would divide by zero there.
    """
    dot = na = nb = 0.0
    for x, y in zip(a, b, strict=True):
        if x is not None:
            na += float(x.double().pow(2).sum())
        if y is not None:
            nb += float(y.double().pow(2).sum())
        if x is not None and y is not None:
            dot += float((x.double() * y.double()).sum())
    return 0.0 if na == 0.0 or nb == 0.0 else dot / (na**0.5 * nb**0.5)


def body_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The body whose task and dev gradients are compared: the encoder's trainable parameters
    minus the classification head's.

    The authors' body is their ``_text_field_embedder`` (scripts/utils.py ``get_body_end``), the
    pretrained encoder; their head (first-token pooler + feed-forward) is outside it. In a
    BERT-family classifier the head's dense+tanh is the base model's ``pooler``
    (``l3m.optim.head_param_names``): counted in the body it would add a classification-only
    gradient that the dev gradient (read from the last hidden state) never has, deflating
    cos(cls, dev).
    """
    head = head_param_names(model)
    head_ids = {id(p) for n, p in model.named_parameters() if n in head}
    encoder = find_classifier(model).base_model
    return [p for p in encoder.parameters() if p.requires_grad and id(p) not in head_ids]


class MetaTartan(LossWeighting):
    needs_task_grads = True

    def __init__(self, spec: WeightingSpec, mlm_weight: float, seed: int) -> None:
        super().__init__(spec, mlm_weight, seed)
        self.logits = torch.zeros(len(TASKS), dtype=torch.float64)
        self.logit_grad = torch.zeros(len(TASKS), dtype=torch.float64)
        # Dev rows and head inits come from this generator, not the global RNG, so they are
        # reproducible from the run seed and leave the training's own random stream alone.
        self.generator = torch.Generator().manual_seed(seed)
        self.dev: Any = None
        self.collate: Collate | None = None
        self.head: DevHead | None = None
        self._step: dict[str, Any] = self._fresh_step()
        self._params: tuple[nn.Module, list[nn.Parameter], list[int]] | None = None

    @staticmethod
    def _fresh_step() -> dict[str, Any]:
        return {"cos": {t: [] for t in TASKS}, "head_loss": None, "head_iters": 0}

    # ------------------------------------------------------------------ weights and update

    def weights(self) -> dict[str, float]:
        return dict(zip(TASKS, torch.softmax(self.logits, 0).tolist(), strict=True))

    def update(self, step: int) -> None:
        """After an optimizer step: log the step, one SGD step on the logits, drop the dev head."""
        cos = {t: sum(v) / len(v) if v else None for t, v in self._step["cos"].items()}
        row: dict[str, Any] = {"step": step}
        row.update({f"weight_{t}": w for t, w in self.weights().items()})
        row.update({f"cos_{t}": c for t, c in cos.items()})
        row.update({"dev_head_loss": self._step["head_loss"], "dev_head_iters": self._step["head_iters"]})
        self.log.append(row)
        self.logits -= self.spec.meta_lr * self.logit_grad
        self.logit_grad.zero_()
        # The authors refit the dev head after every step: the encoder under it has changed.
        self.head = None
        self._step = self._fresh_step()

    # ------------------------------------------------------------------ dev data

    def prepare(self, dev: Any, collate: Collate) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("weighting.kind=meta_tartan runs in one process only (the task-weight update is not "
                             f"synchronised across the {dist.get_world_size()} ranks); use weighting.kind=fixed "
                             "under torchrun")
        if len(dev) == 0:
            raise ValueError("weighting.kind=meta_tartan needs a non-empty dev split to fit its dev head")
        self.dev, self.collate = dev, collate

    def _dev_batch(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``n`` dev rows, without replacement when the split has that many (as the authors' np.random.choice)."""
        if self.dev is None or self.collate is None:
            raise RuntimeError("MetaTartan.prepare(dev, collate) must run before training")
        size = len(self.dev)
        idx = (torch.randperm(size, generator=self.generator)[:n] if size >= n
               else torch.randint(size, (n,), generator=self.generator))
        batch = self.collate([self.dev[i] for i in idx.tolist()])
        return {k: v.to(device) for k, v in batch.items() if k in (*_ENCODER_KEYS, "labels")}

    @staticmethod
    def _pooled(encoder: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return encoder(**{k: v for k, v in batch.items() if k in _ENCODER_KEYS})[0][:, 0].float()

    def _fit_head(self, encoder: nn.Module, num_labels: int, device: torch.device,
                  ctx: Callable[[], AbstractContextManager[Any]]) -> DevHead:
        batch = self._dev_batch(self.spec.dev_samples, device)
        # Encoder features computed once per fit (the body is frozen while the head learns)
        # instead of one encoder pass per head iteration as in the authors' code.
        with torch.no_grad(), ctx():
            pooled = self._pooled(encoder, batch)
        head = DevHead(pooled.shape[-1], num_labels, self.generator).to(device)
        opt = torch.optim.AdamW(head.parameters(), lr=self.spec.head_lr, weight_decay=self.spec.head_weight_decay,
                                betas=HEAD_BETAS)
        prev = float("inf")
        for i in range(self.spec.head_iters):
            loss = F.cross_entropy(head(pooled), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = loss.item()
            self._step.update(head_loss=value, head_iters=i + 1)
            if abs(value - prev) < self.spec.head_tol:
                break
            prev = value
        head.zero_grad(set_to_none=True)
        head.requires_grad_(False)
        return head

    # ------------------------------------------------------------------ one micro-batch

    def dev_gradient(self, encoder: nn.Module, body: list[nn.Parameter], num_labels: int,
                     ctx: Callable[[], AbstractContextManager[Any]]) -> Grads:
        """The dev head's loss gradient w.r.t. the body on a fresh dev batch (head fitted once per step)."""
        device = body[0].device
        if self.head is None:
            self.head = self._fit_head(encoder, num_labels, device, ctx)
        dev = self._dev_batch(self.spec.dev_batch_size, device)
        with ctx():
            pooled = self._pooled(encoder, dev)
        # The head runs in float32, as when it was fitted.
        dev_loss = F.cross_entropy(self.head(pooled), dev["labels"])
        return torch.autograd.grad(dev_loss, body, allow_unused=True)

    def _layout(self, model: nn.Module) -> tuple[list[nn.Parameter], list[int]]:
        """The trainable parameters and the body's places among them: fixed while a model trains,
        so found once per model, not per micro-batch."""
        if self._params is None or self._params[0] is not model:
            params = [p for p in model.parameters() if p.requires_grad]
            body_ids = {id(p) for p in body_parameters(model)}
            self._params = (model, params, [i for i, p in enumerate(params) if id(p) in body_ids])
        return self._params[1], self._params[2]

    def accumulate(self, model: nn.Module, inputs: dict[str, Any], accum: int,
                   ctx: Callable[[], AbstractContextManager[Any]]) -> torch.Tensor:
        clf = find_classifier(model)
        encoder = clf.base_model
        params, body_at = self._layout(model)
        if not body_at:
            raise ValueError("weighting.kind=meta_tartan compares gradients on the encoder, but no encoder "
                             "parameter is trainable under this tuner")
        task_losses = getattr(model, "task_losses", None)
        if task_losses is None:
            raise TypeError(f"weighting.kind=meta_tartan needs the multi-task model (l3m.modeling), got {type(model).__name__}")
        with ctx():
            losses, _ = task_losses(**inputs)
        if "cls" not in losses:
            raise ValueError("weighting.kind=meta_tartan needs labelled train batches (no classification loss)")
        # The task graphs may share intermediates (a shared encoder module's cached weights), so
        # each but the last is kept until the next task's gradient is taken.
        last = len(losses) - 1
        grads = {t: torch.autograd.grad(loss, params, allow_unused=True, retain_graph=k < last)
                 for k, (t, loss) in enumerate(losses.items())}

        dev_grad = self.dev_gradient(encoder, [params[i] for i in body_at], int(clf.config.num_labels or 0), ctx)

        w = self.weights()
        for k, t in enumerate(TASKS):
            if t in grads:
                c = cosine([grads[t][i] for i in body_at], dev_grad)
                self._step["cos"][t].append(c)
                self.logit_grad[k] -= c / accum
        with torch.no_grad():
            for t, gs in grads.items():
                for p, g in zip(params, gs, strict=True):
                    if g is None:
                        continue
                    add = g.to(p.dtype) * (w[t] / accum)
                    p.grad = add if p.grad is None else p.grad.add_(add)
        return (self.combine({t: v.detach() for t, v in losses.items()}) / accum).detach()

    # ------------------------------------------------------------------ trainer hooks

    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.tolist(), "generator": self.generator.get_state().tolist(), "log": self.log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.logits = torch.tensor(state["logits"], dtype=torch.float64)
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.log = list(state["log"])

    def callbacks(self) -> list[TrainerCallback]:
        return [MetaTartanCallback(self)]


class MetaTartanCallback(TrainerCallback):
    """Update the weights after each optimizer step; keep their state in checkpoints for resumes."""

    def __init__(self, weighting: MetaTartan) -> None:
        self.weighting = weighting

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.weighting.update(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            (ckpt / STATE_FILE).write_text(json.dumps(self.weighting.state_dict()))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # A resumed run: the Trainer has restored state.global_step from this checkpoint.
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if state.global_step > 0 and saved.exists():
            self.weighting.load_state_dict(json.loads(saved.read_text()))

    # l3m.trainer.StageStateful: a finished stage that is replayed keeps its weights' history.
    def save_stage(self, stage_dir: Path) -> None:
        (stage_dir / STATE_FILE).write_text(json.dumps(self.weighting.state_dict()))

    def restore_stage(self, stage_dir: Path) -> None:
        saved = stage_dir / STATE_FILE
        if saved.exists():
            self.weighting.load_state_dict(json.loads(saved.read_text()))


register_weighting("meta_tartan", MetaTartan)
