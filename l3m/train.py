"""Train one (masking strategy, tuner, seed) run with transformers' Trainer and write the
trained-model directory (docs/architecture.md, "Trained model directory").

What the Trainer gives for free and we keep: mixed precision on GPU, gradient accumulation,
checkpointing and resume, early stopping on the dev metric with the best checkpoint restored
(so test is measured at the best dev checkpoint), seeding, the progress bar. What we add:

* one collator per run (``l3m.masking``) whose MLM selection reads precomputed columns;
* the Trainer subclass and callbacks of ``l3m.trainer`` (clean eval collator, shared-tensor-safe
  checkpoints, step timing, loss parts);
* the tuner hooks (``l3m.tuning``): prepare / callbacks / optimizer groups / export.

Under ``torchrun`` (DDP, ``docs/scale-out.md``) every rank runs ``train_one``: the Trainer
shards the train batches, evaluation gathers the full dev/test predictions on every rank, the
masking counts are summed over ranks, and only rank 0 writes the model, reports and ``run.json``.
Train rows carry their index (``example_id``) so each is masked as in one process.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import (
    AutoTokenizer,
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from l3m.config import MaskingSpec, RunConfig, TunerSpec
from l3m.data.loading import PAIR, TEXT, LoadedDomain, encode_kwargs
from l3m.distributed import barrier, summed_over_ranks
from l3m.evaluate import (
    PREDICTIONS_DIR,
    compute_metrics,
    full_report,
    prediction_records,
    report_markdown,
    write_predictions,
)
from l3m.masking import MaskingCollator, build_masking
from l3m.masking.collator import EXAMPLE_ID
from l3m.modeling import build_multitask_model
from l3m.optim import apply_head, param_groups
from l3m.stage2 import STAGE2_DIR, run_stage2
from l3m.trainer import LossParts, MaskingEpoch, MultiTaskTrainer, StepTimer
from l3m.tuning import build_tuner
from l3m.weighting import build_weighting, write_weight_log

RUN_RECORD = "run.json"


@dataclass
class TrainInputs:
    """What a run needs besides the config: the data and the precomputed per-token columns.

    ``token_logp`` / ``selective_mask`` are aligned with ``loaded.dataset["train"]`` rows and
    each array has the length of that row's ``input_ids`` (the scoring contract). A row no run
    trains on (outside every seed's ``train_limit`` subsample) may hold None: it is never scored.
    """

    loaded: LoadedDomain
    token_logp: list[np.ndarray | None] | None = None
    selective_mask: list[np.ndarray] | None = None
    score_key: str | None = None
    # The unlabelled in-domain corpus (training.use_unlabelled) and its vanilla scores.
    unlabelled: list[str] | None = None
    unlabelled_logp: list[np.ndarray] | None = None
    # What a run's identity calls its data: the snapshot fingerprint (+ the corpus when used).
    data_fingerprint: str = ""
    # The train rows' (text, pair) as the MLM side reads them under a domain's mlm_text
    # transform (l3m.data.transforms); token_logp then belongs to these. None: the rows' own.
    mlm_items: list[tuple[str, str | None]] | None = None

    def __post_init__(self) -> None:
        self.data_fingerprint = self.data_fingerprint or self.loaded.fingerprint


@dataclass
class RunRecord:
    domain: str
    strategy: str
    tuner: str
    seed: int
    metrics: dict[str, dict[str, Any]]
    masking: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    median_step_seconds: float = 0.0
    global_steps: int = 0
    best_checkpoint: str | None = None
    model_dir: str = ""
    run_id: str = ""
    train_rows: int = 0
    # Per stage ("stage1", and "stage2" when configured): dev/test scores at that stage's best
    # dev checkpoint, its steps, and which stage's model the run kept.
    stages: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls(**json.loads(path.read_text()))


def global_word_ids(enc: Any, i: int | None = None) -> list[int]:
    """Word index per token, unique across the two segments of a pair, -1 at special tokens."""
    words = enc.word_ids(i) if i is not None else enc.word_ids()
    seqs = enc.sequence_ids(i) if i is not None else enc.sequence_ids()
    out, last, gid = [], None, -1
    for w, s in zip(words, seqs, strict=True):
        if w is None:
            out.append(-1)
            continue
        if (w, s) != last:
            gid, last = gid + 1, (w, s)
        out.append(gid)
    return out


def encode(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, has_pair: bool) -> Dataset:
    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pair = batch["text_pair"] if has_pair else None
        enc = tokenizer(batch["text"], pair, return_special_tokens_mask=True, **encode_kwargs(max_length))
        out = dict(enc)
        if tokenizer.is_fast:
            out["word_ids"] = [global_word_ids(enc, i) for i in range(len(batch["text"]))]
        return out

    return ds.map(fn, batched=True, desc="tokenize")


def train_rows(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """The train rows a run of ``seed`` trains on: all, or a seeded subsample of ``limit`` rows.

    A function of its own so scoring can compute the same rows beforehand and score only them.
    """
    if not limit or limit >= n_rows:
        return list(range(n_rows))
    return sorted(np.random.default_rng(seed).permutation(n_rows)[:limit].tolist())


def attach(ds: Dataset, name: str, arrays: Sequence[np.ndarray | None]) -> Dataset:
    """Add a per-token float column, checking each array matches its row's token count."""
    if len(arrays) != ds.num_rows:
        raise ValueError(f"{name}: {len(arrays)} arrays for {ds.num_rows} rows")
    lengths = [len(ids) for ids in ds["input_ids"]]
    for i, (a, n) in enumerate(zip(arrays, lengths, strict=True)):
        if a is None or len(a) != n:
            raise ValueError(f"{name}: row {i} has {None if a is None else len(a)} values for {n} tokens "
                             "(scores computed with another tokenizer or max_length?)")
    return ds.add_column(name, [np.asarray(a, dtype=np.float32).tolist() for a in arrays])


def encode_domain(inputs: TrainInputs, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    loaded = inputs.loaded
    return DatasetDict({k: encode(v, tokenizer, max_length, loaded.has_pair) for k, v in loaded.dataset.items()})


def select_train(train: Dataset, inputs: TrainInputs, rows: list[int]) -> Dataset:
    """The run's train rows with their per-token columns (scores, selective picks) attached."""
    ds = train.select(rows) if len(rows) != train.num_rows else train
    if inputs.token_logp is not None and inputs.mlm_items is None:  # else they go to mlm_side
        ds = attach(ds, "token_logp", [inputs.token_logp[i] for i in rows])
    if inputs.selective_mask is not None:
        ds = attach(ds, "selective_mask", [inputs.selective_mask[i] for i in rows])
    return ds


def mlm_side(inputs: TrainInputs, train_ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
             rows: list[int]) -> Dataset:
    """The MLM side's features of the run's train rows (``train_ds``, carrying ``example_id``):
    ``train_ds`` itself, or under a text transform the transformed texts' encoding with their
    scores and the same example ids (the collator's ``mlm_twins`` / independent pool)."""
    if inputs.mlm_items is None:
        return train_ds
    items = [inputs.mlm_items[i] for i in rows]
    has_pair = inputs.loaded.has_pair
    data: dict[str, list[Any]] = {"text": [t for t, _ in items]}
    if has_pair:
        data["text_pair"] = [p or "" for _, p in items]
    ds = encode(Dataset.from_dict(data), tokenizer, max_length, has_pair).remove_columns(list(data))
    if inputs.token_logp is not None:
        ds = attach(ds, "token_logp", [inputs.token_logp[i] for i in rows])
    return ds.add_column(EXAMPLE_ID, rows)


def encode_pool(inputs: TrainInputs, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """The unlabelled corpus as MLM-only features (no label, no selective column)."""
    pool = encode(Dataset.from_dict({"text": inputs.unlabelled or []}), tokenizer, max_length, has_pair=False)
    if inputs.unlabelled_logp is not None:
        pool = attach(pool, "token_logp", inputs.unlabelled_logp)
    return pool.remove_columns("text")


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        import l3m

        return getattr(l3m, "__version__", "unknown")


def _mixed_precision(cfg: RunConfig) -> dict[str, Any]:
    if not (torch.cuda.is_available() and cfg.training.fp16_on_cuda):
        return {}
    return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}


def train_one(cfg: RunConfig, masking: MaskingSpec, tuner_spec: TunerSpec, seed: int, inputs: TrainInputs,
              out_dir: str | Path, *, resume: bool = True, keep_checkpoints: bool = False,
              tokenizer: PreTrainedTokenizerBase | None = None, encoded: DatasetDict | None = None,
              run_id: str = "") -> RunRecord:
    """Train, pick the best dev checkpoint, evaluate dev+test, export ``out_dir/model``.

    A finished run (``out_dir/run.json`` present) is returned as is when ``resume``; an
    interrupted one continues from its last checkpoint. Both are only safe because ``out_dir``
    is named by the run's identity (``l3m.identity``): another config never shares it.
    """
    out_dir = Path(out_dir)
    record_path = out_dir / RUN_RECORD
    if resume and record_path.exists():
        return RunRecord.load(record_path)
    t_cfg, loaded = cfg.training, inputs.loaded
    base = cfg.model.resolved()
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(base, revision=cfg.model.revision)
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

    torch.manual_seed(seed)  # classifier head init is part of the seed
    model: nn.Module = build_multitask_model(base, loaded.label_names, with_mlm=strategy.uses_mlm,
                                  mlm_weight=t_cfg.mlm_weight, revision=cfg.model.revision)
    apply_head(model, cfg.model.head)
    independent = t_cfg.mlm_batch == "independent"
    twins = {int(f[EXAMPLE_ID]): f for f in mlm_ds} if mlm_ds is not train_ds and pool is not mlm_ds else None
    collator = MaskingCollator(tokenizer, strategy, seed=seed, mlm_pool=pool, independent_mlm=independent,
                               mlm_twins=twins)
    eval_collator = MaskingCollator(tokenizer, build_masking(MaskingSpec(kind="none")))

    def fisher_batches() -> Any:
        loader = torch.utils.data.DataLoader(train_ds, batch_size=t_cfg.batch_size, shuffle=True,
                                             collate_fn=MaskingCollator(tokenizer, strategy, seed=seed, mlm_pool=pool,
                                                                        independent_mlm=independent, mlm_twins=twins),
                                             generator=torch.Generator().manual_seed(seed))
        return iter(loader)

    tuner = build_tuner(tuner_spec)
    model = tuner.prepare(model, fisher_batches)
    metric = loaded_metric(cfg)
    steps_per_epoch = math.ceil(train_ds.num_rows / (t_cfg.batch_size * t_cfg.grad_accum))
    total = t_cfg.max_steps if t_cfg.max_steps > 0 else math.ceil(steps_per_epoch * t_cfg.epochs)
    strategy_kw: dict[str, Any] = (
        {"eval_strategy": "steps", "eval_steps": t_cfg.eval_steps, "save_strategy": "steps", "save_steps": t_cfg.eval_steps}
        if t_cfg.eval_steps else {"eval_strategy": "epoch", "save_strategy": "epoch"}
    )
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), seed=seed, data_seed=seed,
        per_device_train_batch_size=t_cfg.batch_size, per_device_eval_batch_size=max(64, t_cfg.batch_size),
        gradient_accumulation_steps=t_cfg.grad_accum, learning_rate=t_cfg.lr, weight_decay=t_cfg.weight_decay,
        adam_beta1=t_cfg.adam_beta1, adam_beta2=t_cfg.adam_beta2, adam_epsilon=t_cfg.adam_epsilon,
        max_grad_norm=t_cfg.max_grad_norm,
        warmup_steps=int(total * t_cfg.warmup_ratio), num_train_epochs=t_cfg.epochs, max_steps=t_cfg.max_steps,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=True,
        logging_steps=max(1, min(50, steps_per_epoch // 2)), report_to=[], remove_unused_columns=False,
        label_names=["labels"], dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        **strategy_kw, **_mixed_precision(cfg),
    )
    groups = param_groups(model, t_cfg, tuner.optimizer_param_groups(model, t_cfg.lr, t_cfg.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=t_cfg.lr, betas=(t_cfg.adam_beta1, t_cfg.adam_beta2),
                                  eps=t_cfg.adam_epsilon)
    timer = StepTimer()
    # Loss weighting (l3m.weighting): MLM runs only; fixed keeps the model's own loss.
    weighting = build_weighting(cfg.weighting, t_cfg.mlm_weight, seed) if strategy.uses_mlm else None
    if weighting is not None:
        weighting.prepare(encoded["dev"], eval_collator)
    trainer = MultiTaskTrainer(
        model=model, args=args, data_collator=collator, eval_collator=eval_collator, weighting=weighting,
        train_dataset=train_ds, eval_dataset=encoded["dev"], processing_class=tokenizer,
        compute_metrics=compute_metrics, optimizers=(optimizer, None),
        callbacks=[EarlyStoppingCallback(t_cfg.early_stopping_patience), timer, LossParts(), MaskingEpoch(collator),
                   *tuner.callbacks(), *(weighting.callbacks() if weighting else [])],
    )
    ckpts = sorted((out_dir / "checkpoints").glob("checkpoint-*")) if resume else []
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if ckpts else None)
    reports, records = evaluate_splits(trainer, encoded, loaded)
    stages: dict[str, Any] = {"stage1": stage_summary(trainer, reports), "kept": "stage1"}
    if t_cfg.stage2 is not None:
        trainer2, best2 = run_stage2(model, t_cfg, t_cfg.stage2, train_ds, encoded["dev"], eval_collator,
                                     tokenizer, out_dir, seed, metric, _mixed_precision(cfg), resume=resume)
        reports2, records2 = evaluate_splits(trainer2, encoded, loaded)
        stages["stage2"] = stage_summary(trainer2, reports2)
        # The authors' rule: stage 2 replaces stage 1 only when its best dev score is higher.
        best1 = trainer.state.best_metric
        if best1 is None or best2 > best1:
            trainer, reports, records, stages["kept"] = trainer2, reports2, records2, "stage2"
    train_seconds = time.perf_counter() - t0
    model_dir = out_dir / "model"
    if trainer.model is None:
        raise RuntimeError("the trainer lost its model")
    collator.stats = summed_over_ranks(collator.stats)
    if not trainer.is_world_process_zero():  # rank 0 writes; the others wait for its run.json
        barrier()
        return RunRecord.load(record_path)
    exported = tuner.export(trainer.model, model_dir) or {}
    for split, recs in records.items():
        write_predictions(model_dir / PREDICTIONS_DIR / f"{split}.jsonl", recs)
    tokenizer.save_pretrained(model_dir)
    meta = {
        "domain": cfg.domain.name, "label_names": loaded.label_names, "metrics": reports, "metric": metric,
        "strategy": masking.model_dump(), "tuner": tuner_spec.model_dump(), "seed": seed,
        "base_model": cfg.model.name_or_path, "base_revision": cfg.model.revision,
        "config": cfg.model_dump(mode="json"), "data_fingerprint": loaded.fingerprint,
        "score_key": inputs.score_key if masking.kind == "l3" else None,
        "max_length": cfg.model.max_length, "text_pair": loaded.has_pair, "code_version": code_version(),
        "run_id": run_id, "train_rows": len(rows),
        "masking_stats": collator.stats.as_dict(), "export": exported, "stages": stages,
    }
    (model_dir / "l3m.json").write_text(json.dumps(meta, indent=2))
    weights_md = write_weight_log(weighting.log, out_dir) if weighting is not None and weighting.log else ""
    (out_dir / "report.md").write_text(
        f"# {cfg.domain.name}: {masking.kind} / {tuner_spec.kind} / seed {seed}\n\n"
        + report_markdown(reports["dev"], "dev (best checkpoint)") + "\n" + report_markdown(reports["test"], "test")
        + weights_md
    )
    record = RunRecord(
        domain=cfg.domain.name, strategy=masking.kind, tuner=tuner_spec.kind, seed=seed,
        metrics={s: {k: r[k] for k in ("accuracy", "macro_f1", "n")} for s, r in reports.items()},
        masking=collator.stats.as_dict(), train_seconds=round(train_seconds, 2),
        median_step_seconds=statistics.median(timer.times) if timer.times else 0.0,
        global_steps=trainer.state.global_step, best_checkpoint=trainer.state.best_model_checkpoint,
        model_dir=str(model_dir), run_id=run_id, train_rows=len(rows), stages=stages,
    )
    record.save(record_path)
    if not keep_checkpoints:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(out_dir / STAGE2_DIR, ignore_errors=True)
    barrier()
    return record


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


def loaded_metric(cfg: RunConfig) -> str:
    """The dev metric early stopping and checkpoint selection watch (the domain's metric)."""
    return cfg.domain.metric
