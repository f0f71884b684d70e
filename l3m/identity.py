"""What identifies a training run and an experiment: a hash of everything that produced it.

A run directory is reused (``run.json``) or resumed (checkpoints) only when its identity matches
exactly, so a rerun with another epoch budget, learning rate, train subsample, masking setting,
base model, data snapshot or score set trains anew instead of returning an older run's numbers.

The identity covers what changes a run's outcome: the base model (its weight and tokenizer file
digests, or hub id + revision), max_length, the strategy and tuner with every setting, the
training settings, the seed, the domain's selection metric and label set, the data snapshot's
content fingerprint and, for L3, the key of the vanilla scores. It leaves out what does not
(the output location, the score store's location, the scoring dtype: see l3m.scoring.keys).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l3m.config import MaskingSpec, RunConfig, TunerSpec

# Bumped when the meaning of a run changes without any setting changing (e.g. a fix in how runs
# are trained that makes older runs incomparable).
# 2: gradient accumulation averages micro-batches (before, the Trainer summed them).
IDENTITY_VERSION = 2
RUNS_DIR = "runs"
EXPERIMENTS_DIR = "experiments"
# Settings that only matter to strategies with an auxiliary MLM loss: STL runs ignore them, so a
# changed lambda must not retrain the STL baseline.
MLM_ONLY = {"mlm_weight", "use_unlabelled", "mlm_batch"}
# The tuners' parameter sets are taken from the encoder's layer stack, no longer by a name match
# over the whole model (l3m.tuning.base.encoder_layer_stack). With the default scope that match
# found the stack and nothing else in every classifier, but also RoBERTa's, XLM-R's and MPNet's
# lm_head.layer_norm and DistilBERT's vocab_layer_norm in an MLM model; another scope could
# reach beyond the stack in any model (e.g. "bias": the task head's too). child_f now leaves the
# MLM head's gradients unmasked. The runs whose set can differ get the marker, the others keep
# their identity: STL and weight_mask with the default scope, and every full-tuner run.
DEFAULT_SCOPE = TunerSpec.model_fields["scope"].default
# Training settings added after runs existed: left out of the identity at their default, so the
# runs that never set them keep their identity (and are not retrained).
LATER_TRAINING_DEFAULTS = {"head_bias_decay": False}


def _selection_changed(tuner: TunerSpec, uses_mlm: bool) -> bool:
    if tuner.kind == "child_f":
        return uses_mlm
    if tuner.kind == "child_d":
        return uses_mlm or tuner.scope != DEFAULT_SCOPE
    return tuner.kind == "weight_mask" and tuner.scope != DEFAULT_SCOPE


def digest(obj: Any) -> str:
    """sha256 of a JSON rendering with sorted keys (stable across processes and machines)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(cfg: RunConfig) -> dict[str, Any]:
    from l3m.scoring.keys import model_fingerprint

    m = cfg.model
    return {"name": m.name_or_path, "files": model_fingerprint(m.resolved(), m.revision), "max_length": m.max_length,
            "head": m.head}


def run_identity(cfg: RunConfig, strategy: MaskingSpec, tuner: TunerSpec, seed: int, data_fingerprint: str,
                 score_key: str | None) -> dict[str, Any]:
    """The JSON object whose hash names a run (stored beside it as ``identity.json``)."""
    uses_mlm = strategy.kind != "none"
    training = cfg.training.model_dump(mode="json", exclude={"seeds"} | (set() if uses_mlm else MLM_ONLY))
    training = {k: v for k, v in training.items()
                if not (k in LATER_TRAINING_DEFAULTS and v == LATER_TRAINING_DEFAULTS[k])}
    ident: dict[str, Any] = {
        "version": IDENTITY_VERSION,
        "model": model_identity(cfg),
        "strategy": strategy.model_dump(mode="json") if uses_mlm else {"kind": "none"},
        "tuner": tuner.model_dump(mode="json"),
        "training": training,
        "seed": seed,
        "metric": cfg.domain.metric,
        "labels": cfg.domain.labels,
        "data": data_fingerprint,
        "scores": score_key if strategy.kind == "l3" else None,
    }
    if uses_mlm and cfg.domain.mlm_text != "raw":
        ident["mlm_text"] = cfg.domain.mlm_text  # what the MLM side reads (l3m.data.transforms)
    if _selection_changed(tuner, uses_mlm):
        ident["tuner_scope"] = "encoder-layers"
    if uses_mlm and cfg.weighting.kind != "fixed":
        # Learned weights change an MLM run; fixed is the training.mlm_weight already above,
        # so fixed (and STL) identities stay what they were before weightings existed.
        ident["weighting"] = cfg.weighting.model_dump(mode="json")
    if strategy.kind == "selective":
        # Selective Masking's token picks come from an STL classifier of the first tuner and seed.
        ident["rater"] = run_identity(cfg, MaskingSpec(kind="none"), cfg.tuners[0], cfg.training.seeds[0],
                                      data_fingerprint, None)
    return ident


@dataclass(frozen=True)
class RunKey:
    """One planned run; ``run_id`` is the digest of its identity."""

    strategy: str
    tuner: str
    seed: int
    run_id: str

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.tuner}-seed{self.seed}-{self.run_id[:12]}"

    def path(self, out_dir: Path) -> Path:
        return Path(out_dir) / RUNS_DIR / self.name


def run_key(cfg: RunConfig, strategy: MaskingSpec, tuner: TunerSpec, seed: int, data_fingerprint: str,
            score_key: str | None) -> tuple[RunKey, dict[str, Any]]:
    ident = run_identity(cfg, strategy, tuner, seed, data_fingerprint, score_key)
    return RunKey(strategy.kind, tuner.kind, seed, digest(ident)), ident


def experiment_id(keys: list[RunKey]) -> str:
    """An experiment is its set of runs: same runs, same table."""
    return digest(sorted(k.run_id for k in keys))


def experiment_dir(cfg: RunConfig, keys: list[RunKey]) -> Path:
    return cfg.resolved_output_dir() / EXPERIMENTS_DIR / f"{cfg.domain.name}-{experiment_id(keys)[:12]}"
