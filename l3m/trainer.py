"""The Trainer subclass and callbacks one run uses (``l3m.train.train_one`` assembles them).

* ``MultiTaskTrainer``: a training step that defers to a loss weighting needing per-task
  gradients (``l3m.weighting``); evaluation with a clean (``none``) collator, so masking draws never
  depend on the eval schedule; checkpoints of the multi-task module saved with shared tensors
  de-duplicated (encoder and tied decoder appear under two names).
* ``StepTimer`` (wall time per optimizer step), ``MaskingEpoch`` (the epoch the collator keys its
  per-example draws on), ``LossParts`` (classification and MLM losses in the logs).
* ``Patience`` (early stopping with the run's tie rule) and ``TrainProgress`` (masking counts and
  the examples each optimizer step trained on): both save their state in every checkpoint and get
  it back on resume, so a resumed run stops, counts and records as the uninterrupted one.
* Warmup on the optimizer steps the Trainer actually runs (``warmup_ratio`` of its own step
  count): under torchrun that is the same number as in one process (``l3m.distributed``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal, Protocol, cast, runtime_checkable

import numpy as np
import safetensors.torch
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerState

from l3m.distributed import barrier, summed
from l3m.masking import MaskingCollator
from l3m.masking.collator import EXAMPLE_ID, MASKING_COUNTS, example_seed
from l3m.modeling import alias_names
from l3m.weighting import LossWeighting

Ties = Literal["earliest", "latest"]
# A finished stage's final Trainer state, beside its checkpoints (``train_or_replay``).
STAGE_DONE = "stage_done.json"


class MultiTaskTrainer(Trainer):
    """Trainer with a clean eval collator and shared-tensor-safe checkpoints."""

    def __init__(self, *args: Any, eval_collator: Any = None, weighting: LossWeighting | None = None,
                 ties: Ties = "earliest", warmup_ratio: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.weighting = weighting
        self.ties = ties
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = 0

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """Warmup is ``warmup_ratio`` of the steps this Trainer runs, floored (the authors'
        ``int(classf_warmup_frac * t_total)``), counted here rather than from the config: under
        torchrun the config's arithmetic would not know the world size."""
        if self.lr_scheduler is None:
            self.warmup_steps = int(num_training_steps * self.warmup_ratio)
            self.args.warmup_steps = self.warmup_steps
        return super().create_scheduler(num_training_steps, optimizer)

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """HF keeps the earliest of tied best evaluations; ``ties="latest"`` keeps the latest, as
        the L3Masking authors save on ``>=`` (run_mlm_auxiliary_PLT-Masking.py, endtask_aware.py
        ``train_primary``)."""
        best = self.state.best_metric
        value = metrics.get(f"eval_{self.args.metric_for_best_model}")
        if self.ties == "latest" and best is not None and value == best:
            self.state.best_global_step = self.state.global_step
            return True
        return super()._determine_best_metric(metrics, trial)

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Record what this micro-batch trains on (``TrainProgress``), then train on it."""
        ids, counts = inputs.pop(EXAMPLE_ID, None), inputs.pop(MASKING_COUNTS, None)
        progress = next((c for c in self.callback_handler.callbacks if isinstance(c, TrainProgress)), None)
        if progress is not None:
            progress.add(self.state.global_step, ids, counts)
        return self._train_step(model, inputs, num_items_in_batch)

    # --- loss weighting (l3m.weighting) ---
    def _train_step(self, model: nn.Module, inputs: dict[str, Any],
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


class Patience(TrainerCallback, ExportableState):
    """Early stopping after ``patience`` evaluations without a new best, under a tie rule.

    ``earliest`` is transformers' ``EarlyStoppingCallback``: only a strictly higher score is a
    new best. ``latest`` is the L3Masking authors': a score equal to the best is a new best too
    (they save on ``>=``), so training stops only when the last ``patience`` evaluations are all
    strictly below the best (run_mlm_auxiliary_PLT-Masking.py: ``recent_max < max_``; stage 2,
    endtask_aware.py ``train_primary``: ``>=`` resets the count). Its state is checkpointed.
    """

    def __init__(self, patience: int, metric: str, ties: Ties = "earliest") -> None:
        self.patience, self.metric, self.ties = patience, metric, ties
        self.best: float | None = None
        self.since_best = 0

    def state(self) -> dict[str, Any]:
        return {"args": {"patience": self.patience, "metric": self.metric, "ties": self.ties},
                "attributes": {"best": self.best, "since_best": self.since_best}}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kw: Any) -> None:
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None:
            return
        if self.best is None or value > self.best or (self.ties == "latest" and value == self.best):
            self.best, self.since_best = float(value), 0
        else:
            self.since_best += 1
        if self.since_best >= self.patience:
            control.should_training_stop = True


# The examples digest is a sum of 40-bit hashes modulo 2**40: exact in float64 when summed over
# ranks, and the same for any split of a step's examples over ranks or micro-batches.
_DIGEST_MOD = 1 << 40


class TrainProgress(TrainerCallback, ExportableState):
    """What training consumed, counted once per trained micro-batch and summed over ranks.

    ``examples`` counts (step, example) pairs; ``digest`` hashes their multiset, so two runs have
    the same digest when each optimizer step trained on the same examples (in any order and on
    any rank). The masking counts are the collator's per batch (``MASKING_COUNTS``). Checkpointed
    (``ExportableState``), so a resumed run's totals equal the uninterrupted run's.
    """

    def __init__(self, content_tokens: int = 0, selected_tokens: int = 0, expected_selected: float = 0.0,
                 examples: int = 0, digest: int = 0) -> None:
        self.content_tokens, self.selected_tokens, self.expected_selected = content_tokens, selected_tokens, expected_selected
        self.examples, self.digest = examples, digest

    def state(self) -> dict[str, Any]:
        return {"args": self.as_dict(), "attributes": {}}

    def as_dict(self) -> dict[str, Any]:
        return {"content_tokens": self.content_tokens, "selected_tokens": self.selected_tokens,
                "expected_selected": self.expected_selected, "examples": self.examples, "digest": self.digest}

    def add(self, step: int, ids: torch.Tensor | None, counts: torch.Tensor | None) -> None:
        part = torch.zeros(5, dtype=torch.float64)
        if counts is not None:
            part[:3] = counts.detach().cpu().to(torch.float64)
        if ids is not None:
            part[3] = len(ids)
            part[4] = sum(example_seed(step, int(i), 0) % _DIGEST_MOD for i in ids.tolist()) % _DIGEST_MOD
        total = summed(part)  # every rank steps together, so every rank holds the global totals
        self.content_tokens += int(total[0])
        self.selected_tokens += int(total[1])
        self.expected_selected += float(total[2])
        self.examples += int(total[3])
        self.digest = (self.digest + int(np.int64(total[4]))) % _DIGEST_MOD

    def masking(self) -> dict[str, float]:
        n = self.content_tokens
        return {"content_tokens": n, "selected_tokens": self.selected_tokens,
                "realised_rate": self.selected_tokens / n if n else 0.0,
                "expected_rate": self.expected_selected / n if n else 0.0}

    def examples_seen(self) -> dict[str, Any]:
        return {"count": self.examples, "digest": f"{self.digest:010x}"}


@runtime_checkable
class StageStateful(Protocol):
    """A callback whose state is not transformers' ``ExportableState`` (it holds an object the
    Trainer cannot rebuild, e.g. the loss weighting): saved when its stage finishes, restored when
    the finished stage is replayed, so a replayed stage leaves what the trained one left."""

    def save_stage(self, stage_dir: Path) -> None: ...

    def restore_stage(self, stage_dir: Path) -> None: ...


def train_or_replay(trainer: MultiTaskTrainer, resume: bool) -> None:
    """Train the stage (from its last checkpoint when resuming), then record its final state; a
    stage that finished before is replayed from that record: state, callbacks, best weights."""
    ckpt_dir = Path(trainer.args.output_dir or ".")
    done = ckpt_dir / STAGE_DONE
    if resume and done.exists():
        trainer.state = TrainerState.load_from_json(str(done))
        trainer._load_callback_state()  # the final patience and progress, as trained
        for cb in trainer.callback_handler.callbacks:  # callbacks holding state of their own (a weighting)
            if isinstance(cb, StageStateful):
                cb.restore_stage(ckpt_dir)
        trainer.warmup_steps = int(trainer.state.max_steps * trainer.warmup_ratio)  # as create_scheduler
        if trainer.state.best_model_checkpoint is not None:
            trainer._load_best_model()
        return
    ckpts = sorted(ckpt_dir.glob("checkpoint-*")) if resume else []
    trainer.train(resume_from_checkpoint=True if ckpts else None)
    if trainer.is_world_process_zero():
        states = cast(dict[str, Any], trainer.state.stateful_callbacks)  # a dict once the state exists
        for cb in trainer.callback_handler.callbacks:  # as at a checkpoint, but at the very end
            if isinstance(cb, Patience | TrainProgress):
                states[type(cb).__name__] = cb.state()
            elif isinstance(cb, StageStateful):
                cb.save_stage(ckpt_dir)
        tmp = done.with_suffix(".tmp")
        trainer.state.save_to_json(str(tmp))
        os.replace(tmp, done)
    barrier()


def progress_of(trainer: MultiTaskTrainer) -> TrainProgress:
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, TrainProgress)), TrainProgress())
