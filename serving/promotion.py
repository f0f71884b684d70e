"""The promotion rule: a fair comparison on one dev set, and a majority-class baseline to beat.

Stored dev scores cannot be compared across versions: each was measured on the dev split of
the data its run saw, and a re-carved or re-cleaned dev set changes every number. So when the
registration gets the current dev snapshot (:class:`EvalSet`), the challenger *and* the current
production model are both scored on it here, float32, and only those two numbers are compared.
A model that does not beat "predict the train-majority class for every dev example" is
degenerate (small settings made every strategy predict one class) and is never promoted
automatically, whatever the production model scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.model_io import ModelMeta, RegistryError, load_classifier, predict


@dataclass(frozen=True)
class EvalSet:
    """The dev examples a registration scores models on (a validated data snapshot's dev split)."""

    texts: list[str]
    pairs: list[str] | None
    gold: list[str]  # label names
    fingerprint: str
    majority_label: str  # the train split's most frequent label
    label_names: list[str] | None = None  # the snapshot's label set, when it declares one

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.gold) or (self.pairs is not None and len(self.pairs) != len(self.texts)):
            raise RegistryError(f"dev set {self.fingerprint}: texts, pairs and labels differ in length")
        if not self.texts:
            raise RegistryError(f"dev set {self.fingerprint} is empty")


@dataclass(frozen=True)
class Scores:
    """What a promotion decision is based on; recorded in the ledger and the RegisterResult."""

    metric: str
    challenger: float | None
    baseline: float | None
    production: str | None = None
    production_score: float | None = None
    fingerprint: str | None = None  # the data the challenger's score was measured on
    production_fingerprint: str | None = None  # ... and production's (the same for "dev snapshot")
    source: str = "stored"  # "dev snapshot": both models scored here; "stored": numbers from l3m.json


def metric_of(names: list[str], gold: list[str], predicted: list[str], metric: str) -> float:
    # Imported here: the service imports this module (through the registry) inside a bento,
    # which ships serving/ only, without l3m and scikit-learn.
    from l3m.evaluate import headline

    ids = {n: i for i, n in enumerate(names)}
    return headline([ids[g] for g in gold], [ids[p] for p in predicted], len(names))[metric]


def check_labels(who: str, meta: ModelMeta, dev: EvalSet) -> None:
    """Refuse a comparison on a dev set whose labels the model does not have (or the other way)."""
    declared = set(dev.label_names) if dev.label_names is not None else set(dev.gold)
    if dev.label_names is not None and declared != set(meta.label_names):
        raise RegistryError(f"{who} labels {sorted(meta.label_names)} differ from the dev snapshot's "
                            f"{sorted(declared)} (fingerprint {dev.fingerprint}): scores are not comparable")
    unknown = (set(dev.gold) | {dev.majority_label}) - set(meta.label_names)
    if unknown:
        raise RegistryError(f"{who} has no label {sorted(unknown)} present in the dev snapshot "
                            f"(fingerprint {dev.fingerprint}); its labels are {sorted(meta.label_names)}")
    if meta.text_pair != (dev.pairs is not None):
        raise RegistryError(f"{who} is {'a pair' if meta.text_pair else 'a single-text'} model but the dev "
                            f"snapshot {'has no' if meta.text_pair else 'has'} text pairs")


def score_model(path: str | Path, dev: EvalSet, who: str) -> tuple[ModelMeta, float]:
    """(meta, the model's metric on ``dev``): loaded from ``path`` and run in float32, the
    precision its offline evaluation used, so a challenger's and production's numbers line up."""
    model, tokenizer, meta = load_classifier(path)
    check_labels(who, meta, dev)
    preds = predict(model, tokenizer, meta, dev.texts, dev.pairs, dtype="float32")
    return meta, metric_of(meta.label_names, dev.gold, [p["label"] for p in preds], meta.metric)


def majority_baseline(meta: ModelMeta, dev: EvalSet) -> float:
    """The metric of predicting the train-majority class for every dev example."""
    return metric_of(meta.label_names, dev.gold, [dev.majority_label] * len(dev.gold), meta.metric)


def stored_baseline(meta: ModelMeta) -> float | None:
    """Without a dev snapshot: the best single-class predictor on the model's own dev split,
    from the confusion matrix training stored (rows = gold). The train-majority class is not
    recorded in l3m.json, and the best constant is at least as strong, so this bar is never
    lower than the snapshot one. None when the matrix is absent."""
    dev = meta.metrics.get("dev", {})
    matrix: Any = dev.get("confusion_matrix")
    names: Any = dev.get("confusion_labels") or meta.label_names
    if not isinstance(matrix, list) or len(matrix) != len(names):
        return None
    gold = [name for name, row in zip(names, matrix, strict=True) for _ in range(int(sum(row)))]
    if not gold:
        return None
    return max(metric_of(list(names), gold, [c] * len(gold), meta.metric) for c in names)


def below_baseline_warning(scores: Scores) -> str | None:
    if scores.challenger is None or scores.baseline is None or scores.challenger > scores.baseline:
        return None
    return (f"dev {scores.metric} {scores.challenger:.4f} does not beat the majority-class baseline "
            f"{scores.baseline:.4f}: degenerate model, not promoted automatically "
            "(`l3m models promote TAG --force` overrides)")


def compare(scores: Scores, margin: float) -> tuple[bool, str]:
    """Whether the challenger beats production by ``margin`` on the same data, and why."""
    new, old, current = scores.challenger, scores.production_score, scores.production
    if current is None:
        return True, "first model of the domain"
    if new is None or old is None:
        return False, f"dev {scores.metric} missing for the challenger or production {current}"
    if scores.production_fingerprint != scores.fingerprint:
        return False, (f"dev scores of the challenger and production {current} were measured on different "
                       f"dev data (fingerprint {scores.fingerprint} vs {scores.production_fingerprint}): "
                       "not comparable; register with the dev snapshot (pipeline) or promote --force")
    where = f"on dev snapshot {scores.fingerprint}" if scores.source == "dev snapshot" else "stored"
    verdict = (f"dev {scores.metric} {new:.4f} vs production {current} {old:.4f} ({where}) "
               f"+ margin {margin:g}")
    if new >= old + margin:
        return True, verdict
    return False, f"{verdict}: below the bar"


def gather_scores(meta: ModelMeta, src: Path, dev: EvalSet | None,
                  production: tuple[str, Path, ModelMeta] | None) -> tuple[Scores, str]:
    """Challenger, baseline and production numbers (+ a note for the reason): both models
    re-scored on ``dev``; without it the numbers stored in l3m.json, said so in the note.
    ``production``: (tag, store path, meta) of the domain's current production, if any."""
    current, path, prod_meta = production if production is not None else (None, None, None)
    if prod_meta is not None and set(prod_meta.label_names) != set(meta.label_names):
        raise RegistryError(f"labels of {src} {sorted(meta.label_names)} differ from production {current}'s "
                            f"{sorted(prod_meta.label_names)}: the models cannot be compared")
    if dev is None:
        scores = Scores(meta.metric, meta.dev_score(), stored_baseline(meta), current,
                        prod_meta.dev_score() if prod_meta else None, meta.data_fingerprint,
                        prod_meta.data_fingerprint if prod_meta else None, "stored")
        return scores, "; no dev snapshot given: stored dev scores, best single-class baseline"
    _, challenger = score_model(src, dev, "the challenger")
    prod_score = None
    if path is not None and prod_meta is not None and prod_meta.metric == meta.metric:
        prod_score = score_model(path, dev, f"production {current}")[1]
    scores = Scores(meta.metric, challenger, majority_baseline(meta, dev), current, prod_score,
                    dev.fingerprint, dev.fingerprint, "dev snapshot")
    return scores, ""


def decide(scores: Scores, margin: float, note: str = "") -> tuple[bool, str, str | None]:
    """(promote?, reason, warning): the baseline first, then production on the same data."""
    warning = below_baseline_warning(scores)
    if warning is not None:
        return False, warning + note, warning
    ok, reason = compare(scores, margin)
    if scores.baseline is not None:
        reason += f"; beats the majority-class baseline {scores.baseline:.4f}"
    return ok, reason + note, None
