"""Check a run's base model before any work starts, so a bad ``model.name_or_path`` fails first.

Without this check a missing path or an unknown hub id surfaces only when scoring loads the
model, after validation has run, as transformers' ``OSError: Repo id must be in the form ...``
(a local path that does not exist is taken for a malformed hub id). The check loads what
every later step loads first, the model config and the tokenizer, and turns each failure into
a ``ConfigError`` naming the field, the location and the reason. ``check_run_model`` then checks
what the run's steps need of the model's family (``l3m.capabilities``).
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants as hub_constants

from l3m.config import DEFAULT_SHARED, ENV_MODEL_ROOT, ConfigError, ModelSpec, RunConfig

FIELD = "model.name_or_path"


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name": anything absolute, relative ("./", "../", "~") or with
    # more than one slash can only be a local path, so it is reported as a missing path.
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _load(location: str, revision: str | None, local_only: bool) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(location, revision=revision, local_files_only=local_only)
    AutoTokenizer.from_pretrained(location, revision=revision, local_files_only=local_only)


def check_model(spec: ModelSpec) -> str:
    """Return the resolved model location; raise ``ConfigError`` if it cannot be loaded."""
    name = spec.name_or_path
    location = spec.resolved()
    path = Path(location).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{FIELD}: {location} is a directory but not a model (no config.json in it)")
        try:
            _load(str(path), spec.revision, local_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{FIELD}: {location}: the model or its tokenizer cannot be loaded: {e}") from None
        return location
    if path.exists():
        raise ConfigError(f"{FIELD}: {location} is a file; give the model's directory")
    if _looks_like_path(name):
        raise ConfigError(f"{FIELD}: model path {name} does not exist")
    root = os.environ.get(ENV_MODEL_ROOT) or str(DEFAULT_SHARED / "models")
    offline = hub_constants.is_offline_mode()  # the switch huggingface_hub itself obeys
    try:
        _load(name, spec.revision, local_only=offline)
    except (OSError, ValueError) as e:
        where = f"{name!r} is not a local directory, not a model under {root}, and as a hub id"
        if offline:
            raise ConfigError(f"{FIELD}: {where} it is not in the local Hugging Face cache: "
                              "offline mode is on (HF_HUB_OFFLINE=1); "
                              "give a local model directory, or turn offline mode off to download it") from None
        raise ConfigError(f"{FIELD}: {where} it cannot be resolved: {e}") from None
    return location


def check_run_model(cfg: RunConfig, training: bool = True) -> str:
    """``check_model``, then what the run asks of the model (``l3m.capabilities``): every step's
    needs are refused here, before validation, naming the family and the feature."""
    from l3m.capabilities import check_capabilities

    location = check_model(cfg.model)
    check_capabilities(cfg, location, training)
    return location
