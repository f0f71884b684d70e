"""Model registry: trained model directories in the BentoML model store, plus promotion.

Each trained classifier is saved as ``l3m-<domain>:<version>`` with its provenance as BentoML
metadata and ``domain``/``strategy``/``tuner``/``stage`` labels. BentoML labels cannot be
changed after saving, so the ``stage`` label is the stage decided at registration; the
current stage and the promotion history are kept in the ledger (``serving.ledger``) and that
is what :func:`list_models`, :func:`show` and :func:`production_tag` report.

Promotion rule: a version becomes ``production`` for its domain only if its dev metric is at
least the current production's plus a margin; otherwise it stays ``candidate`` and the reason
is recorded. :func:`rollback` restores the previous production version.

``BENTOML_HOME`` selects the store; it is re-read on every call (not cached the way BentoML's
own container caches it) so the CLI, flows and tests can point at different stores.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.ledger import add_event, domain_state, locked_ledger, now_iso, read_ledger
from serving.model_io import ModelDirError, ModelMeta, RegistryError, check_model_dir, load_classifier

__all__ = [
    "ModelDirError",
    "RegisterResult",
    "RegistryError",
    "list_models",
    "load_classifier",
    "model_name",
    "production_tag",
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
    """Outcome of register / promote / rollback: where ``tag`` stands now and why."""

    tag: str
    domain: str
    stage: str
    promoted: bool
    reason: str
    metric: str
    dev_score: float | None
    previous_production: str | None

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


def _decide(ledger: dict[str, Any], meta: ModelMeta, margin: float) -> tuple[bool, str]:
    """Whether a model with ``meta`` beats the domain's production by ``margin``, and why."""
    current = domain_state(ledger, meta.domain)["production"]
    new = meta.dev_score()
    if current is None:
        return True, "first model of the domain"
    cur = ledger["models"].get(current, {})
    if cur.get("metric") != meta.metric:
        return False, f"metric differs from production {current} ({cur.get('metric')} vs {meta.metric})"
    old = cur.get("dev_score")
    if new is None or old is None:
        return False, "dev metric missing"
    verdict = f"dev {meta.metric} {new:.4f} vs production {current} {old:.4f} + margin {margin:g}"
    if new >= old + margin:
        return True, verdict
    return False, f"{verdict}: below the bar"


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


def register(model_dir: str | os.PathLike[str], *, promote_margin: float = 0.0) -> RegisterResult:
    """Copy a trained model directory into the store and apply the promotion rule."""
    import bentoml

    meta = check_model_dir(model_dir)
    src = Path(model_dir)
    with locked_ledger(registry_home()) as ledger:
        promoted, reason = _decide(ledger, meta, promote_margin)
        stage = PRODUCTION if promoted else CANDIDATE
        labels = {"domain": meta.domain, "strategy": meta.strategy, "tuner": meta.tuner, "stage": stage}
        with bentoml.models.create(
            model_name(meta.domain), labels=labels, metadata=_metadata(meta), _model_store=_store()
        ) as bento_model:
            for item in src.iterdir():
                dest = Path(bento_model.path) / item.name
                if item.is_dir():
                    shutil.copytree(item, dest)
                else:
                    shutil.copy2(item, dest)
        tag = str(bento_model.tag)
        ledger["models"][tag] = {
            "domain": meta.domain,
            "stage": CANDIDATE,
            "reason": reason,
            "metric": meta.metric,
            "dev_score": meta.dev_score(),
            "registered_at": now_iso(),
        }
        previous = _make_production(ledger, tag, meta.domain, reason) if promoted else None
        add_event(ledger, "register" if not promoted else "register+promote", tag, meta.domain, reason)
    return RegisterResult(tag, meta.domain, stage, promoted, reason, meta.metric, meta.dev_score(), previous)


def promote(tag: str, force: bool = False, *, margin: float = 0.0) -> RegisterResult:
    """Make ``tag`` production; refused (not raised) if it is worse than production, unless forced."""
    model = _get(tag)
    tag = str(model.tag)
    meta = ModelMeta.from_dict(dict(model.info.metadata))
    with locked_ledger(registry_home()) as ledger:
        entry = ledger["models"].setdefault(tag, _entry_from_store(model, meta))
        current = domain_state(ledger, meta.domain)["production"]
        if current == tag:
            return RegisterResult(tag, meta.domain, PRODUCTION, False, "already production", meta.metric,
                                  meta.dev_score(), current)
        ok, reason = _decide(ledger, meta, margin)
        if not ok and force:
            ok, reason = True, f"forced: {reason}"
        if not ok:
            entry["reason"] = reason
            add_event(ledger, "promote-refused", tag, meta.domain, reason)
            return RegisterResult(tag, meta.domain, entry["stage"], False, reason, meta.metric,
                                  meta.dev_score(), current)
        previous = _make_production(ledger, tag, meta.domain, reason)
        add_event(ledger, "promote", tag, meta.domain, reason)
    return RegisterResult(tag, meta.domain, PRODUCTION, True, reason, meta.metric, meta.dev_score(), previous)


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


def _entry_from_store(model: Any, meta: ModelMeta) -> dict[str, Any]:
    # A model saved into the store by other means than register(): it starts as a candidate.
    return {"domain": meta.domain, "stage": CANDIDATE, "reason": "not registered through l3m",
            "metric": meta.metric, "dev_score": meta.dev_score(),
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
