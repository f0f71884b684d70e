"""Prefect flow ``train``: strategies x tuners x seeds on a domain, then the results table.

A thin shell over ``l3m.experiment``: one task scores (a store read when already scored) and
writes the token view, one task per run trains and returns its small record, a last task
builds the table. Tasks pass the config and small records, never models or tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.common import artifact_key, as_config
from l3m import experiment
from l3m.config import RunConfig
from l3m.modelcheck import check_model


@task(name="prepare-scores", cache_policy=NONE)
def prepare_task(cfg: RunConfig) -> dict[str, Any]:
    exp_dir = cfg.resolved_output_dir()
    exp_dir.mkdir(parents=True, exist_ok=True)
    inputs = experiment.prepare_inputs(cfg, log=get_run_logger().info)
    view = experiment.write_token_view(cfg, inputs, exp_dir)
    if view is not None:
        create_markdown_artifact(
            markdown=f"L3 token view (vanilla surprisal and masking probability): `{view}`",
            key=artifact_key("tokenview", cfg.domain.name),
            description=f"What L3 masks on {cfg.domain.name}",
        )
    return {"score_key": inputs.score_key, "tokenview": str(view) if view else None}


@task(name="train-run", cache_policy=NONE)
def train_run_task(cfg: RunConfig, strategy: str, tuner: str, seed: int) -> dict[str, Any]:
    log = get_run_logger().info
    inputs = experiment.prepare_inputs(cfg, log=log)  # store read: scoring happened in prepare
    key = experiment.RunKey(strategy, tuner, seed)
    rec = experiment.run_one(cfg, key, inputs, cfg.resolved_output_dir(), log=log)
    return {"strategy": strategy, "tuner": tuner, "seed": seed, "test": rec.metrics["test"],
            "dev": rec.metrics["dev"], "model_dir": rec.model_dir, "realised_rate": rec.masking.get("realised_rate")}


@task(name="results-table", cache_policy=NONE)
def results_task(cfg: RunConfig) -> dict[str, str]:
    title = f"{cfg.domain.name} ({cfg.model.name_or_path})"
    paths = experiment.write_results(cfg.resolved_output_dir(), title=title)
    create_markdown_artifact(markdown=Path(paths["md"]).read_text(), key=artifact_key("results", cfg.domain.name),
                             description=f"STL / RTM / L3 ... on {cfg.domain.name}, mean ± std over seeds")
    return {k: str(v) for k, v in paths.items()}


@flow(name="train", log_prints=True)
def train(config: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train every (strategy, tuner, seed) of a run config (a YAML path) and tabulate the results."""
    cfg = as_config(Path(config), overrides)
    check_model(cfg.model)  # a bad model path or hub id fails here, before any data work
    prepared = prepare_task(cfg)
    runs = [train_run_task(cfg, k.strategy, k.tuner, k.seed) for k in experiment.plan(cfg)]
    return {"prepared": prepared, "runs": runs, "results": results_task(cfg)}
