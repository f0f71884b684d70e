"""Reading a trained model directory and running it: the one place serving touches weights.

The registry (what gets copied into the BentoML store), the service (what gets loaded in
``__init__``) and the tests (offline predictions) all go through these functions, so a model
format change — e.g. a ``weight_mask`` run that stores a bit-packed mask and a head instead of
full weights — is handled here once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.textbound import Encoded, encode_inputs

logger = logging.getLogger("l3m.serving")

META_FILE = "l3m.json"
# Keys of l3m.json the registry and the service rely on (architecture.md, "Trained model directory").
REQUIRED_KEYS = ("domain", "label_names", "metrics", "base_model", "max_length", "strategy", "tuner")
# Pickle-based weight files are refused: loading them executes arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown tag, nothing to roll back to, ...).

    Defined here so that ModelDirError is one too: the CLI catches a single error type.
    """


class ModelDirError(RegistryError, ValueError):
    """A model directory that does not satisfy the trained-model contract."""


@dataclass(frozen=True)
class ModelMeta:
    """The parsed ``l3m.json``; ``raw`` keeps every key (also ones added later by training)."""

    domain: str
    label_names: list[str]
    metrics: dict[str, dict[str, float]]
    metric: str
    strategy: str
    tuner: str
    base_model: str
    base_revision: str | None
    max_length: int
    text_pair: bool
    data_fingerprint: str | None
    score_key: str | None
    code_version: str | None
    config: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def headline_metrics(self) -> dict[str, dict[str, float]]:
        """Per split, only the scalar metrics (training also stores per-class tables, confusion matrices)."""
        return {split: {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}
                for split, m in self.metrics.items()}

    def dev_score(self) -> float | None:
        value = self.metrics.get("dev", {}).get(self.metric)
        return None if value is None else float(value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ModelDirError(f"{META_FILE} lacks {missing}")
        labels = data["label_names"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ModelDirError(f"{META_FILE}: label_names must be a non-empty list of strings")
        metrics = data["metrics"]
        if not isinstance(metrics, dict):
            raise ModelDirError(f"{META_FILE}: metrics must be a mapping {{split: {{name: value}}}}")
        return cls(
            domain=str(data["domain"]),
            label_names=list(labels),
            metrics={str(k): dict(v) for k, v in metrics.items()},
            # macro_f1 is the config default (l3m.config.DomainConfig.metric).
            metric=str(data.get("metric") or "macro_f1"),
            strategy=_kind(data["strategy"]),
            tuner=_kind(data["tuner"]),
            base_model=str(data["base_model"]),
            base_revision=data.get("base_revision"),
            max_length=int(data["max_length"]),
            text_pair=bool(data.get("text_pair", False)),
            data_fingerprint=data.get("data_fingerprint"),
            score_key=data.get("score_key"),
            code_version=data.get("code_version"),
            config=dict(data.get("config") or {}),
            raw=dict(data),
        )


def _kind(spec: Any) -> str:
    # Training stores the whole strategy/tuner spec ({"kind": "l3", "rate": ...}); names are its kind.
    return str(spec.get("kind")) if isinstance(spec, dict) else str(spec)


def read_meta(model_dir: str | Path) -> ModelMeta:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {META_FILE}; not a trained model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return ModelMeta.from_dict(data)


def check_model_dir(model_dir: str | os.PathLike[str]) -> ModelMeta:
    """Validate a directory before it is registered: metadata, safetensors weights, no pickles."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"{model_dir}: not a directory")
    meta = read_meta(root)
    pickles = sorted(p.name for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelDirError(f"{model_dir}: pickle-based files are not accepted (safetensors only): {pickles}")
    if not any(root.glob("*.safetensors")):
        raise ModelDirError(f"{model_dir}: no *.safetensors weights")
    if not (root / "config.json").is_file():
        raise ModelDirError(f"{model_dir}: no config.json (save_pretrained output expected)")
    if meta.dev_score() is None:
        raise ModelDirError(f"{model_dir}: metrics.dev.{meta.metric} missing; promotion needs it")
    return meta


def load_classifier(model_path: str | Path, base_path_of: Callable[[str], str | Path] | None = None
                    ) -> tuple[Any, Any, ModelMeta]:
    """(model in eval mode, tokenizer, meta) from a trained model directory or a store copy.

    Full-weight directories load with ``from_pretrained(use_safetensors=True)``; a compact
    ``weight_mask`` / ``lora`` domain (masks or adapters + head) is rebuilt over its base
    (``serving.bases``: a store copy's base is found by ``base_path_of(tag)``, by default in the
    registry's store), so callers never learn the difference.
    """
    from transformers import AutoTokenizer

    from serving.bases import load_model  # it reads this module's types

    root = Path(model_path)
    meta = read_meta(root)
    model = load_model(root, base_path_of)
    tokenizer = AutoTokenizer.from_pretrained(str(root))
    n_out = int(model.config.num_labels)
    if n_out != len(meta.label_names):
        raise ModelDirError(f"{root}: model has {n_out} outputs, {META_FILE} names {len(meta.label_names)} labels")
    return model, tokenizer, meta


# Padded tokens per forward pass when a batch is split by length (see predict).
CHUNK_TOKENS = 512


SERVING_DTYPES = ("float32", "bfloat16", "float16")


def amp_dtype(name: str) -> Any:
    """Serving dtype name -> the autocast dtype, or None for plain float32."""
    import torch

    if name not in SERVING_DTYPES:
        raise ValueError(f"unknown serving dtype {name!r}; expected one of {list(SERVING_DTYPES)}")
    return None if name == "float32" else getattr(torch, name)


def serving_dtype(name: str, device_type: str) -> str:
    """The dtype that will actually run: ``name``, or float32 (logged) on a CPU with no
    oneDNN kernel for it, where autocast would fall to reference loops slower than float32."""
    amp = amp_dtype(name)
    if amp is None or device_type != "cpu":
        return name
    from serving.cpu_probe import low_precision_supported

    if low_precision_supported(amp):
        return name
    logger.warning("serving: %s requested, but this CPU has no oneDNN %s kernel (needs AVX512-BF16, AMX or "
                   "AVX-NE-CONVERT); using float32", name, name)
    return "float32"


def predict(
    model: Any,
    tokenizer: Any,
    meta: ModelMeta,
    texts: list[str],
    pairs: list[str] | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    dtype: str = "float32",
    max_chars: int | None = None,
) -> list[dict[str, Any]]:
    """Label, score, probability map and truncation flag per text, in input order.

    Encoding is the project-wide ``tokenizer(text, text_pair, truncation=True,
    max_length=meta.max_length)`` so served predictions equal offline ones. A batch is sorted
    by length and cut into forward passes of at most ``chunk_tokens`` padded tokens: padding a
    whole merged batch to its longest text wasted more compute (measured ~2x on
    citation_intent, lengths 10-128) than batching saved.

    ``dtype`` other than float32 runs the forward under autocast (bf16 on CPUs with AMX /
    AVX512-BF16, or on GPUs): weights stay float32, matmuls run in the low dtype. Not bit-equal
    to the float32 evaluation; docs/serving.md has the measured agreement.

    A long text is first replaced by a prefix that provably encodes the same
    (``serving.textbound``), so the tokenizer's work per text is bounded; ``max_chars`` (the
    service's per-text limit) refuses texts for which no such prefix exists within it, None
    (offline use) tokenizes them whole.
    """
    return predict_encoded(model, tokenizer, meta, encode_inputs(tokenizer, meta.max_length, max_chars, texts, pairs),
                           chunk_tokens, dtype)


def predict_encoded(model: Any, tokenizer: Any, meta: ModelMeta, rows: list[Encoded],
                    chunk_tokens: int = CHUNK_TOKENS, dtype: str = "float32") -> list[dict[str, Any]]:
    """``predict`` on inputs already encoded (``serving.textbound.encode_inputs``): the model's
    part only, which is what the service's batch thread runs."""
    import torch

    amp = amp_dtype(dtype)
    probs: list[list[float]] = [[] for _ in rows]
    for chunk in _length_chunks([len(r.features["input_ids"]) for r in rows], chunk_tokens):
        batch = tokenizer.pad({k: [rows[i].features[k] for i in chunk] for k in rows[chunk[0]].features},
                              return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast(model.device.type, dtype=amp, enabled=amp is not None):
            logits = model(**batch).logits
        for i, row in zip(chunk, torch.softmax(logits.float(), dim=-1).tolist(), strict=True):
            probs[i] = row
    labels = meta.label_names
    out = []
    for row, enc in zip(probs, rows, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        out.append(
            {
                "label": labels[best],
                "score": row[best],
                "probabilities": dict(zip(labels, row, strict=True)),
                "truncated": enc.truncated,
            }
        )
    return out


def _length_chunks(lengths: list[int], chunk_tokens: int) -> list[list[int]]:
    """Row indices grouped by similar length, each group's padded size within chunk_tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newest row is the longest: padded size = rows * its length.
        if current and (len(current) + 1) * lengths[i] > chunk_tokens:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks
