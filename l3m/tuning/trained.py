"""Loading a trained model directory as its classifier, whatever the tuner stored.

A full classifier (``model.safetensors``: full, Child-Tuning, a weight_mask run's merged copy)
loads with ``from_pretrained``; a compact domain without full weights (a lora run, or a
registry's compact copy of a weight_mask or lora domain) is rebuilt over its base model by its
tuner. The base is the one ``l3m.json`` names at its ``base_revision``, resolved as training
resolved it, unless the caller knows where its copy lives (a registry's shared base).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModelForSequenceClassification

from l3m.config import ModelSpec, TunerSpec
from l3m.tuning.base import Tuner, build_tuner, tuner_class

META_FILE = "l3m.json"


def tuner_of(meta: dict[str, Any]) -> Tuner:
    """The tuner a model directory's ``l3m.json`` was trained with (its spec, or just its kind)."""
    spec = meta.get("tuner", "full")
    return build_tuner(TunerSpec.model_validate(spec) if isinstance(spec, dict) else TunerSpec(kind=spec))


def domain_file_of(meta: dict[str, Any]) -> str | None:
    """The file a compact tuner stores a domain in (None: full weights), from the tuner's kind
    alone: deciding where a model's weights are must not depend on its spec still validating."""
    spec = meta.get("tuner", "full")
    return tuner_class(spec.get("kind", "full") if isinstance(spec, dict) else spec).domain_file


def base_location(meta: dict[str, Any]) -> str:
    """Where the base model of ``meta`` is: its ``model.name_or_path`` resolved as training did."""
    name = (meta.get("config") or {}).get("model", {}).get("name_or_path") or meta["base_model"]
    return ModelSpec(name_or_path=name).resolved()


def base_revision(meta: dict[str, Any]) -> str | None:
    """The revision of ``meta``'s base (``model.revision``; it matters for a hub id only)."""
    return meta.get("base_revision") or (meta.get("config") or {}).get("model", {}).get("revision")


def has_full_weights(model_dir: str | Path) -> bool:
    return any(Path(model_dir).glob("model*.safetensors"))


def load_trained(model_dir: str | Path, base: str | Path | None = None) -> nn.Module:
    """The trained classifier of ``model_dir`` in eval mode (see the module doc)."""
    root = Path(model_dir)
    meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
    domain_file = domain_file_of(meta)
    if domain_file is None or has_full_weights(root):
        return AutoModelForSequenceClassification.from_pretrained(str(root), use_safetensors=True).eval()
    if not (root / domain_file).is_file():
        raise FileNotFoundError(f"{root}: neither full weights (model.safetensors) nor {domain_file}")
    if base is not None:  # a local copy (a registry's stored base): no revision to resolve
        return tuner_of(meta).rebuild(base, root)
    return tuner_of(meta).rebuild(base_location(meta), root, base_revision(meta))
