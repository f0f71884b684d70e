"""Run and domain configuration: one pydantic model, loaded from YAML, drives a run.

Every model uses ``extra="forbid"`` so a typo in a YAML file is an error, not a silently
ignored key. Strategy sections are discriminated unions on ``kind`` so a YAML file picks the
implementation (see ``l3m.masking`` and ``l3m.tuning`` for the registries behind them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Where relative data/model locations resolve when the config does not say otherwise. The
# default points at the assets shipped beside a checkout (``../shared``); users with internet
# pass hub names / URLs, which are used as given.
ENV_DATA_ROOT = "L3M_DATA_ROOT"
ENV_MODEL_ROOT = "L3M_MODEL_ROOT"
ENV_OUTPUT_ROOT = "L3M_OUTPUT_ROOT"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = PROJECT_ROOT.parent / "shared"


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message says where."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, protected_namespaces=())


class SplitSource(Strict):
    """Where one split comes from: a local path (relative to the data root) or a URL."""

    path: str
    format: Literal["jsonl", "json", "csv", "parquet", "auto"] = "auto"

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffix = self.path.split("?")[0].rsplit(".", 1)[-1].lower()
        mapping = {"jsonl": "jsonl", "json": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet"}
        if suffix not in mapping:
            raise ConfigError(f"cannot infer the format of {self.path!r}; set format: jsonl|csv|parquet")
        return mapping[suffix]


class SplitSpec(Strict):
    """How to make a missing dev/test split: a seeded, stratified carve-out of train."""

    dev_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 42


class CleaningSpec(Strict):
    """Repairs applied after the raw data is validated; the checks then run again on the result.

    Each repair is off by default: a domain opts in, so the validation report always shows the
    raw problem and the repair that handled it. Repairs act on train only: the standard dev/test
    splits stay exactly as shipped (published numbers are computed on them) unless
    ``eval_splits`` is set, and the report then says they are no longer the standard splits.
    For a pair domain an example is its (text, text_pair) pair in every repair.
    """

    drop_empty: bool = False  # rows whose text (or pair) or label is null or blank
    unescape_html: bool = False  # &amp; -> &, <br> -> space
    dedupe: bool = False  # exact (text, pair, label) duplicates within a split; conflicting labels dropped
    drop_leaked_from_train: bool = False  # train rows whose text/pair also appears in dev/test (never dev/test rows)
    eval_splits: bool = False  # also clean dev/test with the repairs above (they stop being the standard splits)
    dedupe_unlabelled: bool = False  # drop repeated lines of the unlabelled corpus (blank lines are always skipped)


Severity = Literal["error", "warning", "off"]


class ValidationSpec(Strict):
    """Thresholds of the data checks (l3m.data.validation). Errors stop a run, warnings report.

    Defaults: texts of ``min_chars`` (1) to ``max_chars`` (100,000) characters (also the corpus
    lines); at least ``min_rows_per_split`` (10) rows per split and ``min_examples_per_class`` (5)
    train examples per class; ``max_imbalance_ratio`` (50): the largest train class may have at
    most 50 times the examples of the smallest before ``class_imbalance`` fails (a warning by
    default; the observed ratio is always in the report). See docs/validation.md.
    """

    min_chars: int = 1
    max_chars: int = 100_000
    min_rows_per_split: int = 10
    min_examples_per_class: int = 5
    max_imbalance_ratio: float = 50.0
    # Per-check severity overrides, e.g. {train_test_leakage: warning}; see checks.CHECKS.
    severity: dict[str, Severity] = Field(default_factory=dict)

    @field_validator("severity")
    @classmethod
    def _known_checks(cls, v: dict[str, Severity]) -> dict[str, Severity]:
        # A misspelt check name would otherwise be ignored silently. Imported here: the checks
        # module imports this one.
        from l3m.data.checks import CHECKS

        unknown = sorted(set(v) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; the checks are {sorted(CHECKS)}")
        return v


class DomainConfig(Strict):
    """A labelled text-classification domain."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    description: str = ""
    data_root: str | None = None  # default: $L3M_DATA_ROOT or ../shared/data
    splits: dict[Literal["train", "dev", "test"], SplitSource]
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    # Declared label set; when absent it is the sorted set of labels seen in train.
    labels: list[str] | None = None
    unlabelled: SplitSource | None = None  # plain-text in-domain corpus, one text per line
    metric: Literal["accuracy", "macro_f1"] = "macro_f1"
    # What the MLM side (vanilla scores, masking, the masked batch) reads of a text; the
    # classifier always reads it as shipped. "authors": the L3Masking authors' ChemProt
    # preprocessing (spaces around , . - and the entity markers << >> [[ ]] removed), see
    # l3m.data.transforms. Not part of the data snapshot; part of MLM runs' identity when set.
    mlm_text: Literal["raw", "authors"] = "raw"
    split_spec: SplitSpec = Field(default_factory=SplitSpec)
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)

    @field_validator("splits")
    @classmethod
    def _needs_train(cls, v: dict[str, SplitSource]) -> dict[str, SplitSource]:
        if "train" not in v:
            raise ValueError("splits must include 'train'")
        return v

    def resolve(self, location: str) -> str:
        """Resolve a split/corpus location: URLs and absolute paths as given, else under data_root."""
        if "://" in location or os.path.isabs(location):
            return location
        root = self.data_root or os.environ.get(ENV_DATA_ROOT) or str(DEFAULT_SHARED / "data")
        return str(Path(root) / location)


class ModelSpec(Strict):
    """The pretrained masked LM. A hub name (``roberta-base``) or a local path."""

    name_or_path: str = "minilm-l6-mlm"
    revision: str | None = None
    max_length: int = Field(128, ge=8, le=4096)
    # The classification head. "auto": the checkpoint's own sequence-classification head (BERT:
    # pooler -> dropout -> linear; RoBERTa: dropout -> dense+tanh -> dropout -> linear).
    # "authors": the L3Masking authors' head, CLS -> dropout -> dense+tanh -> dropout -> linear,
    # freshly initialised (l3m.optim.apply_head; the exported model stays a plain transformers one).
    head: Literal["auto", "authors"] = "auto"

    def resolved(self) -> str:
        """A bare name that exists under the model root resolves there (offline default)."""
        p = Path(self.name_or_path)
        if p.is_absolute() or p.exists():
            return str(p)
        root = Path(os.environ.get(ENV_MODEL_ROOT) or DEFAULT_SHARED / "models")
        if (root / self.name_or_path).exists():
            return str(root / self.name_or_path)
        return self.name_or_path  # a hub id: transformers resolves it


class ScoringSpec(Strict):
    """Vanilla-model token likelihood (PLL) scoring, see l3m.scoring."""

    metric: Literal["original", "within_word_l2r"] = "within_word_l2r"
    mode: Literal["exact", "strided"] = "exact"
    stride: int = Field(4, ge=2)  # k for the strided (k-pass) approximation
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    token_budget: int = Field(8192, ge=256)
    shard_size: int = Field(256, ge=1)
    limit: int | None = Field(None, ge=1)  # score only the first N texts per split (smoke runs)
    # Scoring covers what training reads: the train rows runs train on (+ the unlabelled corpus
    # when used). shift_summary also scores dev/test, for the per-split mean log-likelihood
    # (how surprised the vanilla model is by each split).
    shift_summary: bool = False
    store_dir: str | None = None  # default: <output_root>/scores


class MaskingSpec(Strict):
    kind: Literal["none", "random", "l3", "selective"] = "l3"
    rate: float = Field(0.15, gt=0, lt=1)
    mode: Literal["paper", "calibrated"] = "calibrated"  # l3 only
    whole_word: bool = False
    delta: float = 0.0  # selective only: confidence gain threshold (Gu et al. 2020)
    mask_replace: float = 0.8
    random_replace: float = 0.1


class TunerSpec(Strict):
    kind: Literal["full", "child_f", "child_d", "weight_mask", "lora"] = "full"
    reserve_p: float = Field(0.3, gt=0, le=1)  # child_f / child_d
    scope: str = "layer"  # child_d: parameter-name substring of the Fisher-selected set
    tau: float = 0.01  # weight_mask threshold
    initial_sparsity: float = Field(0.05, ge=0, lt=1)
    train_head: bool = True
    mask_lr: float = 1e-3
    # lora (peft): rank, alpha (scaling alpha / rank), dropout on the adapter's input, and the
    # last name parts of the encoder-layer linears to adapt (None: peft's default for the family,
    # e.g. BERT/RoBERTa query + value). lora_lr: the adapters' lr (None: training.lr).
    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = None
    lora_lr: float | None = Field(None, gt=0)

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(v.strip() for v in value)):
            raise ValueError("target_modules: a non-empty list of module names (e.g. [query, value]), or omit it "
                             "for the family's default")
        return value


# The TunerSpec fields the lora tuner reads: its identity holds these only, and every other
# tuner's identity leaves the lora fields out (so adding them changed no existing run id).
LORA_FIELDS = frozenset({"kind", "rank", "alpha", "dropout", "target_modules", "lora_lr", "train_head"})


class Stage2Spec(Strict):
    """Classification-only fine-tuning from the best stage-1 checkpoint (L3Masking's second stage:
    the paper's numbers are after it). Constant lr, dev metric every epoch, early stopping; its
    result replaces stage 1's only when its best dev score is higher (the authors' rule)."""

    epochs: int = Field(10, ge=1)
    lr: float = Field(5e-6, gt=0)
    patience: int = Field(3, ge=1)


class TrainingSpec(Strict):
    # Result runs default to 5 seeds: the results table's confidence intervals need them.
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], min_length=1)
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0: a step budget (optimizer steps) that overrides epochs
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)  # encoder (and MLM head)
    weight_decay: float = 0.01
    # The classification head's own lr / weight decay (None: as the encoder). The authors train
    # a fresh head at 1e-3 with weight decay 0.1 against 1e-4 for the pretrained encoder.
    head_lr: float | None = Field(None, gt=0)
    head_weight_decay: float | None = Field(None, ge=0)
    # True: the head's biases are decayed too (at head_weight_decay), as in the authors' code,
    # whose head AdamW decays every head parameter (run_mlm_auxiliary_PLT-Masking.py,
    # classifier_optim with classf_wd 0.1 and no no-decay group). The paper profiles set it.
    head_bias_decay: bool = False
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_ratio: float = 0.06
    mlm_weight: float = Field(1.0, ge=0)  # lambda in L = L_cls + lambda * L_mlm
    use_unlabelled: bool = False
    # The MLM batch: "same" = a masked copy of the classification batch's texts; "independent" =
    # as many train texts drawn on their own (the L3Masking authors' separate MLM iterator).
    mlm_batch: Literal["same", "independent"] = "same"
    # Counted in evaluations: epochs, or eval_steps optimizer steps when that is set.
    early_stopping_patience: int = Field(3, ge=1)
    # Which of several evaluations tied at the best dev score is kept, in both stages: "earliest"
    # (transformers: only a strictly higher score is a new best, and resets the patience) or
    # "latest" (the L3Masking authors: they save on >= and stop only when the last `patience`
    # evaluations are all strictly below the best). The paper profiles use "latest".
    ties: Literal["earliest", "latest"] = "earliest"
    eval_steps: int | None = Field(None, ge=1)
    stage2: Stage2Spec | None = None
    fp16_on_cuda: bool = True
    train_limit: int | None = Field(None, ge=1)  # subsample train (smoke runs)


# --- loss weighting (l3m.weighting) ---------------------------------------------------------
class WeightingSpec(Strict):
    """How the classification and MLM losses are weighted (l3m.weighting, docs/training.md).

    ``fixed``: L = L_cls + training.mlm_weight * L_mlm (the default, the paper's equation).
    ``meta_tartan``: task weights learned online against a dev head (Dery et al. 2021); the
    other fields are its settings, with the L3Masking authors' values as defaults.
    """

    kind: Literal["fixed", "meta_tartan"] = "fixed"
    meta_lr: float = Field(1e-2, gt=0)  # step size on the task-weight logits
    dev_samples: int = Field(32, ge=1)  # dev rows the dev head is fitted on (once per optimizer step)
    dev_batch_size: int = Field(64, ge=1)  # dev rows of the dev gradient (once per micro-batch)
    head_iters: int = Field(10, ge=1)  # most AdamW iterations fitting the dev head
    head_lr: float = Field(1e-3, gt=0)
    head_weight_decay: float = Field(0.1, ge=0)
    head_tol: float = Field(1e-3, ge=0)  # stop fitting when the loss changes by less than this
# --- end loss weighting ----------------------------------------------------------------------


class RegistrySpec(Strict):
    """Promotion (serving.promotion): the challenger must beat the majority-class baseline, and the
    current production by ``promote_margin`` (metric units), with a paired bootstrap interval at
    ``promote_confidence`` over the dev examples that lies above the bar."""

    promote_margin: float = 0.0
    promote_confidence: float = Field(0.95, gt=0, lt=1)
    build_bento: bool = False
    # One bento of every domain's production version over their shared bases
    # (flows.multi_bento), rebuilt after this registration when a version changed.
    multi_bento: bool = False


class RunConfig(Strict):
    """A whole run: one domain, one base model and the strategies to compare."""

    domain: DomainConfig
    model: ModelSpec = Field(default_factory=ModelSpec)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    strategies: list[MaskingSpec] = Field(default_factory=lambda: [MaskingSpec()])
    tuners: list[TunerSpec] = Field(default_factory=lambda: [TunerSpec()])
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    weighting: WeightingSpec = Field(default_factory=WeightingSpec)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    output_dir: str | None = None  # default: $L3M_OUTPUT_ROOT/<domain> or ./runs/<domain>

    @model_validator(mode="after")
    def _unique_strategies(self) -> RunConfig:
        for name, specs in (("strategies", self.strategies), ("tuners", self.tuners)):
            kinds = [s.kind for s in specs]
            if len(kinds) != len(set(kinds)):
                raise ValueError(f"{name} repeat a kind: {kinds}")
        if self.training.mlm_batch == "independent" and self.training.use_unlabelled:
            raise ValueError("training.mlm_batch=independent draws MLM texts from train; it does not combine "
                             "with training.use_unlabelled")
        if self.domain.mlm_text != "raw" and any(s.kind == "selective" for s in self.strategies):
            raise ValueError(f"domain.mlm_text={self.domain.mlm_text} does not combine with the selective strategy "
                             "(its picks are rated on the classifier's text); use mlm_text: raw")
        others = [t.kind for t in self.tuners if t.kind != "full"]
        if self.training.stage2 is not None and others:
            raise ValueError(f"training.stage2 runs with the full tuner only (the paper's recipe); remove it or "
                             f"the tuners {others}")
        return self

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        root = os.environ.get(ENV_OUTPUT_ROOT) or str(Path.cwd() / "runs")
        return Path(root) / self.domain.name

    def score_store_dir(self) -> Path:
        if self.scoring.store_dir:
            return Path(self.scoring.store_dir)
        root = os.environ.get(ENV_OUTPUT_ROOT) or str(Path.cwd() / "runs")
        return Path(root) / "scores"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings; values are parsed as YAML (so ``3``, ``true``, ``[1,2]`` work)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML.

    A file that holds just a domain (top-level ``name``/``splits``) is wrapped as
    ``{"domain": ...}`` so ``domains/*.yaml`` work directly as run configs. A ``domain`` value
    that is a string is a path to a domain file, relative to the run config.
    """
    p = Path(path)
    data = _read_yaml(p)
    if "splits" in data and "domain" not in data:
        data = {"domain": data}
    if isinstance(data.get("domain"), str):
        data["domain"] = _read_yaml((p.parent / data["domain"]).resolve())
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{p}: invalid config"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  - {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
