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

import ast
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from l3m.config import LORA_FIELDS, MaskingSpec, RunConfig, TunerSpec

# Bumped when the meaning of a run changes without any setting changing (e.g. a fix in how runs
# are trained that makes older runs incomparable).
# 2: gradient accumulation averages micro-batches (before, the Trainer summed them).
# 3: MLM texts drawn from a pool (unlabelled corpus, independent MLM batch) are keyed per batch
#    slot, not drawn from the collator's stream; warmup is a share of the Trainer's own step count;
#    META-TARTAN's body leaves out the head's parameters (BERT's pooler); macro-F1 averages the
#    domain's whole label set (a split lacking a class no longer averages fewer classes).
IDENTITY_VERSION = 3
# The training code IDENTITY_VERSION was pinned against (``training_code_digest``): a change to
# these modules fails tests/test_identity.py until it is pinned again, with the version bumped
# when the change alters what a run computes. ``python -m l3m.identity pin`` does it (it asks
# for ``--same-results`` to re-pin an unchanged version).
TRAINING_CODE = {"version": 3, "digest": "ce7ccd0cadae4866f4d568e175fef2afda94538efe679c7ff649f7bd6fdadc9b"}
TRAINING_MODULES = ("train.py", "run_steps.py", "trainer.py", "stage2.py", "encoding.py", "modeling.py",
                    "optim.py", "evaluate.py", "distributed.py", "masking/*.py", "weighting/*.py", "tuning/*.py")
RUN_RECORD = "run.json"
IDENTITY_FILE = "identity.json"
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


def tuner_identity(tuner: TunerSpec) -> dict[str, Any]:
    """The tuner's settings that change its runs: lora's own fields for lora, the rest otherwise."""
    if tuner.kind == "lora":
        return tuner.model_dump(mode="json", include=set(LORA_FIELDS))
    return tuner.model_dump(mode="json", exclude=set(LORA_FIELDS - {"kind", "train_head"}))


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
        "tuner": tuner_identity(tuner),
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


def _code_of(path: Path) -> str:
    """A module's code without comments and docstrings: what it computes, not how it reads."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.unparse(tree)


def code_digest(root: Path, patterns: tuple[str, ...]) -> str:
    """sha256 over the code of the modules ``patterns`` match under ``root``."""
    files = sorted({p for pattern in patterns for p in root.glob(pattern)})
    return digest({p.relative_to(root).as_posix(): _code_of(p) for p in files})


def training_code_digest(root: Path | None = None) -> str:
    """sha256 over the training modules' code (``TRAINING_MODULES`` under ``l3m/``)."""
    return code_digest(root or Path(__file__).parent, TRAINING_MODULES)


def training_code_drift() -> str | None:
    """None when the pinned training code is the current one at the current version, else what to do."""
    now = {"version": IDENTITY_VERSION, "digest": training_code_digest()}
    if now == TRAINING_CODE:
        return None
    return (f"the training code ({', '.join(TRAINING_MODULES)} under l3m/) is not the code IDENTITY_VERSION "
            f"{TRAINING_CODE['version']} was pinned against (pinned {TRAINING_CODE}, now {now}). If the change "
            "alters what a run computes (steps, draws, losses, weights, scores, checkpoint choice), bump "
            "IDENTITY_VERSION in l3m/identity.py with a line saying why (finished runs then retrain), then run "
            "`python -m l3m.identity pin`; if it computes the same runs, run `python -m l3m.identity pin --same-results`.")


def pin(same_results: bool, path: Path | None = None) -> str:
    """Rewrite ``TRAINING_CODE`` in this file for the current code and version."""
    path = path or Path(__file__)
    if TRAINING_CODE["version"] == IDENTITY_VERSION and not same_results and training_code_drift():
        raise SystemExit(f"IDENTITY_VERSION is still {IDENTITY_VERSION}: bump it if the change alters what a run "
                         "computes, or pass --same-results if it does not")
    line = f'TRAINING_CODE = {{"version": {IDENTITY_VERSION}, "digest": "{training_code_digest()}"}}'
    text = path.read_text(encoding="utf-8")
    start = text.index("TRAINING_CODE = {")
    path.write_text(text[:start] + line + text[text.index("\n", start):], encoding="utf-8")
    return line


RunDirState = Literal["absent", "foreign", "partial", "finished"]


def run_dir_state(run_dir: Path, run_id: str) -> RunDirState:
    """What a run directory holds for ``run_id``, read from its ``identity.json`` (not its name):
    nothing, another identity's files (or none to tell), an interrupted run, or a finished one."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "absent"
    try:
        ident = json.loads((run_dir / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return "foreign"
    if digest(ident) != run_id:
        return "foreign"
    return "finished" if (run_dir / RUN_RECORD).exists() else "partial"


def write_identity(run_dir: Path, ident: dict[str, Any]) -> None:
    tmp = run_dir / f".{IDENTITY_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(ident, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / IDENTITY_FILE)


def main(argv: list[str] | None = None) -> None:
    """``python -m l3m.identity [digest | pin [--same-results]]``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["pin"]:
        print(pin(same_results="--same-results" in args))
    elif args[:1] in (["digest"], []):
        print(training_code_digest())
        if (drift := training_code_drift()) is not None:
            print(drift, file=sys.stderr)
    else:
        raise SystemExit("usage: python -m l3m.identity [digest | pin [--same-results]]")


if __name__ == "__main__":
    main()
