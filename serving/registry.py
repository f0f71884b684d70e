"""Model registry: trained model directories in the BentoML model store, plus promotion.

Each trained classifier is saved as ``l3m-<domain>:<version>`` with its provenance as BentoML
metadata and ``domain``/``strategy``/``tuner``/``stage`` labels. BentoML labels cannot be
changed after saving, so the ``stage`` label is the stage decided at registration; the
current stage and the promotion history are kept in the ledger (``serving.ledger``) and that
is what :func:`list_models`, :func:`show` and :func:`production_tag` report.

Promotion rule (``serving.promotion``): a version becomes ``production`` for its domain only if
it beats the majority-class baseline and the current production plus a margin, both on the same
dev data (the snapshot given to :func:`register`, on which production is re-scored) and with a
paired bootstrap interval over the dev examples that lies above the bar; otherwise it stays
``candidate`` and the reason, the intervals (and for a model held back, a warning) are recorded.
:func:`rollback` restores the previous production.

``BENTOML_HOME`` selects the store; it is re-read on every call (not cached the way BentoML's
own container caches it) so the CLI, flows and tests can point at different stores.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.bases import check_base, copy_model_dir, store_base
from serving.ledger import add_event, domain_state, locked_ledger, now_iso, read_ledger
from serving.model_io import ModelDirError, ModelMeta, RegistryError, check_model_dir, load_classifier
from serving.promotion import (
    EvalSet,
    Production,
    Scores,
    decide,
    gather_scores,
    ledger_fields,
    ledger_scores,
    stored_baseline,
)

__all__ = [
    "EvalSet",
    "ModelDirError",
    "RegisterResult",
    "RegistryError",
    "list_models",
    "load_classifier",
    "model_name",
    "production_tag",
    "has_model",
    "promote",
    "register",
    "rollback",
    "show",
]

NAME_PREFIX = "l3m-"
PRODUCTION = "production"
CANDIDATE = "candidate"
ARCHIVED = "archived"  # was production, superseded by a newer promotion


@dataclass(frozen=True)
class RegisterResult:
    """Outcome of register / promote / rollback: where ``tag`` stands now and why.

    ``dev_score`` and ``production_dev_score`` were measured on the same data (``data_fingerprint``)
    when ``evaluated_on`` is "dev snapshot"; ``baseline`` is the majority-class bar the model had
    to beat, ``warning`` says why a model was held back as degenerate.
    """

    tag: str
    domain: str
    stage: str
    promoted: bool
    reason: str
    metric: str
    dev_score: float | None
    previous_production: str | None
    baseline: float | None = None
    compared_with: str | None = None
    production_dev_score: float | None = None
    data_fingerprint: str | None = None
    evaluated_on: str = "stored"
    warning: str | None = None
    evidence: dict[str, Any] | None = None  # the paired intervals vs baseline / production (points)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_name(domain: str) -> str:
    return f"{NAME_PREFIX}{domain}"


def registry_home() -> Path:
    """The BentoML home in effect now (same default as BentoML: ``~/bentoml``)."""
    return Path(os.path.expandvars(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml"))


def _store() -> Any:
    # A store object per call, rooted at the current BENTOML_HOME (see module docstring).
    from bentoml._internal.models import ModelStore

    models = registry_home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(models))


def _get(tag: str) -> Any:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag, _model_store=_store())
    except NotFound as e:
        raise RegistryError(f"no model {tag!r} in the store at {registry_home()}") from e


def model_path(tag: str) -> Path:
    """Where ``tag``'s files are in the store."""
    return Path(_get(tag).path)


def has_model(tag: str) -> bool:
    """Whether ``tag`` is (still) in the store."""
    try:
        _get(tag)
    except RegistryError:
        return False
    return True


def _clean(value: Any) -> Any:
    # BentoML metadata accepts only basic types and no None: drop None-valued keys (readers
    # use .get(), so an absent key reads back as None).
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value if v is not None]
    return value


def _metadata(meta: ModelMeta) -> dict[str, Any]:
    # All of l3m.json (full strategy/tuner specs, per-class reports, seed, ...) plus the
    # normalised names, so `bentoml models get` alone tells what a version is.
    return _clean(meta.raw | {"strategy_kind": meta.strategy, "tuner_kind": meta.tuner, "metric": meta.metric})


def _scores(ledger: dict[str, Any], meta: ModelMeta, src: Path, dev: EvalSet | None,
            confidence: float) -> tuple[Scores, str]:
    """``gather_scores`` against the domain's production; one deleted from the store counts as none."""
    current = domain_state(ledger, meta.domain)["production"]
    if current is None:
        return gather_scores(meta, src, dev, None, confidence)
    try:
        model = _get(current)
    except RegistryError:
        scores, note = gather_scores(meta, src, dev, None, confidence)
        return scores, f"{note}; production {current} is no longer in the store"
    production = Production(current, Path(model.path), ModelMeta.from_dict(dict(model.info.metadata)),
                            ledger["models"].get(current, {}).get("dev_rows"))
    return gather_scores(meta, src, dev, production, confidence)


def _make_production(ledger: dict[str, Any], tag: str, domain: str, reason: str) -> str | None:
    state = domain_state(ledger, domain)
    previous = state["production"]
    if previous is not None and previous in ledger["models"]:
        ledger["models"][previous].update(stage=ARCHIVED, reason=f"superseded by {tag}")
    state["production"] = tag
    if not state["history"] or state["history"][-1] != tag:
        state["history"].append(tag)
    ledger["models"][tag].update(stage=PRODUCTION, reason=reason)
    return previous


def register(
    model_dir: str | os.PathLike[str], *, promote_margin: float = 0.0, dev: EvalSet | None = None,
    confidence: float = 0.95,
) -> RegisterResult:
    """Copy a trained model directory into the store and apply the promotion rule.

    With ``dev`` (the current dev snapshot) the challenger and the current production model are
    both scored on it and compared by paired bootstrap intervals at ``confidence``; without it
    (a manual ``l3m models register DIR``) their stored dev numbers are compared as points, and
    only when they come from the same data fingerprint.
    """
    import bentoml

    if not 0 < confidence < 1:  # checked before any scoring, for the flow as for the CLI
        raise RegistryError(f"confidence {confidence:g}: must lie strictly between 0 and 1")
    meta = check_model_dir(model_dir)
    src = Path(model_dir)
    check_base(meta, src)  # a compact model: its base is still the one it was trained on
    # Scoring happens under the ledger lock so production cannot change between being scored
    # and being compared with (a concurrent registration waits for this one).
    with locked_ledger(registry_home()) as ledger:
        scores, note = _scores(ledger, meta, src, dev, confidence)
        promoted, reason, warning = decide(scores, promote_margin, note)
        stage = PRODUCTION if promoted else CANDIDATE
        labels = {"domain": meta.domain, "strategy": meta.strategy, "tuner": meta.tuner, "stage": stage}
        base = store_base(meta, _store())  # weight_mask / lora: their base, stored once (serving.bases)
        with bentoml.models.create(
            model_name(meta.domain), labels=labels, metadata=_metadata(meta), _model_store=_store()
        ) as bento_model:
            copy_model_dir(src, Path(bento_model.path), base, meta)
        tag = str(bento_model.tag)
        ledger["models"][tag] = {
            "domain": meta.domain, "stage": CANDIDATE, "reason": reason, "metric": meta.metric,
            "dev_score": scores.challenger, "baseline": scores.baseline, "warning": warning,
            "compared_with": scores.production, "production_dev_score": scores.production_score,
            "data_fingerprint": scores.fingerprint, "evaluated_on": scores.source, "registered_at": now_iso(),
            **ledger_fields(scores, meta, dev),
        }
        previous = _make_production(ledger, tag, meta.domain, reason) if promoted else None
        add_event(ledger, "register" if not promoted else "register+promote", tag, meta.domain, reason)
    return RegisterResult(tag, meta.domain, stage, promoted, reason, meta.metric, scores.challenger, previous,
                          scores.baseline, scores.production, scores.production_score, scores.fingerprint,
                          scores.source, warning, ledger["models"][tag]["evidence"] or None)


def promote(tag: str, force: bool = False, *, margin: float = 0.0) -> RegisterResult:
    """Make ``tag`` production; refused (not raised) unless forced when, by the numbers and
    intervals recorded at its registration, it does not beat the baseline or production on the
    same data, or was not compared fairly."""
    model = _get(tag)
    tag = str(model.tag)
    meta = ModelMeta.from_dict(dict(model.info.metadata))
    with locked_ledger(registry_home()) as ledger:
        entry = ledger["models"].setdefault(tag, _entry_from_store(model, meta))
        current = domain_state(ledger, meta.domain)["production"]
        if current == tag:
            return RegisterResult(tag, meta.domain, PRODUCTION, False, "already production", meta.metric,
                                  entry.get("dev_score"), current)
        # Each version's ledger numbers were measured at its registration; comparable only
        # when measured on the same data (compare() checks the fingerprints).
        scores = ledger_scores(entry, current, ledger["models"].get(current, {}) if current else {})
        ok, reason, warning = decide(scores, margin)
        if not ok and force:
            ok, reason = True, f"forced: {reason}"
        if not ok:
            entry["reason"] = reason
            add_event(ledger, "promote-refused", tag, meta.domain, reason)
            return RegisterResult(tag, meta.domain, entry["stage"], False, reason, meta.metric,
                                  scores.challenger, current, scores.baseline, current, scores.production_score,
                                  scores.fingerprint, scores.source, warning, entry.get("evidence") or None)
        previous = _make_production(ledger, tag, meta.domain, reason)
        add_event(ledger, "promote", tag, meta.domain, reason)
    return RegisterResult(tag, meta.domain, PRODUCTION, True, reason, meta.metric, scores.challenger, previous,
                          scores.baseline, current, scores.production_score, scores.fingerprint, scores.source,
                          warning, entry.get("evidence") or None)


def rollback(domain: str) -> RegisterResult:
    """Restore the production version that preceded the current one; the current becomes candidate."""
    store_tags = {str(m.tag) for m in _store().list() if m.tag.name == model_name(domain)}
    with locked_ledger(registry_home()) as ledger:
        state = domain_state(ledger, domain)
        current = state["production"]
        if current is None:
            raise RegistryError(f"domain {domain!r} has no production model")
        # Earlier productions that were deleted from the store since cannot be served: skip them.
        earlier = [t for t in state["history"][:-1] if t in store_tags and t != current]
        if not earlier:
            raise RegistryError(f"domain {domain!r}: no earlier production version to roll back to")
        target = earlier[-1]
        reason = f"rollback from {current}"
        ledger["models"][current].update(stage=CANDIDATE, reason=f"rolled back at {now_iso()}")
        state["history"] = [t for t in state["history"] if t != current]
        while state["history"] and state["history"][-1] != target:
            state["history"].pop()
        state["production"] = target
        ledger["models"][target].update(stage=PRODUCTION, reason=reason)
        add_event(ledger, "rollback", target, domain, reason)
        entry = ledger["models"][target]
    return RegisterResult(target, domain, PRODUCTION, True, reason, entry.get("metric", ""),
                          entry.get("dev_score"), current)


def production_tag(domain: str) -> str | None:
    """The tag serving should load for ``domain``, or None if nothing was promoted yet."""
    return domain_state(read_ledger(registry_home()), domain)["production"]


def production_tags() -> dict[str, str]:
    """domain -> its production version, for every domain that has one."""
    domains = read_ledger(registry_home())["domains"]
    return {d: st["production"] for d, st in domains.items() if st.get("production")}


def current_stage(tag: str) -> tuple[str, str]:
    """(stage, reason) of a registered version now: promote/rollback since its registration
    changed them in the ledger, not in a result returned then."""
    entry = read_ledger(registry_home())["models"].get(tag, {})
    return entry.get("stage", CANDIDATE), entry.get("reason", "")


def _entry_from_store(model: Any, meta: ModelMeta) -> dict[str, Any]:
    # A model saved into the store by other means than register(): it starts as a candidate.
    return {"domain": meta.domain, "stage": CANDIDATE, "reason": "not registered through l3m",
            "metric": meta.metric, "dev_score": meta.dev_score(), "baseline": stored_baseline(meta),
            "data_fingerprint": meta.data_fingerprint, "evaluated_on": "stored",
            "registered_at": model.info.creation_time.isoformat(timespec="seconds")}


def _summary(model: Any, ledger: dict[str, Any]) -> dict[str, Any]:
    md = dict(model.info.metadata)
    tag = str(model.tag)
    entry = ledger["models"].get(tag, {})
    metric = md.get("metric", "macro_f1")
    metrics = md.get("metrics", {})
    return {
        "tag": tag,
        "domain": md.get("domain"),
        "strategy": md.get("strategy_kind", md.get("strategy")),
        "tuner": md.get("tuner_kind", md.get("tuner")),
        "stage": entry.get("stage", CANDIDATE),
        "reason": entry.get("reason", ""),
        "metric": metric,
        "dev": metrics.get("dev", {}).get(metric),
        "test": metrics.get("test", {}).get(metric),
        "created": model.info.creation_time.isoformat(timespec="seconds"),
    }


def list_models(domain: str | None = None) -> list[dict[str, Any]]:
    """Registered l3m models, newest first, with their current stage."""
    ledger = read_ledger(registry_home())
    models = [m for m in _store().list() if m.tag.name.startswith(NAME_PREFIX)]
    if domain is not None:
        models = [m for m in models if m.tag.name == model_name(domain)]
    models.sort(key=lambda m: m.info.creation_time, reverse=True)
    return [_summary(m, ledger) for m in models]


def show(tag: str) -> dict[str, Any]:
    """Everything known about one version: summary, full metadata, labels, path, history."""
    model = _get(tag)
    ledger = read_ledger(registry_home())
    out = _summary(model, ledger)
    out.update(
        labels=dict(model.info.labels),
        metadata=dict(model.info.metadata),
        path=str(model.path),
        events=[e for e in ledger["events"] if e["tag"] == out["tag"]],
    )
    return out
