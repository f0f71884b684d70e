"""Metrics as the paper reports them: accuracy and macro-F1, plus per-class report and confusion."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

# Per-example offline predictions, one JSONL per split, inside the exported model directory.
PREDICTIONS_DIR = "predictions"
# Label ids as lists or as the numpy arrays Trainer hands over.
Labels = Sequence[int] | np.ndarray


def _logits(predictions: Any) -> np.ndarray:
    # Trainer hands a tuple when the model returns several tensors; the logits come first.
    return np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)


def headline(y_true: Labels, y_pred: Labels, n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over the domain's whole label set (ids ``0..n_labels-1``).

    ``labels=`` makes macro-F1 average over every declared class, also one a split lacks
    (ChemProt's test has no example of one train class): without it sklearn averages over the
    classes present in gold or predictions, so the number of classes averaged would depend on
    whether the model ever predicts the missing one, and l3m.stats (which uses the whole set)
    would disagree with the tables.
    """
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=list(range(n_labels)), average="macro", zero_division=0)),
    }


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """For ``Trainer(compute_metrics=...)``: the dev metrics early stopping watches (the label
    set is the logits' width: one column per declared class)."""
    logits = _logits(eval_pred.predictions)
    return headline(eval_pred.label_ids, logits.argmax(-1), logits.shape[-1])


def full_report(y_true: Labels, y_pred: Labels, label_names: list[str]) -> dict[str, Any]:
    """Headline metrics, per-class precision/recall/F1/support and the confusion matrix.

    Every declared label is reported, also those absent from this split (support 0), so
    reports of different splits and runs line up.
    """
    ids = list(range(len(label_names)))
    per_class = classification_report(
        y_true, y_pred, labels=ids, target_names=label_names, output_dict=True, zero_division=0
    )
    return {
        **headline(y_true, y_pred, len(label_names)),
        "n": len(y_true),
        "per_class": {name: per_class[name] for name in label_names},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "confusion_labels": label_names,
    }


def prediction_records(
    logits: Any,
    gold: Sequence[int],
    label_names: list[str],
    texts: Sequence[str],
    pairs: Sequence[str | None] | None = None,
) -> list[dict[str, Any]]:
    """One record per example of the offline evaluation: its input, gold and predicted label and
    the probability map. Kept with the model so a deployment can be checked against exactly the
    predictions its reported metrics were computed from (``l3m models verify``)."""
    z = _logits(logits).astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    if not (len(probs) == len(gold) == len(texts)):
        raise ValueError(f"{len(probs)} predictions for {len(gold)} labels and {len(texts)} texts")
    out = []
    for i, row in enumerate(probs):
        rec: dict[str, Any] = {"text": texts[i]}
        if pairs is not None:
            rec["text_pair"] = pairs[i]
        rec |= {
            "gold": label_names[int(gold[i])],
            "label": label_names[int(row.argmax())],
            "probabilities": {n: float(p) for n, p in zip(label_names, row, strict=True)},
        }
        out.append(rec)
    return out


def write_predictions(path: str | Path, records: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def report_markdown(report: dict[str, Any], title: str) -> str:
    names = report["confusion_labels"]
    lines = [f"### {title}", "", f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, n = {report['n']}", "",
             "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name in names:
        c = report["per_class"][name]
        lines.append(f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1-score']:.3f} | {int(c['support'])} |")
    lines += ["", "Confusion matrix (rows = gold, columns = predicted):", "",
              "| gold \\ pred | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def majority_baseline(train_labels: Labels, split_labels: dict[str, Labels], n_labels: int) -> dict[str, Any]:
    """The metrics of predicting the train-majority class everywhere: the bar a model must clear.

    Macro-F1 of this constant predictor is what a collapsed (one-class) classifier scores, so a
    model at or below it on dev has learned nothing usable.
    """
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    majority = int(values[counts.argmax()])
    out: dict[str, Any] = {"label": majority}
    for split, y in split_labels.items():
        out[split] = headline(y, [majority] * len(y), n_labels)
    return out
