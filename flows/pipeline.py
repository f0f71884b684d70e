"""Prefect flow ``adapt-domain``: validate -> score -> train/evaluate -> register -> build bento.

Every step is resumable, so a run killed in the middle continues from the failed step:

* validation is a cached task keyed on the bytes of the data files and the domain config
  (results persisted under PREFECT_HOME): unchanged data is not validated twice;
* scoring reads the content-addressed score store first: scored texts cost no forward pass;
* each (strategy, tuner, seed) run writes ``run.json`` when finished and checkpoints while it
  trains: finished runs are reused, an interrupted one resumes from its last checkpoint;
* registration is cached on the chosen model directory, so a rerun does not add a version.

The steps are the same flows/tasks users run alone (``l3m validate|score|train``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, as_config
from flows.register import build_bento_task, register_once, registered_lines
from flows.score import score
from flows.train import train
from flows.validate import validate_task
from l3m.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def _file_digest(location: str) -> str:
    p = Path(location)
    if not p.exists():  # URLs (and missing files, which validation reports) hash by name
        return location
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def validation_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Same data bytes + same domain config (cleaning, thresholds) => same validation result."""
    cfg: RunConfig = parameters["cfg"]
    dom = cfg.domain
    files = {s: _file_digest(dom.resolve(src.path)) for s, src in sorted(dom.splits.items())}
    blob = json.dumps({"domain": dom.model_dump(mode="json"), "files": files}, sort_keys=True)
    return "validate-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


# The same task function as the stand-alone flow, re-wrapped with a cache key and persisted
# results (so a rerun in another process finds them under PREFECT_HOME).
validate_cached = task(name="validate-domain (cached)", cache_key_fn=validation_cache_key, persist_result=True)(
    validate_task.fn
)


def best_run(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The run to register: best dev metric (ties: the earlier run in plan order)."""
    if not runs:
        raise RuntimeError("training produced no runs")
    return max(runs, key=lambda r: r["dev"][metric])


@flow(name="adapt-domain")
def adapt_domain(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The whole pipeline for one run config (a YAML path) and optional ``key=value`` overrides."""
    log = get_run_logger()
    overrides = overrides or []
    cfg = as_config(Path(config), overrides)
    out_dir = cfg.resolved_output_dir()

    state = validate_cached(cfg, return_state=True)
    validation = state.result()
    validation_cached = state.name == "Cached"
    log.info("validation: %s%s", "passed", " (cached: data and config unchanged)" if validation_cached else "")

    scoring = score(config, overrides)
    trained = train(config, overrides)
    chosen = best_run(trained["runs"], cfg.domain.metric)
    log.info("best dev %s: %s/%s seed %s -> %s", cfg.domain.metric, chosen["strategy"], chosen["tuner"],
             chosen["seed"], chosen["model_dir"])
    registered = register_once(chosen["model_dir"], cfg.registry.promote_margin, snapshot_dir=None)
    bento = build_bento_task(registered) if cfg.registry.build_bento else {"tag": None, "status": "not built (disabled)"}

    summary = {
        "domain": cfg.domain.name,
        "output_dir": str(out_dir),
        "validation": {**validation, "cached": validation_cached},
        "scoring": {"scorer_key": scoring["scorer_key"], "store": scoring["store"],
                    "tokens_scored": scoring["tokens_scored"],
                    "texts_scored": sum(s["scored"] for s in scoring["splits"].values()),
                    "texts_from_store": sum(s["cached"] for s in scoring["splits"].values())},
        "results": trained["results"],
        "tokenview": trained["prepared"].get("tokenview"),
        "chosen_run": {k: chosen[k] for k in ("strategy", "tuner", "seed", "dev", "test", "model_dir")},
        "registered": registered,
        "bento": bento["tag"] or bento["status"],
    }
    (out_dir / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str))
    create_markdown_artifact(
        markdown=(f"# {cfg.domain.name}: registered `{registered['tag']}` as **{registered['stage']}**\n\n"
                  f"- chosen run: {chosen['strategy']} / {chosen['tuner']} / seed {chosen['seed']} "
                  f"(dev {cfg.domain.metric} {chosen['dev'][cfg.domain.metric]:.4f}, "
                  f"test {chosen['test'][cfg.domain.metric]:.4f})\n{registered_lines(registered)}"
                  f"- results table: `{trained['results'].get('md')}`\n- bento: {bento['tag'] or bento['status']}\n"),
        key=artifact_key("pipeline", cfg.domain.name),
        description=f"adapt-domain summary for {cfg.domain.name}",
    )
    return summary
