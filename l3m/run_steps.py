"""The steps ``l3m.train.train_one`` runs, each a function of its own (and testable alone).

1. ``run_data``: tokenizer, encoded splits, the run's train rows and its MLM pool;
2. ``build_parts``: model (head init seeded), collators, tuner, optimizer, loss weighting;
3. ``training_args`` / ``stage1_trainer``: the Trainer of stage 1;
4. ``train_or_replay``: train (resuming from the last checkpoint), or replay a finished stage;
5. ``stage_to_keep``: evaluate stage 1, run stage 2 when configured, keep the better.

Resume is exact (``docs/training.md``, "Resume"): a stage's callbacks (patience, progress) come
back from its checkpoint (``restore_callback_states_from_checkpoint``), the masking and MLM draws
are keyed per example (``l3m.masking.collator``), and a stage that finished writes its final
state (``STAGE_DONE``), so a run killed after it (in stage 2, in the export) replays it instead
of training more steps from its last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments

from l3m.config import MaskingSpec, RunConfig, TunerSpec
from l3m.data.loading import PAIR, TEXT, LoadedDomain
from l3m.distributed import per_rank_batch, world_size
from l3m.encoding import TrainInputs, encode_domain, encode_pool, mlm_side, select_train, train_rows
from l3m.evaluate import compute_metrics, full_report, prediction_records
from l3m.masking import MaskingCollator, MaskingStrategy, build_masking
from l3m.masking.collator import EXAMPLE_ID
from l3m.modeling import build_multitask_model
from l3m.optim import apply_head, param_groups
from l3m.stage2 import run_stage2
from l3m.trainer import LossParts, MaskingEpoch, MultiTaskTrainer, Patience, StepTimer, TrainProgress
from l3m.tuning import build_tuner
from l3m.tuning.base import Tuner
from l3m.weighting import LossWeighting, build_weighting


@dataclass
class RunData:
    tokenizer: PreTrainedTokenizerBase
    encoded: DatasetDict
    rows: list[int]
    train_ds: Dataset
    strategy: MaskingStrategy
    pool: Any = None  # the MLM pool: the unlabelled corpus, or the train rows (independent MLM batch)
    # The MLM side's rows by example id when a domain's mlm_text transform gives them other texts
    # (l3m.data.transforms): the collator masks these twins, the classifier reads train_ds.
    twins: dict[int, Any] | None = None


@dataclass
class RunParts:
    model: nn.Module
    collator: MaskingCollator
    eval_collator: MaskingCollator
    tuner: Tuner
    optimizer: torch.optim.Optimizer
    weighting: LossWeighting | None
    timer: StepTimer = field(default_factory=StepTimer)


@dataclass
class StageResult:
    """The kept stage's trainer (its model at that stage's best dev checkpoint), reports, records."""

    trainer: MultiTaskTrainer
    reports: dict[str, Any]
    records: dict[str, list[dict[str, Any]]]
    stages: dict[str, Any]


def mixed_precision(cfg: RunConfig) -> dict[str, Any]:
    if not (torch.cuda.is_available() and cfg.training.fp16_on_cuda):
        return {}
    return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}


def run_data(cfg: RunConfig, masking: MaskingSpec, seed: int, inputs: TrainInputs,
             tokenizer: PreTrainedTokenizerBase | None = None, encoded: DatasetDict | None = None) -> RunData:
    t_cfg = cfg.training
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.model.resolved(), revision=cfg.model.revision)
    encoded = encoded or encode_domain(inputs, tokenizer, cfg.model.max_length)
    rows = train_rows(encoded["train"].num_rows, t_cfg.train_limit, seed)
    train_ds = select_train(encoded["train"], inputs, rows).add_column(EXAMPLE_ID, rows)
    strategy = build_masking(masking)
    mlm_ds = mlm_side(inputs, train_ds, tokenizer, cfg.model.max_length, rows) if strategy.uses_mlm else train_ds
    missing = [c for c in strategy.columns if c not in mlm_ds.column_names]
    if missing:
        raise ValueError(f"masking {masking.kind!r} needs column(s) {missing}; see l3m.inputs.prepare_inputs")
    pool = None
    if t_cfg.use_unlabelled and strategy.uses_mlm:
        if not inputs.unlabelled:
            raise ValueError("training.use_unlabelled needs the domain's unlabelled corpus (domain.unlabelled)")
        if "token_logp" in strategy.columns and inputs.unlabelled_logp is None:
            raise ValueError("l3 with training.use_unlabelled needs scores of the unlabelled texts")
        pool = encode_pool(inputs, tokenizer, cfg.model.max_length)
    elif t_cfg.mlm_batch == "independent" and strategy.uses_mlm:
        pool = mlm_ds  # the MLM batch: train rows drawn on their own, with their score columns
    twins = {int(f[EXAMPLE_ID]): f for f in mlm_ds} if mlm_ds is not train_ds and pool is not mlm_ds else None
    return RunData(tokenizer, encoded, rows, train_ds, strategy, pool, twins)


def build_parts(cfg: RunConfig, tuner_spec: TunerSpec, seed: int, data: RunData, label_names: list[str]) -> RunParts:
    t_cfg, strategy = cfg.training, data.strategy
    torch.manual_seed(seed)  # classifier head init is part of the seed
    model: nn.Module = build_multitask_model(cfg.model.resolved(), label_names, with_mlm=strategy.uses_mlm,
                                             mlm_weight=t_cfg.mlm_weight, revision=cfg.model.revision)
    apply_head(model, cfg.model.head)
    independent = t_cfg.mlm_batch == "independent"

    def train_collator() -> MaskingCollator:
        return MaskingCollator(data.tokenizer, strategy, seed=seed, mlm_pool=data.pool, independent_mlm=independent,
                               mlm_twins=data.twins)

    def fisher_batches() -> Any:
        loader = torch.utils.data.DataLoader(data.train_ds, batch_size=t_cfg.batch_size, shuffle=True,
                                             collate_fn=train_collator(), generator=torch.Generator().manual_seed(seed))
        return iter(loader)

    tuner = build_tuner(tuner_spec)
    tuner.base_revision = cfg.model.revision
    model = tuner.prepare(model, fisher_batches)
    groups = param_groups(model, t_cfg, tuner.optimizer_param_groups(model, t_cfg.lr, t_cfg.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=t_cfg.lr, betas=(t_cfg.adam_beta1, t_cfg.adam_beta2),
                                  eps=t_cfg.adam_epsilon)
    eval_collator = MaskingCollator(data.tokenizer, build_masking(MaskingSpec(kind="none")))
    # Loss weighting (l3m.weighting): MLM runs only; fixed keeps the model's own loss.
    weighting = build_weighting(cfg.weighting, t_cfg.mlm_weight, seed) if strategy.uses_mlm else None
    if weighting is not None:
        weighting.prepare(data.encoded["dev"], eval_collator)
    return RunParts(model, train_collator(), eval_collator, tuner, optimizer, weighting)


def training_args(cfg: RunConfig, out_dir: Path, seed: int, train_rows_: int) -> TrainingArguments:
    """Stage 1's arguments: the global batch split over the launch's processes, warmup left to the
    trainer (its own step count), callback states restored on resume."""
    t_cfg = cfg.training
    batch, accum = per_rank_batch(t_cfg.batch_size, t_cfg.grad_accum, world_size())
    steps_per_epoch = math.ceil(train_rows_ / (t_cfg.batch_size * t_cfg.grad_accum))
    strategy_kw: dict[str, Any] = (
        {"eval_strategy": "steps", "eval_steps": t_cfg.eval_steps, "save_strategy": "steps", "save_steps": t_cfg.eval_steps}
        if t_cfg.eval_steps else {"eval_strategy": "epoch", "save_strategy": "epoch"}
    )
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), seed=seed, data_seed=seed,
        per_device_train_batch_size=batch, per_device_eval_batch_size=max(64, t_cfg.batch_size),
        gradient_accumulation_steps=accum, learning_rate=t_cfg.lr, weight_decay=t_cfg.weight_decay,
        adam_beta1=t_cfg.adam_beta1, adam_beta2=t_cfg.adam_beta2, adam_epsilon=t_cfg.adam_epsilon,
        max_grad_norm=t_cfg.max_grad_norm, num_train_epochs=t_cfg.epochs, max_steps=t_cfg.max_steps,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model=cfg.domain.metric,
        greater_is_better=True, restore_callback_states_from_checkpoint=True,
        logging_steps=max(1, min(50, steps_per_epoch // 2)), report_to=[], remove_unused_columns=False,
        label_names=["labels"], dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        **strategy_kw, **mixed_precision(cfg),
    )


def stage1_trainer(cfg: RunConfig, data: RunData, parts: RunParts, out_dir: Path) -> MultiTaskTrainer:
    t_cfg, metric = cfg.training, cfg.domain.metric
    seed = parts.collator.seed or 0
    callbacks = [Patience(t_cfg.early_stopping_patience, metric, t_cfg.ties), TrainProgress(), parts.timer,
                 LossParts(), MaskingEpoch(parts.collator), *parts.tuner.callbacks(),
                 *(parts.weighting.callbacks() if parts.weighting else [])]
    return MultiTaskTrainer(
        model=parts.model, args=training_args(cfg, out_dir, seed, data.train_ds.num_rows),
        data_collator=parts.collator, eval_collator=parts.eval_collator, weighting=parts.weighting,
        ties=t_cfg.ties, warmup_ratio=t_cfg.warmup_ratio, train_dataset=data.train_ds,
        eval_dataset=data.encoded["dev"], processing_class=data.tokenizer, compute_metrics=compute_metrics,
        optimizers=(parts.optimizer, None), callbacks=callbacks,
    )


def evaluate_splits(trainer: MultiTaskTrainer, encoded: DatasetDict, loaded: LoadedDomain
                    ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Full dev/test reports and per-example prediction records of the trainer's current model."""
    reports, records = {}, {}
    for split in ("dev", "test"):
        pred = trainer.predict(encoded[split])
        reports[split] = full_report(pred.label_ids, pred.predictions.argmax(-1), loaded.label_names)
        rows = loaded.dataset[split]
        pairs = rows[PAIR] if loaded.has_pair else None
        records[split] = prediction_records(pred.predictions, pred.label_ids, loaded.label_names, rows[TEXT], pairs)
    return reports, records


def stage_summary(trainer: MultiTaskTrainer, reports: dict[str, Any]) -> dict[str, Any]:
    return {
        "metrics": {s: {k: r[k] for k in ("accuracy", "macro_f1", "n")} for s, r in reports.items()},
        "global_steps": trainer.state.global_step, "best_dev": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
    }


def stage_to_keep(cfg: RunConfig, data: RunData, parts: RunParts, trainer: MultiTaskTrainer, loaded: LoadedDomain,
                  out_dir: Path, resume: bool) -> StageResult:
    """Stage 1's evaluation, and stage 2's when configured: kept only when its best dev score is
    strictly higher (the authors: ``save_model = dev_perfs > dev_metrics``)."""
    reports, records = evaluate_splits(trainer, data.encoded, loaded)
    kept = StageResult(trainer, reports, records, {"stage1": stage_summary(trainer, reports), "kept": "stage1"})
    t_cfg = cfg.training
    if t_cfg.stage2 is None:
        return kept
    trainer2, best2 = run_stage2(parts.model, t_cfg, t_cfg.stage2, data.train_ds, data.encoded["dev"],
                                 parts.eval_collator, data.tokenizer, out_dir, parts.collator.seed or 0,
                                 cfg.domain.metric, mixed_precision(cfg), resume=resume)
    reports2, records2 = evaluate_splits(trainer2, data.encoded, loaded)
    kept.stages["stage2"] = stage_summary(trainer2, reports2)
    best1 = trainer.state.best_metric
    if best1 is None or best2 > best1:
        return StageResult(trainer2, reports2, records2, {**kept.stages, "kept": "stage2"})
    return kept
