"""Stage 2: classification-only fine-tuning from the best stage-1 checkpoint.

L3Masking's authors report every number after a second stage (``run_mlm_auxiliary_PLT-Masking.py``,
``train_primary``): the classifier alone, starting at the stage-1 point with the best dev score,
trained at a small constant lr (5e-6, no warmup or decay) for at most 10 epochs with the dev
metric checked every epoch and patience 3. Its result is kept only when its best dev score beats
stage 1's; otherwise the stage-1 model stands. The same rule is applied here, and stage 2 follows
the run's tie rule (``training.ties``; the authors' ``train_primary`` keeps the latest tied best)
and resumes exactly as stage 1 does (``l3m.trainer.train_or_replay``).

The stage-1 module is the multi-task one (encoder shared with the MLM head); stage 2 wraps a
copy of its classifier in a ``MultiTaskModel`` without an MLM head, so no MLM loss can be
computed, and trains it with the clean (``none``) collator. A copy, so the stage-1 model is
still there when stage 2 does not beat it. Stage 2 runs with the ``full`` tuner only (the
config refuses others): it is the paper's recipe, and the other tuners' state is bound to the
stage-1 module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainingArguments

from l3m.config import Stage2Spec, TrainingSpec
from l3m.distributed import per_rank_batch, world_size
from l3m.evaluate import compute_metrics
from l3m.modeling import MultiTaskModel
from l3m.optim import param_groups
from l3m.trainer import MultiTaskTrainer, Patience, StepTimer, train_or_replay
from l3m.tuning.base import find_classifier

STAGE2_DIR = "stage2"


def stage2_args(t_cfg: TrainingSpec, spec: Stage2Spec, out_dir: Path, seed: int, metric: str,
                mixed_precision: dict[str, Any]) -> TrainingArguments:
    batch, accum = per_rank_batch(t_cfg.batch_size, t_cfg.grad_accum, world_size())  # stage 1's global batch
    return TrainingArguments(
        output_dir=str(out_dir / STAGE2_DIR / "checkpoints"), seed=seed, data_seed=seed,
        per_device_train_batch_size=batch, per_device_eval_batch_size=max(64, t_cfg.batch_size),
        gradient_accumulation_steps=accum, learning_rate=spec.lr, lr_scheduler_type="constant",
        weight_decay=t_cfg.weight_decay, adam_beta1=t_cfg.adam_beta1, adam_beta2=t_cfg.adam_beta2,
        adam_epsilon=t_cfg.adam_epsilon, max_grad_norm=t_cfg.max_grad_norm, num_train_epochs=spec.epochs,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=True, restore_callback_states_from_checkpoint=True,
        logging_strategy="epoch", report_to=[],
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), **mixed_precision,
    )


def run_stage2(stage1_model: torch.nn.Module, t_cfg: TrainingSpec, spec: Stage2Spec,
               train_ds: Dataset, dev_ds: Dataset, collator: Any, tokenizer: PreTrainedTokenizerBase,
               out_dir: Path, seed: int, metric: str, mixed_precision: dict[str, Any],
               resume: bool = True) -> tuple[MultiTaskTrainer, float]:
    """Train the classifier of ``stage1_model`` (its best stage-1 weights) classification-only.

    Returns the stage-2 trainer (its model holds stage 2's best dev checkpoint) and that best
    dev score; the caller keeps it only if it beats stage 1's.
    """
    model = MultiTaskModel(copy.deepcopy(find_classifier(stage1_model)), None)
    args = stage2_args(t_cfg, spec, out_dir, seed, metric, mixed_precision)
    # One lr for every parameter, the authors' stage-2 optimiser (head lr does not apply; their
    # stage-2 groups leave every bias undecayed, the head's too).
    flat = t_cfg.model_copy(update={"lr": spec.lr, "head_lr": None, "head_weight_decay": None, "head_bias_decay": False})
    groups = param_groups(model, flat)
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=(t_cfg.adam_beta1, t_cfg.adam_beta2),
                                  eps=t_cfg.adam_epsilon)
    trainer = MultiTaskTrainer(
        model=model, args=args, data_collator=collator, eval_collator=collator, train_dataset=train_ds,
        eval_dataset=dev_ds, processing_class=tokenizer, compute_metrics=compute_metrics,
        optimizers=(optimizer, None), ties=t_cfg.ties,
        callbacks=[Patience(spec.patience, metric, t_cfg.ties), StepTimer()],
    )
    train_or_replay(trainer, resume)
    best = trainer.state.best_metric
    return trainer, float("-inf") if best is None else float(best)
