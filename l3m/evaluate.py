"""Metrics as the paper reports them: accuracy and macro-F1, plus per-class report and confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def _preds(logits: Any) -> np.ndarray:
    if isinstance(logits, tuple):  # Trainer hands a tuple when the model returns several tensors
        logits = logits[0]
    return np.asarray(logits).argmax(-1)


def headline(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """For ``Trainer(compute_metrics=...)``: the dev metrics early stopping watches."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    return headline(labels, _preds(logits))


def full_report(y_true: Sequence[int], y_pred: Sequence[int], label_names: list[str]) -> dict[str, Any]:
    """Headline metrics, per-class precision/recall/F1/support and the confusion matrix.

    Every declared label is reported, also those absent from this split (support 0), so
    reports of different splits and runs line up.
    """
    ids = list(range(len(label_names)))
    per_class = classification_report(
        y_true, y_pred, labels=ids, target_names=label_names, output_dict=True, zero_division=0
    )
    return {
        **headline(y_true, y_pred),
        "n": len(y_true),
        "per_class": {name: per_class[name] for name in label_names},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "confusion_labels": label_names,
    }


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
