"""Prefect flow ``register``: put a trained model directory into the registry, apply promotion.

A thin shell over ``serving.registry`` (the registry lives under serving/ because the l3m
library never imports bentoml). The task returns the small ``RegisterResult`` dict and a
Markdown artifact records the decision, so a refused promotion is visible in the Prefect UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.common import artifact_key
from serving import registry


@task(name="register-model", cache_policy=NONE)
def register_task(model_dir: str, promote_margin: float = 0.0) -> dict[str, Any]:
    res = registry.register(Path(model_dir), promote_margin=promote_margin)
    log = get_run_logger()
    log.info("registered %s as %s: %s", res.tag, res.stage, res.reason)
    create_markdown_artifact(
        markdown=(
            f"**{res.tag}** → `{res.stage}`\n\n- {res.metric} (dev): {res.dev_score}\n- decision: {res.reason}\n"
            f"- previous production: {res.previous_production or '—'}\n- from: `{model_dir}`\n"
        ),
        key=artifact_key("registry", res.domain),
        description=f"Model registry decision for {res.domain}",
    )
    return res.to_dict()


@flow(name="register", log_prints=True)
def register(model_dir: str, promote_margin: float = 0.0) -> dict[str, Any]:
    """Register ``model_dir`` (a trained model directory) as ``l3m-<domain>`` and maybe promote it.

    ``promote_margin`` is the config's ``registry.promote_margin``: how much the dev metric must
    exceed the current production's for the new version to replace it.
    """
    return register_task(model_dir, promote_margin)
