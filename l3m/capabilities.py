"""What a base model can do, checked before any work: a run that needs more is refused up front.

A family (or one checkpoint of it) can lack what a step needs: an ELECTRA *discriminator* or a
checkpoint saved from the bare encoder carries no masked-LM head, so PLL scoring and the MLM
strategies (RTM, L3, Selective) would run on a randomly initialised head; a tokenizer without a
mask token cannot mask; a slow tokenizer has no word boundaries for ``within_word_l2r``. Found
mid-run, each of these is a traceback after validation (or silently meaningless numbers); found
here, it is one ``ConfigError`` naming the family, the feature and the setting that asks for it.

The checks read the config, the tokenizer and the checkpoint's tensor *names* (the safetensors
header, or a ``pytorch_model.bin`` opened on the meta device), and build the masked LM and the
classifier on the meta device to know the head's module names, whether the two can share one
encoder (Funnel's classifier runs the encoder without its upsampling decoder, which the masked LM
needs) and how many positions the encoder has: no weights are loaded.
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
    shared_encoder: str | None = None  # the classifier and the masked LM can share one encoder
    max_positions: int | None = None  # tokens the absolute position embeddings hold (None: no table)
    layer_linears: tuple[str, ...] = ()  # nn.Linear names in the encoder's layer stack (tuner scopes)


def _checkpoint_keys(path: Path) -> set[str] | None:
    """Tensor names of a local checkpoint (safetensors header, or a .bin on the meta device);
    None when there is none here (a hub id: the load itself will tell)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            return set(json.loads((path / index).read_text()).get("weight_map", {}))
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return set(fh.keys())
    legacy = path / "pytorch_model.bin"
    if legacy.is_file():  # older checkpoints (SciBERT's among them) ship only this
        import torch

        try:
            return set(torch.load(str(legacy), map_location="meta", weights_only=True, mmap=True))
        except Exception:  # noqa: BLE001 - a pre-zipfile or pickled-object .bin: the load itself will tell
            return None
    return None


def _meta_models(config: Any) -> tuple[Any, Any]:
    """The masked LM and the sequence classifier of ``config`` on the meta device (None: no class)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    out = []
    for auto in (AutoModelForMaskedLM, AutoModelForSequenceClassification):
        try:
            with torch.device("meta"):
                out.append(auto.from_config(config))
        except ValueError:
            out.append(None)
    return out[0], out[1]


def _head_modules(mlm: Any) -> list[str]:
    """The masked LM's head: its top-level modules outside the encoder."""
    prefix = mlm.base_model_prefix
    return sorted({n.split(".")[0] for n, _ in mlm.named_parameters() if not n.startswith(prefix + ".")})


def _shared_encoder(mlm: Any, classifier: Any) -> str | None:
    if mlm is None or classifier is None or type(mlm.base_model) is type(classifier.base_model):
        return None
    return (f"the classifier's encoder ({type(classifier.base_model).__name__}) is not the masked LM's "
            f"({type(mlm.base_model).__name__}): the two tasks cannot share one encoder")  # fmt: skip


def _max_positions(model: Any) -> int | None:
    """Tokens an absolute position table holds; RoBERTa-style tables (a ``padding_idx``) start
    counting after the pad id, so ``pad + 1`` rows are never a position."""
    from torch import nn

    for name, mod in model.base_model.named_modules():
        if name.endswith("position_embeddings") and isinstance(mod, nn.Embedding):
            offset = 0 if mod.padding_idx is None else mod.padding_idx + 1
            return int(mod.num_embeddings - offset)
    return None


def _layer_linears(classifier: Any) -> tuple[str, ...]:
    from l3m.tuning.base import layer_stack_linears

    if classifier is None:
        return ()
    try:
        return tuple(layer_stack_linears(classifier))
    except ValueError:  # no layer list at all: every scope is refused below
        return ()


def _mlm_head(config: Any, mlm: Any, location: str) -> str | None:
    family = config.model_type
    if mlm is None:
        return f"transformers has no masked-LM class for the {family} family"
    keys = _checkpoint_keys(Path(location)) if Path(location).is_dir() else None
    if keys is None:
        return None
    missing = [h for h in _head_modules(mlm) if not any(k == h or k.startswith(h + ".") for k in keys)]
    if missing:
        arch = ", ".join(config.architectures or ["?"])
        return (f"the {family} checkpoint ({arch}) has no pretrained masked-LM head "
                f"({type(mlm).__name__} needs {', '.join(missing)})")  # fmt: skip
    return None


def model_capabilities(location: str, revision: str | None = None) -> Capabilities:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(location, revision=revision)
    family = str(config.model_type)
    mlm, cls = _meta_models(config)
    classifier = None if cls is not None else f"transformers has no sequence-classification class for the {family} family"
    tok = AutoTokenizer.from_pretrained(location, revision=revision)
    masking = None if tok.mask_token_id is not None else f"the {family} tokenizer has no mask token"
    fast = None if getattr(tok, "is_fast", False) else f"the {family} tokenizer is not a fast tokenizer"
    model = mlm if mlm is not None else cls
    positions = None if model is None else _max_positions(model)
    return Capabilities(family, classifier, _mlm_head(config, mlm, location), masking, fast,
                        _shared_encoder(mlm, cls), positions, _layer_linears(cls))  # fmt: skip


def refusals(cfg: RunConfig, caps: Capabilities, training: bool = True) -> list[str]:
    """What the run asks for that the model cannot do, one line each (empty: go ahead).

    ``training=False``: only what scoring needs (``l3m score``)."""
    from l3m.inputs import needs_scores

    out = []
    if caps.classifier and training:
        out.append(f"training a classifier: {caps.classifier}")
    if caps.max_positions is not None and cfg.model.max_length > caps.max_positions:
        out.append(f"model.max_length {cfg.model.max_length}: the {caps.family} model has "
                   f"{caps.max_positions} positions; set model.max_length <= {caps.max_positions}")  # fmt: skip
    mlm = [s.kind for s in cfg.strategies if s.kind not in NO_MLM]
    for why in (caps.mlm_head, caps.masking, caps.shared_encoder):
        if why and mlm and training:
            out.append(f"the MLM strategies {mlm} (strategies): {why}; run strategies=[{{kind: none}}] only")
    scoring = needs_scores(cfg) or cfg.scoring.shift_summary
    for why in (caps.mlm_head, caps.masking, caps.word_boundaries):
        if why and scoring:
            out.append(f"PLL scoring (for {'L3' if needs_scores(cfg) else 'scoring.shift_summary'}): {why}")
    if training:
        out.extend(_scope_refusals(cfg, caps))
    head = _authors_head_refusal(cfg, caps) if training else None
    if head:
        out.append(head)
    return list(dict.fromkeys(out))


# Tuners that pick encoder weights by a name substring (Child-Tuning D's and the weight masks'
# ``'layer' in name``, the authors' rule): a family that names its blocks otherwise (XLM's
# ``attentions`` / ``ffns``) would select nothing, or only norms.
SCOPED_TUNERS = ("child_d", "weight_mask")


def _scope_refusals(cfg: RunConfig, caps: Capabilities) -> list[str]:
    out = []
    for i, t in enumerate(cfg.tuners):
        if t.kind in SCOPED_TUNERS and not any(t.scope in n for n in caps.layer_linears):
            blocks = sorted({n.split(".")[1] if n.count(".") > 1 else n for n in caps.layer_linears})
            out.append(f"tuners[{i}] {t.kind} (scope {t.scope!r}): no linear layer of the {caps.family} encoder's "
                       f"layer stack has {t.scope!r} in its name (its blocks: {', '.join(blocks) or 'none'}); "
                       f"set tuners[{i}].scope to a part of their names")  # fmt: skip
        if t.kind == "lora":
            from l3m.tuning.lora import lora_targets

            try:
                lora_targets(caps.family, caps.layer_linears, t.target_modules)
            except ValueError as e:
                out.append(f"tuners[{i}] {e}")
    return out


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
