"""Train one (masking strategy, tuner, seed) run with transformers' Trainer and write the
trained-model directory (docs/architecture.md, "Trained model directory").

What the Trainer gives for free and we keep: mixed precision on GPU, gradient accumulation,
checkpointing and resume, early stopping on the dev metric with the best checkpoint restored
(so test is measured at the best dev checkpoint), seeding, the progress bar. What we add:

* one collator per run (``l3m.masking``) whose MLM selection reads precomputed columns;
* the Trainer subclass and callbacks of ``l3m.trainer`` (clean eval collator, shared-tensor-safe
  checkpoints, step timing, loss parts);
* the tuner hooks (``l3m.tuning``): prepare / callbacks / optimizer groups / export.

``train_one`` is a short sequence of the named steps of ``l3m.run_steps``; a run killed at any
point and resumed trains, scores and predicts as the run never killed (``docs/training.md``,
"Resume").

Under ``torchrun`` (DDP, ``docs/scale-out.md``) every rank runs ``train_one`` and they train the
one-process run: the global batch split over the ranks, the masking and MLM draws keyed per
example (``l3m.distributed``). Evaluation gathers the full dev/test predictions on every rank,
the progress counts are summed over ranks, and only rank 0 writes the model, reports and
``run.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from l3m.config import MaskingSpec, RunConfig, TunerSpec
from l3m.distributed import barrier, world_size
from l3m.encoding import (  # noqa: F401  (re-exported: the historical home of these names)
    TrainInputs,
    attach,
    encode,
    encode_domain,
    encode_pool,
    global_word_ids,
    mlm_side,
    select_train,
    train_rows,
)
from l3m.evaluate import PREDICTIONS_DIR, report_markdown, write_predictions
from l3m.identity import RUN_RECORD as IDENTITY_RUN_RECORD
from l3m.run_steps import RunData, RunParts, StageResult, build_parts, run_data, stage1_trainer, stage_to_keep
from l3m.stage2 import STAGE2_DIR
from l3m.trainer import StepTimer, TrainProgress, progress_of, train_or_replay  # noqa: F401  (StepTimer: bench)
from l3m.weighting import write_weight_log

RUN_RECORD = IDENTITY_RUN_RECORD  # re-exported: readers import it from here


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
    # What stage 1 trained on: (step, example) pairs and their digest (l3m.trainer.TrainProgress),
    # its warmup steps, and the processes it ran in (the same run whatever that number).
    examples: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    processes: int = 1

    def save(self, path: Path) -> None:
        """Written whole or not at all: a reader never sees half a record."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls(**json.loads(path.read_text()))


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        import l3m

        return getattr(l3m, "__version__", "unknown")


def train_one(cfg: RunConfig, masking: MaskingSpec, tuner_spec: TunerSpec, seed: int, inputs: TrainInputs,
              out_dir: str | Path, *, resume: bool = True, keep_checkpoints: bool = False,
              tokenizer: PreTrainedTokenizerBase | None = None, encoded: DatasetDict | None = None,
              run_id: str = "") -> RunRecord:
    """Train, pick the best dev checkpoint, evaluate dev+test, export ``out_dir/model``.

    A finished run (``out_dir/run.json`` present) is returned as is when ``resume``; an
    interrupted one continues where it stopped. Both are only safe because ``out_dir`` is named
    by the run's identity (``l3m.identity``) and checked against it before reuse.
    """
    out_dir = Path(out_dir)
    record_path = out_dir / RUN_RECORD
    if resume and record_path.exists():
        return RunRecord.load(record_path)
    data = run_data(cfg, masking, seed, inputs, tokenizer, encoded)
    parts = build_parts(cfg, tuner_spec, seed, data, inputs.loaded.label_names)
    trainer = stage1_trainer(cfg, data, parts, out_dir)
    t0 = time.perf_counter()
    train_or_replay(trainer, resume)
    progress, warmup = progress_of(trainer), trainer.warmup_steps
    kept = stage_to_keep(cfg, data, parts, trainer, inputs.loaded, out_dir, resume)
    train_seconds = time.perf_counter() - t0
    if not kept.trainer.is_world_process_zero():  # rank 0 writes; the others wait for its run.json
        barrier()
        return RunRecord.load(record_path)
    write_model_dir(cfg, masking, tuner_spec, seed, inputs, data, parts, kept, progress, out_dir, run_id)
    record = RunRecord(
        domain=cfg.domain.name, strategy=masking.kind, tuner=tuner_spec.kind, seed=seed,
        metrics={s: {k: r[k] for k in ("accuracy", "macro_f1", "n")} for s, r in kept.reports.items()},
        masking=progress.masking(), train_seconds=round(train_seconds, 2),
        median_step_seconds=statistics.median(parts.timer.times) if parts.timer.times else 0.0,
        global_steps=kept.trainer.state.global_step, best_checkpoint=kept.trainer.state.best_model_checkpoint,
        model_dir=str(out_dir / "model"), run_id=run_id, train_rows=len(data.rows), stages=kept.stages,
        examples=progress.examples_seen(), warmup_steps=warmup, processes=world_size(),
    )
    record.save(record_path)
    if not keep_checkpoints:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(out_dir / STAGE2_DIR, ignore_errors=True)
    barrier()
    return record


def write_model_dir(cfg: RunConfig, masking: MaskingSpec, tuner_spec: TunerSpec, seed: int, inputs: TrainInputs,
                    data: RunData, parts: RunParts, kept: StageResult, progress: TrainProgress, out_dir: Path,
                    run_id: str) -> None:
    """The trained-model directory (docs/architecture.md): model, tokenizer, predictions,
    ``l3m.json``; and the run's ``report.md``."""
    model_dir, loaded, model = out_dir / "model", inputs.loaded, kept.trainer.model
    if model is None:
        raise RuntimeError("the trainer lost its model")
    exported = parts.tuner.export(model, model_dir) or {}
    for split, recs in kept.records.items():
        write_predictions(model_dir / PREDICTIONS_DIR / f"{split}.jsonl", recs)
    data.tokenizer.save_pretrained(model_dir)
    meta = {
        "domain": cfg.domain.name, "label_names": loaded.label_names, "metrics": kept.reports,
        "metric": cfg.domain.metric, "strategy": masking.model_dump(), "tuner": tuner_spec.model_dump(), "seed": seed,
        "base_model": cfg.model.name_or_path, "base_revision": cfg.model.revision,
        "config": cfg.model_dump(mode="json"), "data_fingerprint": loaded.fingerprint,
        "score_key": inputs.score_key if masking.kind == "l3" else None,
        "max_length": cfg.model.max_length, "text_pair": loaded.has_pair, "code_version": code_version(),
        "run_id": run_id, "train_rows": len(data.rows),
        "masking_stats": progress.masking(), "export": exported, "stages": kept.stages,
    }
    (model_dir / "l3m.json").write_text(json.dumps(meta, indent=2))
    weighting = parts.weighting
    weights_md = write_weight_log(weighting.log, out_dir) if weighting is not None and weighting.log else ""
    (out_dir / "report.md").write_text(
        f"# {cfg.domain.name}: {masking.kind} / {tuner_spec.kind} / seed {seed}\n\n"
        + report_markdown(kept.reports["dev"], "dev (best checkpoint)") + "\n"
        + report_markdown(kept.reports["test"], "test") + weights_md
    )
