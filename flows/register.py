"""Prefect flow ``register``: put a trained model directory into the registry, apply promotion.

A thin shell over ``serving.registry`` (the registry lives under serving/ because the l3m
library never imports bentoml). The task scores the challenger and the current production on
the validated data snapshot's dev split (``snapshot_dir``), returns the small
``RegisterResult`` dict, logs the decision and publishes it as a Markdown artifact, so a
refused or held-back promotion is visible in the Prefect UI.

Also here, for the pipeline: the registration cache (:func:`register_once`, whose result always
reports the version's stage now, from the ledger) and the bento build (:func:`build_bento_task`,
production models only, one bento per model version and build inputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.common import artifact_key
from serving import registry
from serving.ledger import registration_lock
from serving.registry import EvalSet, RegistryError

ROOT = Path(__file__).resolve().parent.parent
BENTOFILE = ROOT / "serving" / "bentofile.yaml"
MANIFEST_KEYS = ("fingerprint", "label_names", "majority_label", "text_pair")
# The code a registration's outcome depends on: a change to any of them re-registers.
REGISTER_CODE = ("serving/registry.py", "serving/promotion.py", "serving/model_io.py", "serving/ledger.py",
                 "serving/bases.py", "l3m/basefiles.py", "l3m/stats.py", "l3m/evaluate.py", "flows/register.py")


def read_manifest(snapshot_dir: str | Path) -> dict[str, Any]:
    path = Path(snapshot_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RegistryError(f"{path}: missing; not a validated data snapshot") from e
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON: {e}") from e
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise RegistryError(f"{path}: lacks {missing}")
    return dict(manifest)


def eval_set_from_snapshot(snapshot_dir: str | Path) -> EvalSet:
    """The dev split of a validated data snapshot (``dev.parquet`` + ``manifest.json``)."""
    import pandas as pd

    manifest = read_manifest(snapshot_dir)
    path = Path(snapshot_dir) / "dev.parquet"
    if not path.is_file():
        raise RegistryError(f"{path}: missing; the snapshot has no dev split")
    frame = pd.read_parquet(path)
    needed = ["text", "label_name"] + (["text_pair"] if manifest["text_pair"] else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise RegistryError(f"{path}: lacks column(s) {missing} (has {list(frame.columns)})")
    return EvalSet(
        texts=[str(t) for t in frame["text"]],
        pairs=[str(t) for t in frame["text_pair"]] if manifest["text_pair"] else None,
        gold=[str(t) for t in frame["label_name"]],
        fingerprint=str(manifest["fingerprint"]),
        majority_label=str(manifest["majority_label"]),
        label_names=[str(n) for n in manifest["label_names"]],
        carved=manifest.get("split_status", {}).get("dev") == "carved",
    )


def registered_lines(res: dict[str, Any]) -> str:
    """Markdown bullets of a registration decision (RegisterResult dict): warning, stage, reason,
    baseline, both dev scores and the data they were measured on."""

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.4f}"

    warning = f"> **Warning:** {res['warning']}\n\n" if res.get("warning") else ""
    evidence = "".join(f"- paired bootstrap vs {e['against']}: {e['diff']:+.2f} points, "
                       f"{100 * e['level']:g}% CI [{e['ci_low']:+.2f}, {e['ci_high']:+.2f}]\n"
                       for e in (res.get("evidence") or {}).values())
    return (
        f"{warning}- stage: `{res['stage']}`; decision: {res['reason']}\n"
        f"- dev {res['metric']} ({res.get('evaluated_on', 'stored')}): {num(res['dev_score'])}; "
        f"majority-class baseline: {num(res.get('baseline'))}; "
        f"production {res.get('compared_with') or '—'}: {num(res.get('production_dev_score'))}\n"
        f"- dev data fingerprint: {res.get('data_fingerprint') or '—'}; "
        f"previous production: {res['previous_production'] or '—'}\n{evidence}"
    )


@task(name="register-model", cache_policy=NONE)
def register_task(model_dir: str, promote_margin: float = 0.0, snapshot_dir: str | None = None,
                  confidence: float = 0.95) -> dict[str, Any]:
    dev = eval_set_from_snapshot(snapshot_dir) if snapshot_dir else None
    res = registry.register(Path(model_dir), promote_margin=promote_margin, dev=dev, confidence=confidence)
    log = get_run_logger()
    log.info("registered %s as %s: %s", res.tag, res.stage, res.reason)
    if res.warning:
        log.warning("%s: %s", res.tag, res.warning)
    markdown = f"**{res.tag}** → `{res.stage}`\n\n{registered_lines(res.to_dict())}- from: `{model_dir}`\n"
    create_markdown_artifact(markdown=markdown, key=artifact_key("registry", res.domain),
                             description=f"Model registry decision for {res.domain}")
    return res.to_dict()


@flow(name="register")
def register(model_dir: str, promote_margin: float = 0.0, snapshot_dir: str | None = None,
             confidence: float = 0.95) -> dict[str, Any]:
    """Register ``model_dir`` (a trained model directory) as ``l3m-<domain>`` and maybe promote it.

    ``promote_margin`` is the config's ``registry.promote_margin``: how much the dev metric must
    exceed the current production's for the new version to replace it. ``snapshot_dir``: a
    validated data snapshot whose dev split both models are scored on (without it, the stored
    dev numbers are compared). ``confidence``: the paired bootstrap interval's level.
    """
    return register_task(model_dir, promote_margin, snapshot_dir, confidence)


# ----------------------------------------------------------------- pipeline: cached registration


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def register_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Everything a registration depends on: the model's l3m.json bytes, the margin and
    confidence, the store (BENTOML_HOME), the dev snapshot's fingerprint and the registration
    code. Not the ledger: promote/rollback since then change the stage, which
    :func:`register_once` reads afresh after a cache hit, not the registration itself."""
    meta = Path(parameters["model_dir"]) / "l3m.json"
    snapshot = parameters.get("snapshot_dir")
    parts = {
        "l3m.json": _sha(meta.read_bytes()) if meta.exists() else "missing",
        "margin": float(parameters.get("promote_margin", 0.0)),
        "confidence": float(parameters.get("confidence", 0.95)),
        "store": str(registry.registry_home().resolve()),
        "dev": read_manifest(snapshot)["fingerprint"] if snapshot else None,
        "code": _sha(b"".join((ROOT / f).read_bytes() for f in REGISTER_CODE)),
    }
    return "register-" + _sha(json.dumps(parts, sort_keys=True).encode())


# Results persist as JSON (a plain dict), not pickle: readable, and loading it runs no code.
register_cached = task(name="register-model (cached)", cache_key_fn=register_cache_key, persist_result=True,
                       result_serializer="json")(register_task.fn)


def register_once(model_dir: str, promote_margin: float, snapshot_dir: str | None,
                  confidence: float = 0.95) -> dict[str, Any]:
    """``register_cached``, re-run (cache refreshed) when the tag it cached was deleted from the
    store; the result's stage is the version's stage now (:func:`with_current_stage`)."""
    from prefect.results import get_result_store

    params = {"model_dir": model_dir, "promote_margin": promote_margin, "snapshot_dir": snapshot_dir,
              "confidence": confidence}
    key = register_cache_key(None, params)
    # Workers sharing this store register one at a time, so a second pipeline that chose the same
    # model finds the first one's cached registration instead of storing the model again.
    with registration_lock(registry.registry_home()):
        store: Any = get_result_store().update_for_task(register_cached)  # sync call in a sync flow
        stale = store.exists(key) and not registry.has_model(store.read(key).result["tag"])
        if stale:
            get_run_logger().info("cached registration's model is gone from the store: registering again")
        result = register_cached.with_options(refresh_cache=stale)(model_dir, promote_margin, snapshot_dir,
                                                                   confidence)
        return with_current_stage(result)


def with_current_stage(result: dict[str, Any]) -> dict[str, Any]:
    """A (possibly cached) registration result with the version's stage now: after ``models
    promote`` / ``rollback`` a rerun reports, and packages, what the ledger says, not the stage
    decided at registration (which stays in ``stage_at_registration``)."""
    stage, reason = registry.current_stage(result["tag"])
    if stage == result["stage"]:
        return result
    get_run_logger().info("%s was registered as %s and is %s now: %s", result["tag"], result["stage"], stage, reason)
    return result | {"stage": stage, "stage_at_registration": result["stage"],
                     "reason": f"{stage} now ({reason}); at registration {result['stage']}: {result['reason']}"}


# ----------------------------------------------------------------- pipeline: the bento


def bento_exists(tag: str) -> bool:
    from bentoml._internal.bento import BentoStore
    from bentoml.exceptions import NotFound

    try:
        BentoStore(str(registry.registry_home() / "bentos")).get(tag)
    except NotFound:
        return False
    return True


def bentofile_spec(name: str, service: str | None = None, envs: dict[str, str] | None = None,
                   models: list[str] | None = None) -> dict[str, Any]:
    """serving/bentofile.yaml as bento ``name``, with ``envs`` recorded in the bento (inside a bento
    there is no ledger: the service serves what the build recorded), another ``service`` and the
    BentoML ``models`` to package when given."""
    spec = yaml.safe_load(BENTOFILE.read_text(encoding="utf-8"))
    spec["name"] = name
    if service:
        spec["service"] = service
    spec["envs"] = [e for e in spec.get("envs", []) if e["name"] not in (envs or {})]
    spec["envs"] += [{"name": k, "value": v} for k, v in (envs or {}).items()]
    if models:
        spec["models"] = models
    return spec


def bento_inputs_digest() -> str:
    """What a bento is built from besides the model: the bentofile (its package pins included),
    every file it includes (the serving code), and the BentoML version that builds it."""
    from importlib.metadata import version

    spec = yaml.safe_load(BENTOFILE.read_text(encoding="utf-8"))
    h = hashlib.sha256(BENTOFILE.read_bytes())
    for pattern in sorted(spec.get("include", [])):
        for f in sorted(ROOT.glob(pattern)):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    h.update(version("bentoml").encode())
    return h.hexdigest()[:10]


def bento_tag(model_tag: str) -> str:
    """``l3m-<domain>:<model version>-<build inputs digest>``: a change to the serving code, the
    bentofile or its pins makes a new bento of the same model; nothing else does."""
    return f"{model_tag}-{bento_inputs_digest()}"


def build_bento(model_tag: str) -> tuple[str, bool]:
    """(bento tag, built now?): bento :func:`bento_tag` packaging ``model_tag``; nothing is built
    when that bento already exists."""
    tag = bento_tag(model_tag)
    with registration_lock(registry.registry_home()):  # two workers never build the same bento
        if bento_exists(tag):
            return tag, False
        return _build(model_tag, tag), True


def _build(model_tag: str, tag: str) -> str:
    """Run ``bentoml build`` for ``model_tag`` as bento ``tag``; returns the tag it reports."""
    env = {"L3M_MODEL_TAG": model_tag}
    return run_bentoml_build(bentofile_spec(model_tag.split(":")[0], envs=env), tag, env)


def run_bentoml_build(spec: dict[str, Any], tag: str, env: dict[str, str]) -> str:
    """``bentoml build`` of bentofile ``spec`` as bento ``tag`` (``env`` set for the build); the
    tag it reports."""
    with tempfile.TemporaryDirectory(prefix="l3m-bentofile-") as tmp:
        bentofile = Path(tmp) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        # A subprocess: the service resolves its model at import, and an imported module
        # (with the previous tag) would be reused by a second build in this process.
        proc = subprocess.run(
            [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "--version", tag.split(":")[1],
             "--output", "tag", str(ROOT)],
            capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT, timeout=900,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"bentoml build failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1].replace("__tag__:", "")


@task(name="build-bento", cache_policy=NONE, retries=1)
def build_bento_task(registered: dict[str, Any]) -> dict[str, Any]:
    """The registered model as a bento if it is the domain's production now; any other stage
    (a candidate, or a version rolled back or superseded since) is not packaged, and neither is
    another version in its place."""
    if registered["stage"] != registry.PRODUCTION:
        return {"tag": None, "status": f"not built ({registered['stage']})"}
    production = registry.production_tag(registered["domain"])
    if production != registered["tag"]:
        return {"tag": None, "status": f"not built ({registered['tag']} is not production now: {production} is)"}
    tag, built = build_bento(registered["tag"])
    get_run_logger().info("%s bento %s", "built" if built else "reused existing", tag)
    return {"tag": tag, "status": "built" if built else "exists (nothing changed)"}
