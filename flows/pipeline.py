"""Prefect flow ``adapt-domain``: validate -> score -> train/evaluate -> register -> build bento(s).

Data flows forward once, as content-addressed artifacts: the validate step writes the validated
data snapshot (``l3m.data.snapshot``), scoring and training read that snapshot, every run is
named by the hash of what produced it (``l3m.identity``), and registration takes the chosen
run's model directory. Every step is therefore resumable and honest about reuse:

* validation is skipped when the snapshot of the same raw bytes, domain config and data code
  exists; changed data or settings validate anew (a new snapshot, new fingerprint);
* scoring reads the content-addressed score store first: scored texts cost no forward pass;
* each planned run writes ``run.json`` when finished and checkpoints while it trains, in a
  directory named by its identity: a rerun reuses or resumes exactly the runs whose settings,
  data and scores are unchanged, and trains the others;
* registration is cached on the chosen model's l3m.json, the margin and confidence, the store
  and the dev snapshot (``flows.register``), so a rerun does not add a version, and reports the
  version's stage now (a promote or rollback since is not hidden by the cache); only a
  production model is packaged, once per model version and serving code.

The steps are the same flows/tasks users run alone (``l3m validate|score|train``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, as_config
from flows.multi_bento import build_multi_bento_task
from flows.register import build_bento_task, register_once, registered_lines
from flows.score import score
from flows.train import train
from flows.validate import validate_task
from l3m.modelcheck import check_run_model


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
    check_run_model(cfg)  # a bad model, or one that cannot do what the run asks, fails here
    out_dir = cfg.resolved_output_dir()

    validation = validate_task(cfg)
    snapshot = validation["snapshot"]
    log.info("validation: passed%s; data snapshot %s",
             " (skipped: data and config unchanged)" if validation["cached"] else "", snapshot)

    scoring = score(config, overrides, snapshot=snapshot)
    trained = train(config, overrides, snapshot=snapshot)
    chosen = best_run(trained["runs"], cfg.domain.metric)
    log.info("best dev %s: %s/%s seed %s -> %s", cfg.domain.metric, chosen["strategy"], chosen["tuner"],
             chosen["seed"], chosen["model_dir"])
    registered = register_once(chosen["model_dir"], cfg.registry.promote_margin, snapshot_dir=snapshot,
                               confidence=cfg.registry.promote_confidence)
    bento = build_bento_task(registered) if cfg.registry.build_bento else {"tag": None, "status": "not built (disabled)"}
    multi = build_multi_bento_task(registered) if cfg.registry.multi_bento else None

    experiment = json.loads(Path(trained["results"]["json"]).read_text())
    summary = {
        "domain": cfg.domain.name,
        "output_dir": str(out_dir),
        "settings": experiment["settings"],
        "majority_baseline": experiment["baseline"],
        "validation": validation,
        "scoring": {"scorer_key": scoring["scorer_key"], "store": scoring["store"],
                    "tokens_scored": scoring["tokens_scored"],
                    "texts_scored": sum(s["scored"] for s in scoring["splits"].values()),
                    "texts_from_store": sum(s["cached"] for s in scoring["splits"].values()),
                    "scope": scoring["scope"], "path": scoring["path"], "path_reason": scoring["path_reason"]},
        "results": trained["results"],
        "runs": [{k: r[k] for k in ("run", "reused", "dev", "test")} for r in trained["runs"]],
        "tokenview": trained["prepared"].get("tokenview"),
        "chosen_run": {k: chosen[k] for k in ("strategy", "tuner", "seed", "dev", "test", "model_dir")},
        "registered": registered,
        "bento": bento["tag"] or bento["status"],
        "multi_bento": multi and {k: multi[k] for k in ("tag", "status", "domains")},
    }
    (out_dir / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str))
    create_markdown_artifact(
        markdown=(f"# {cfg.domain.name}: registered `{registered['tag']}` as **{registered['stage']}**\n\n"
                  f"- chosen run: {chosen['strategy']} / {chosen['tuner']} / seed {chosen['seed']} "
                  f"(dev {cfg.domain.metric} {chosen['dev'][cfg.domain.metric]:.4f}, "
                  f"test {chosen['test'][cfg.domain.metric]:.4f})\n{registered_lines(registered)}"
                  f"- results table: `{trained['results'].get('md')}`\n- bento: {bento['tag'] or bento['status']}\n"
                  + (f"- multi-domain bento: {multi['tag']} ({multi['status']}): {sorted(multi['domains'])}\n"
                     if multi else "")),
        key=artifact_key("pipeline", cfg.domain.name),
        description=f"adapt-domain summary for {cfg.domain.name}",
    )
    return summary
