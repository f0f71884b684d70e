"""Prefect flow ``train``: strategies x tuners x seeds on a domain, then the results table.

A thin shell over ``l3m.experiment``: one task scores what the runs need (a store read when
already scored) and writes the token view, one task per planned run trains it (or reuses the
finished run of identical identity) and returns its small record, a last task builds the
experiment's table. Tasks pass the config, the snapshot path and small records, never models or
tensors. The data is the validated snapshot the ``validate`` step wrote (``l3m.data.snapshot``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.common import artifact_key, as_config, load_data
from l3m import experiment
from l3m.config import ConfigError, RunConfig
from l3m.distributed import per_rank_batch
from l3m.identity import RunKey, experiment_dir, run_dir_state
from l3m.modelcheck import check_run_model


@task(name="prepare-scores", cache_policy=NONE)
def prepare_task(cfg: RunConfig, snapshot: str | None) -> dict[str, Any]:
    log = get_run_logger().info
    inputs = experiment.prepare_inputs(cfg, load_data(cfg, snapshot), log=log)
    keys = [k for k, _ in experiment.plan_runs(cfg, inputs.data_fingerprint)]
    view = experiment.write_token_view(cfg, inputs, experiment_dir(cfg, keys))
    if view is not None:
        create_markdown_artifact(
            markdown=f"L3 token view (vanilla surprisal and masking probability): `{view}`",
            key=artifact_key("tokenview", cfg.domain.name),
            description=f"What L3 masks on {cfg.domain.name}",
        )
    return {"score_key": inputs.score_key, "tokenview": str(view) if view else None,
            "data_fingerprint": inputs.data_fingerprint,
            "runs": [[k.strategy, k.tuner, k.seed, k.run_id] for k in keys]}


@task(name="train-run", cache_policy=NONE)
def train_run_task(cfg: RunConfig, snapshot: str | None, key: list[Any]) -> dict[str, Any]:
    log = get_run_logger().info
    run = RunKey(str(key[0]), str(key[1]), int(key[2]), str(key[3]))
    reused = run_dir_state(run.path(cfg.resolved_output_dir()), run.run_id) == "finished"
    inputs = experiment.prepare_inputs(cfg, load_data(cfg, snapshot), log=log)  # store read: scored in prepare
    rec = experiment.run_planned(cfg, run, inputs, cfg.resolved_output_dir(), log=log)
    return {"strategy": run.strategy, "tuner": run.tuner, "seed": run.seed, "run_id": run.run_id,
            "run": run.name, "reused": reused, "test": rec.metrics["test"], "dev": rec.metrics["dev"],
            "model_dir": rec.model_dir, "realised_rate": rec.masking.get("realised_rate")}


@task(name="results-table", cache_policy=NONE)
def results_task(cfg: RunConfig, snapshot: str | None, keys: list[list[Any]]) -> dict[str, str]:
    inputs = experiment.TrainInputs(load_data(cfg, snapshot))
    runs = [RunKey(str(k[0]), str(k[1]), int(k[2]), str(k[3])) for k in keys]
    paths = experiment.tabulate(cfg, inputs, runs)
    create_markdown_artifact(markdown=Path(paths["md"]).read_text(), key=artifact_key("results", cfg.domain.name),
                             description=f"STL / RTM / L3 ... on {cfg.domain.name}, mean ± std over seeds")
    return {k: str(v) for k, v in paths.items()}


@flow(name="train")
def train(config: str | Path | RunConfig | dict, overrides: list[str] | None = None,
          snapshot: str | None = None) -> dict[str, Any]:
    """Train every planned (strategy, tuner, seed) run of a run config and tabulate the results.

    ``snapshot``: the validated data snapshot to train on (the pipeline passes the one its
    validate step wrote); without it the domain's data is validated into one first.
    """
    cfg = as_config(config, overrides)
    check_run_model(cfg)  # a bad model, or one that cannot do what the run asks, fails here
    snapshot = snapshot or ensure_snapshot(cfg)
    prepared = prepare_task(cfg, snapshot)
    runs = [train_run_task.with_options(task_run_name=f"train-{k[0]}-{k[1]}-seed{k[2]}")(cfg, snapshot, k)
            for k in prepared["runs"]]
    return {"prepared": prepared, "runs": runs, "results": results_task(cfg, snapshot, prepared["runs"])}


def ensure_snapshot(cfg: RunConfig) -> str:
    from flows.validate import validate_task

    return str(validate_task(cfg)["snapshot"])


def torchrun_train(config: Path, overrides: list[str], nproc: int) -> int:
    """``l3m train --nproc N``: validate and score in this process (once), then train every run
    with ``torchrun --standalone --nproc_per_node N -m l3m.experiment`` on the same snapshot.

    Scoring first keeps the ranks from scoring the same texts; the ranks read the stored scores.
    Returns torchrun's exit status.
    """
    import subprocess
    import sys

    cfg = as_config(config, overrides)
    if cfg.weighting.kind == "meta_tartan" and any(s.kind != "none" for s in cfg.strategies):
        # Its task-weight update is per process; refused before any work, not in every rank.
        raise ConfigError(f"{config}: weighting.kind=meta_tartan runs in one process; use --nproc 1 or "
                          "--set weighting.kind=fixed")
    try:  # N processes train the one-process run only when the global batch splits over them
        per_rank_batch(cfg.training.batch_size, cfg.training.grad_accum, nproc)
    except ValueError as e:
        raise ConfigError(f"{config}: {e}") from None
    check_run_model(cfg)
    snapshot = ensure_snapshot(cfg)
    args = [str(config), *overrides, "--snapshot", snapshot]
    prep = subprocess.run([sys.executable, "-m", "l3m.experiment", *args, "--prepare-only"], check=False)
    if prep.returncode != 0:
        return prep.returncode
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
              "-m", "l3m.experiment", *args]
    return subprocess.run(launch, check=False).returncode
