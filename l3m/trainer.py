"""The Trainer subclass and callbacks one run uses (``l3m.train.train_one`` assembles them).

* ``MultiTaskTrainer``: a training step that defers to a loss weighting needing per-task
  gradients (``l3m.weighting``); evaluation with a clean (``none``) collator, so masking draws never
  depend on the eval schedule; checkpoints of the multi-task module saved with shared tensors
  de-duplicated (encoder and tied decoder appear under two names).
* ``StepTimer`` (wall time per optimizer step), ``MaskingEpoch`` (the epoch the collator keys its
  per-example draws on), ``LossParts`` (classification and MLM losses in the logs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from l3m.masking import MaskingCollator
from l3m.modeling import alias_names
from l3m.weighting import LossWeighting


class MultiTaskTrainer(Trainer):
    """Trainer with a clean eval collator and shared-tensor-safe checkpoints."""

    def __init__(self, *args: Any, eval_collator: Any = None, weighting: LossWeighting | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.weighting = weighting

    # --- loss weighting (l3m.weighting) ---
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The stock step, or the weighting's when it needs each task's gradient (META-TARTAN)."""
        if self.weighting is None or not self.weighting.needs_task_grads:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.scaler is not None:
            # The weighting writes p.grad itself, outside the fp16 loss scaler's backward.
            raise ValueError(f"weighting.kind={self.weighting.kind} does not support fp16 loss scaling; "
                             "use a bf16-capable GPU or training.fp16_on_cuda=false")
        model.train()
        inputs = self._prepare_inputs(inputs)
        return self.weighting.accumulate(self.accelerator.unwrap_model(model), inputs,
                                         self.current_gradient_accumulation_steps, self.compute_loss_context_manager)
    # --- end loss weighting ---

    def _with_eval_collator(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        train_collator = self.data_collator
        self.data_collator = self.eval_collator or train_collator
        try:
            return fn(*args, **kwargs)
        finally:
            self.data_collator = train_collator

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        return self._with_eval_collator(super().evaluate, *args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        return self._with_eval_collator(super().predict, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        target = output_dir or self.args.output_dir
        if target is None:
            raise ValueError("no output directory to save the model to")
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        # save_model drops aliases of shared tensors; Trainer reloads with strict=False, and
        # loading one name of a shared tensor restores it for all its names.
        safetensors.torch.save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(out)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # Names dropped as aliases of a shared tensor are not missing.
        aliases = alias_names(self.model) if self.model is not None else set()
        missing = [k for k in load_result.missing_keys if k not in aliases]
        if missing or load_result.unexpected_keys:
            raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {load_result.unexpected_keys}")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (collation included: it happens inside the step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


class MaskingEpoch(TrainerCallback):
    """Tell the collator which epoch starts: its keyed masking draws depend on it."""

    def __init__(self, collator: MaskingCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # A resumed run restarts inside an epoch: the fractional part is the progress into it.
        self.collator.epoch = int(state.epoch + 1e-6)


class LossParts(TrainerCallback):
    """Add the last step's classification and MLM losses to the Trainer's logs."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: Any = None,
               **kw: Any) -> None:
        parts = getattr(model, "last_losses", None)
        if logs is not None and parts and "loss" in logs:
            logs.update({k: round(float(v), 4) for k, v in parts.items()})
