"""What a base model can do, checked before any work: a run that needs more is refused up front.

A family (or one checkpoint of it) can lack what a step needs: an ELECTRA *discriminator* or a
checkpoint saved from the bare encoder carries no masked-LM head, so PLL scoring and the MLM
strategies (RTM, L3, Selective) would run on a randomly initialised head; a tokenizer without a
mask token cannot mask; a slow tokenizer has no word boundaries for ``within_word_l2r``. Found
mid-run, each of these is a traceback after validation (or silently meaningless numbers); found
here, it is one ``ConfigError`` naming the family, the feature and the setting that asks for it.

The checks read the config, the tokenizer and the checkpoint's tensor *names* (the safetensors
header), and build the masked LM on the meta device to know its head's module names: no weights
are loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l3m.config import ConfigError, RunConfig

# Strategies that train the auxiliary masked-LM task (everything but STL).
NO_MLM = ("none",)


@dataclass(frozen=True)
class Capabilities:
    """Each field is None when the model can, else why it cannot (a sentence)."""

    family: str
    classifier: str | None
    mlm_head: str | None
    masking: str | None  # the tokenizer can mask (a mask token)
    word_boundaries: str | None  # a fast tokenizer (word_ids) for PLL scoring


def _checkpoint_keys(path: Path) -> set[str] | None:
    """Tensor names of a local safetensors checkpoint (header only); None when unknown."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return set(fh.keys())
    return None


def _head_modules(config: Any) -> tuple[str, list[str]] | None:
    """The masked LM's class name and its head's top-level module names (meta device: no memory)."""
    import torch
    from transformers import AutoModelForMaskedLM

    try:
        with torch.device("meta"):
            mlm = AutoModelForMaskedLM.from_config(config)
    except ValueError:
        return None
    prefix = mlm.base_model_prefix
    heads = sorted({n.split(".")[0] for n, _ in mlm.named_parameters() if not n.startswith(prefix + ".")})
    return type(mlm).__name__, heads


def _mlm_head(config: Any, location: str) -> str | None:
    family = config.model_type
    found = _head_modules(config)
    if found is None:
        return f"transformers has no masked-LM class for the {family} family"
    cls, heads = found
    keys = _checkpoint_keys(Path(location)) if Path(location).is_dir() else None
    if keys is None:  # a hub id or a .bin checkpoint: the load itself will tell
        return None
    missing = [h for h in heads if not any(k == h or k.startswith(h + ".") for k in keys)]
    if missing:
        arch = ", ".join(config.architectures or ["?"])
        return (f"the {family} checkpoint ({arch}) has no pretrained masked-LM head "
                f"({cls} needs {', '.join(missing)})")  # fmt: skip
    return None


def model_capabilities(location: str, revision: str | None = None) -> Capabilities:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(location, revision=revision)
    family = str(config.model_type)
    try:
        AutoModelForSequenceClassification._model_mapping[type(config)]
        classifier = None
    except KeyError:
        classifier = f"transformers has no sequence-classification class for the {family} family"
    tok = AutoTokenizer.from_pretrained(location, revision=revision)
    masking = None if tok.mask_token_id is not None else f"the {family} tokenizer has no mask token"
    fast = None if getattr(tok, "is_fast", False) else f"the {family} tokenizer is not a fast tokenizer"
    return Capabilities(family, classifier, _mlm_head(config, location), masking, fast)


def refusals(cfg: RunConfig, caps: Capabilities, training: bool = True) -> list[str]:
    """What the run asks for that the model cannot do, one line each (empty: go ahead).

    ``training=False``: only what scoring needs (``l3m score``)."""
    from l3m.inputs import needs_scores

    out = []
    if caps.classifier and training:
        out.append(f"training a classifier: {caps.classifier}")
    mlm = [s.kind for s in cfg.strategies if s.kind not in NO_MLM]
    for why in (caps.mlm_head, caps.masking):
        if why and mlm and training:
            out.append(f"the MLM strategies {mlm} (strategies): {why}; run strategies=[{{kind: none}}] only")
    scoring = needs_scores(cfg) or cfg.scoring.shift_summary
    for why in (caps.mlm_head, caps.masking, caps.word_boundaries):
        if why and scoring:
            out.append(f"PLL scoring (for {'L3' if needs_scores(cfg) else 'scoring.shift_summary'}): {why}")
    head = _authors_head_refusal(cfg, caps) if training else None
    if head:
        out.append(head)
    return list(dict.fromkeys(out))


def _authors_head_refusal(cfg: RunConfig, caps: Capabilities) -> str | None:
    if cfg.model.head != "authors":
        return None
    from l3m.optim import authors_head_unsupported

    return authors_head_unsupported(caps.family)


def check_capabilities(cfg: RunConfig, location: str, training: bool = True) -> Capabilities:
    """Raise ``ConfigError`` naming the family and every refused feature; else the capabilities."""
    caps = model_capabilities(location, cfg.model.revision)
    refused = refusals(cfg, caps, training)
    if refused:
        raise ConfigError(f"model.name_or_path: {cfg.model.name_or_path} ({caps.family} family) cannot do what "
                          "this run asks:\n  - " + "\n  - ".join(refused))  # fmt: skip
    return caps
