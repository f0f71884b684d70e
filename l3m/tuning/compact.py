"""What the compact tuners (weight_mask, lora) share: a domain stored over its frozen base model.

Such a domain is the base checkpoint plus a small file: the tuner's own weights (bit-packed
masks, LoRA adapters) and the *extras*, every classifier tensor a fresh load of the base cannot
reproduce: the trained task head and any part the base checkpoint lacks, randomly initialised
at load (the MiniLM MLM checkpoint has no pooler). Rebuilding loads the base with the stored
config, copies the extras in and applies the tuner's weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from l3m.basefiles import base_digest
from l3m.tuning.base import is_head_param, tensor_bytes


def load_base(base_model_path: str | Path, config: Any, revision: str | None = None) -> PreTrainedModel:
    """The base checkpoint (a hub id: at ``revision``) as a classifier; randomly initialised
    parts do not touch the global RNG."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized weights" is expected here
    try:
        with torch.random.fork_rng(devices=[]):
            return AutoModelForSequenceClassification.from_pretrained(str(base_model_path), config=config,
                                                                      revision=revision)
    finally:
        hf_logging.set_verbosity(verbosity)


def base_extras(state: dict[str, torch.Tensor], base_model_path: str | Path, config: Any,
                revision: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` (classifier names) that differ from, or are absent in, a fresh
    load of the base: what a rebuild must copy in. CPU, contiguous, ready for safetensors."""
    reference = load_base(base_model_path, config, revision).state_dict()
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in state.items()
        if k not in reference or not torch.equal(v.detach().cpu(), reference[k])
    }


def copy_extras(model: PreTrainedModel, tensors: dict[str, torch.Tensor], prefix: str = "extra/") -> None:
    """Copy the stored extras (keys ``<prefix><state-dict name>``) into ``model`` in place."""
    state = model.state_dict()  # shares storage with the parameters
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith(prefix):
                state[key.removeprefix(prefix)].copy_(value)


def domain_meta(fmt: str, base: str | Path, revision: str | None) -> dict[str, Any]:
    """The metadata every domain file starts with: its format, the base it was trained on and
    that base's content digest (``l3m.basefiles``; None when it cannot be computed here, e.g. a
    hub id not in the local cache), which the registry checks before storing the domain."""
    return {"format": fmt, "base_model": str(base), "base_digest": base_digest(base, revision)}


def write_domain_file(path: Path, parts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
                      heads: list[str]) -> dict[str, int]:
    """One safetensors file of named parts (keys ``<part>/<tensor name>``, e.g. ``mask/...``,
    ``extra/...``) with ``meta`` as its ``l3m`` metadata; returns the sizes ``export`` reports:
    the extras split into head and the rest, and the file's bytes (``task_bytes``)."""
    tensors = {f"{part}/{k}": v for part, named in parts.items() for k, v in named.items()}
    save_file(tensors, str(path), metadata={"l3m": json.dumps(meta)})
    extras = parts.get("extra", {})
    return {
        "head_bytes": tensor_bytes(v for k, v in extras.items() if is_head_param(k, heads)),
        "extra_bytes": tensor_bytes(v for k, v in extras.items() if not is_head_param(k, heads)),
        "task_bytes": path.stat().st_size,
    }


def load_domain_file(base_model_path: str | Path, out_dir: Path, name: str, revision: str | None = None
                     ) -> tuple[PreTrainedModel, dict[str, torch.Tensor], dict[str, Any]]:
    """The base loaded with the stored config and the extras copied in, the file's tensors and
    its metadata: what a compact tuner's ``rebuild`` starts from."""
    tensors = load_file(str(out_dir / name))
    model = load_base(base_model_path, AutoConfig.from_pretrained(str(out_dir)), revision)
    copy_extras(model, tensors)
    return model, tensors, read_meta(out_dir / name)


def read_meta(path: Path) -> dict[str, Any]:
    """The ``l3m`` JSON metadata of a compact tuner's safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("l3m", "{}"))
