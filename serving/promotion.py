"""The promotion rule: a fair comparison on one dev set, decided on evidence, not on noise.

Stored dev scores cannot be compared across versions: each was measured on the dev split of
the data its run saw, and a re-carved or re-cleaned dev set changes every number. So when the
registration gets the current dev snapshot (:class:`EvalSet`), the challenger *and* the current
production model are both scored on it here, float32, and only those predictions are compared.

One dev sample is noisy: a model that predicts the majority class everywhere but one row can
score a hair above the majority-class baseline while its test accuracy is below the majority
class's (docs/serving.md, "Promotion"). So "beats" means the paired bootstrap
interval of the difference over the dev examples (``l3m.stats.paired_bootstrap``, the same one
the results tables use) lies above 0 — above the margin, against production. A model without
that evidence against the baseline is held back with a warning and never promoted
automatically, whatever the production model scores.

Carved dev splits (``split_status`` "carved", e.g. imdb, ohsumed) add a second condition: a
changed split spec, cleaning or train file re-carves them, and a production model trained on
the old carve may have trained on rows now in dev. Production is compared only when it was
trained on the same dev rows (:func:`lineage_problem`); otherwise the comparison is marked not
fair and the challenger stays a candidate until ``promote --force``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.model_io import ModelMeta, RegistryError, load_classifier, predict

# The decisions' bootstrap: as many resamples as the results tables, a fixed seed so that a
# registration's decision is reproducible.
N_BOOT = 10_000
BOOT_SEED = 0


@dataclass(frozen=True)
class EvalSet:
    """The dev examples a registration scores models on (a validated data snapshot's dev split)."""

    texts: list[str]
    pairs: list[str] | None
    gold: list[str]  # label names
    fingerprint: str
    majority_label: str  # the train split's most frequent label
    label_names: list[str] | None = None  # the snapshot's label set, when it declares one
    carved: bool = False  # dev was carved from train (the snapshot's split_status)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.gold) or (self.pairs is not None and len(self.pairs) != len(self.texts)):
            raise RegistryError(f"dev set {self.fingerprint}: texts, pairs and labels differ in length")
        if not self.texts:
            raise RegistryError(f"dev set {self.fingerprint} is empty")

    def rows_digest(self) -> str:
        """The dev rows' content: two carves with the same digest hold out exactly the same rows."""
        pairs: list[str | None] = list(self.pairs) if self.pairs is not None else [None] * len(self.texts)
        rows = zip(self.texts, pairs, self.gold, strict=True)
        return hashlib.sha256(json.dumps(list(rows)).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Evidence:
    """Challenger minus ``against`` on the dev examples, in points (x100), with the paired
    bootstrap's ``level`` interval and permutation p-value (recorded with every decision)."""

    against: str
    diff: float
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    n_examples: int

    def beats(self, margin: float) -> bool:
        """The whole interval lies above ``margin`` (metric units, as ``registry.promote_margin``)."""
        return self.ci_low > 100 * margin

    def text(self) -> str:
        return (f"{self.diff:+.2f} points vs {self.against}, {100 * self.level:g}% CI "
                f"[{self.ci_low:+.2f}, {self.ci_high:+.2f}] over {self.n_examples} dev examples")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Evidence | None:
        return None if not data else cls(**{k: data[k] for k in cls.__dataclass_fields__})


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
    vs_baseline: Evidence | None = None  # None: no dev predictions (stored numbers), a point comparison
    vs_production: Evidence | None = None
    unfair: str | None = None  # why production cannot be compared fairly on this dev set


def metric_of(names: list[str], gold: list[str], predicted: list[str], metric: str) -> float:
    """Training's headline metric (labels present), the convention of the numbers in l3m.json."""
    # Imported here: the service imports this module (through the registry) inside a bento,
    # which ships serving/ only, without l3m and scikit-learn.
    from l3m.evaluate import headline

    ids = {n: i for i, n in enumerate(names)}
    return headline([ids[g] for g in gold], [ids[p] for p in predicted], len(names))[metric]


def dev_metric(names: list[str], gold: list[str], predicted: list[str], metric: str) -> float:
    """The metric over the model's whole label set: the observed value of the bootstrap's statistic."""
    import numpy as np

    from l3m.stats import metric_value

    ids = {n: i for i, n in enumerate(names)}
    return metric_value(np.array([ids[g] for g in gold]), np.array([ids[p] for p in predicted]), len(names),
                        metric)  # type: ignore[arg-type]


def paired(names: list[str], gold: list[str], challenger: list[str], other: list[str], against: str,
           metric: str, level: float) -> Evidence:
    """The challenger's predictions against ``other``'s on the same dev examples."""
    import numpy as np

    from l3m.stats import paired_bootstrap

    ids = {n: i for i, n in enumerate(names)}

    def enc(labels: list[str]) -> Any:
        return np.array([ids[x] for x in labels])

    c = paired_bootstrap(enc(gold), {0: enc(challenger)}, {0: enc(other)}, len(names), metric,  # type: ignore[arg-type]
                         names=("challenger", against), n_boot=N_BOOT, seed=BOOT_SEED, level=level)
    return Evidence(against, c.diff, c.ci_low, c.ci_high, level, c.p_value, c.n_examples)


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


def predict_dev(path: str | Path, dev: EvalSet, who: str) -> list[str]:
    """The model's label for every dev example, run in float32 (the precision of its offline
    evaluation), so a challenger's and production's predictions line up."""
    model, tokenizer, meta = load_classifier(path)
    check_labels(who, meta, dev)
    return [p["label"] for p in predict(model, tokenizer, meta, dev.texts, dev.pairs, dtype="float32")]


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


def lineage_problem(dev: EvalSet, who: str, fingerprint: str | None, dev_rows: str | None) -> str | None:
    """Why ``who`` may have trained on rows of a carved ``dev`` (None: it cannot have).

    ``fingerprint``: the data the model trained on (l3m.json); ``dev_rows``: the digest of the
    dev rows recorded when it was registered on its own training snapshot. Either matching the
    current dev set shows the model held out exactly these rows.
    """
    if not dev.carved or fingerprint == dev.fingerprint or dev_rows == dev.rows_digest():
        return None
    return (f"dev is carved from train and {who} was trained on other data (fingerprint {fingerprint} vs "
            f"{dev.fingerprint}; dev rows {dev_rows or 'not recorded'} vs {dev.rows_digest()}): it may have "
            "trained on rows now in dev, so the comparison is not fair")


@dataclass(frozen=True)
class Production:
    """The domain's current production model, as registration compares with it."""

    tag: str
    path: Path
    meta: ModelMeta
    dev_rows: str | None = None  # its dev rows' digest recorded at its registration (the ledger)


def gather_scores(meta: ModelMeta, src: Path, dev: EvalSet | None, production: Production | None,
                  level: float = 0.95) -> tuple[Scores, str]:
    """Challenger, baseline and production numbers (+ a note for the reason): both models
    re-scored on ``dev`` and compared pairwise at confidence ``level``; without it the numbers
    stored in l3m.json, point comparisons, said so in the note."""
    current, prod_meta = (production.tag, production.meta) if production is not None else (None, None)
    if prod_meta is not None and set(prod_meta.label_names) != set(meta.label_names):
        raise RegistryError(f"labels of {src} {sorted(meta.label_names)} differ from production {current}'s "
                            f"{sorted(prod_meta.label_names)}: the models cannot be compared")
    if dev is None:
        scores = Scores(meta.metric, meta.dev_score(), stored_baseline(meta), current,
                        prod_meta.dev_score() if prod_meta else None, meta.data_fingerprint,
                        prod_meta.data_fingerprint if prod_meta else None, "stored")
        return scores, "; no dev snapshot given: stored dev scores, best single-class baseline, no interval"
    names, metric = meta.label_names, meta.metric
    challenger = predict_dev(src, dev, "the challenger")
    majority = [dev.majority_label] * len(dev.gold)
    unfair = lineage_problem(dev, "the challenger", meta.data_fingerprint, None)
    prod_score = vs_production = None
    if production is not None and prod_meta is not None and prod_meta.metric == metric:
        unfair = unfair or lineage_problem(dev, f"production {current}", prod_meta.data_fingerprint,
                                           production.dev_rows)
        predicted = predict_dev(production.path, dev, f"production {current}")
        prod_score = dev_metric(names, dev.gold, predicted, metric)
        vs_production = paired(names, dev.gold, challenger, predicted, f"production {current}", metric, level)
    scores = Scores(metric, dev_metric(names, dev.gold, challenger, metric), dev_metric(names, dev.gold, majority, metric),
                    current, prod_score, dev.fingerprint, dev.fingerprint, "dev snapshot",
                    paired(names, dev.gold, challenger, majority, "the majority-class baseline", metric, level),
                    vs_production, unfair)
    return scores, ""


def below_baseline_warning(scores: Scores) -> str | None:
    """Why the challenger is held back against the majority-class baseline (None: it beats it)."""
    new, bar, evidence = scores.challenger, scores.baseline, scores.vs_baseline
    if new is None or bar is None:
        return None
    if evidence is None:  # stored numbers: no predictions to resample
        if new > bar:
            return None
        why = "degenerate model"
    else:
        if evidence.beats(0.0):
            return None
        why = f"{evidence.text()} does not lie above 0: no evidence it beats predicting one class"
    return (f"dev {scores.metric} {new:.4f} does not beat the majority-class baseline {bar:.4f} ({why}), "
            "not promoted automatically (`l3m models promote TAG --force` overrides)")


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
    evidence = scores.vs_production
    if scores.source == "dev snapshot" and evidence is None:
        return False, (f"no paired interval against production {current} was recorded (compared with another "
                       "production at registration): register it again on the dev snapshot, or promote --force")
    where = f"on dev snapshot {scores.fingerprint}" if scores.source == "dev snapshot" else "stored"
    verdict = f"dev {scores.metric} {new:.4f} vs production {current} {old:.4f} ({where})"
    if evidence is None:
        ok, verdict = new >= old + margin, f"{verdict} + margin {margin:g} (point comparison)"
    else:
        ok, verdict = evidence.beats(margin), f"{verdict}: {evidence.text()}, margin {margin:g}"
    return ok, verdict if ok else f"{verdict}: below the bar"


def decide(scores: Scores, margin: float, note: str = "") -> tuple[bool, str, str | None]:
    """(promote?, reason, warning): a fair comparison first, the baseline, then production."""
    if scores.unfair is not None:
        warning = f"{scores.unfair}; not promoted automatically (`l3m models promote TAG --force` overrides)"
        return False, warning + note, warning
    held_back = below_baseline_warning(scores)
    if held_back is not None:
        return False, held_back + note, held_back
    ok, reason = compare(scores, margin)
    if scores.baseline is not None:
        evidence = f" ({scores.vs_baseline.text()})" if scores.vs_baseline is not None else ""
        reason += f"; beats the majority-class baseline {scores.baseline:.4f}{evidence}"
    return ok, reason + note, None


def ledger_fields(scores: Scores, meta: ModelMeta, dev: EvalSet | None) -> dict[str, Any]:
    """What the ledger keeps of a registration's evidence and of the dev rows the model held out
    (recorded only when ``dev`` is the snapshot it trained on: a later carve is checked against it)."""
    own = dev is not None and meta.data_fingerprint == dev.fingerprint
    return {"evidence": {k: asdict(v) for k, v in (("baseline", scores.vs_baseline),
                                                     ("production", scores.vs_production)) if v is not None},
            "unfair": scores.unfair, "dev_rows": dev.rows_digest() if own and dev is not None else None,
            "dev_carved": dev.carved if dev is not None else None}


def ledger_scores(entry: dict[str, Any], current: str | None, current_entry: dict[str, Any]) -> Scores:
    """A registered version's Scores against the domain's production now, from the ledger: the
    interval recorded at registration counts only if it was measured against that production."""
    same = current is not None and entry.get("compared_with") == current
    evidence = entry.get("evidence") or {}
    if same and entry.get("evaluated_on") == "dev snapshot":
        prod_score, prod_fp = entry.get("production_dev_score"), entry.get("data_fingerprint")
    elif current_entry.get("metric") == entry.get("metric"):
        prod_score, prod_fp = current_entry.get("dev_score"), current_entry.get("data_fingerprint")
    else:
        prod_score, prod_fp = None, current_entry.get("data_fingerprint")
    return Scores(entry.get("metric", ""), entry.get("dev_score"), entry.get("baseline"), current, prod_score,
                  entry.get("data_fingerprint"), prod_fp, entry.get("evaluated_on", "stored"),
                  Evidence.from_dict(evidence.get("baseline")),
                  Evidence.from_dict(evidence.get("production")) if same else None, entry.get("unfair"))
