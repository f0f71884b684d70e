"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via peft.

The pretrained weights stay frozen; each adapted linear gets a trainable low-rank update
``W x + (alpha / r) * B A dropout(x)`` (peft's ``lora.Linear``, injected in place with
``peft.inject_adapter_in_model`` so the multi-task model's shared encoder carries the adapters
on both its classification and its MLM path). Trained: the adapters and, with ``train_head``,
the classification head (l3m's head: the classifier's own children plus a BERT-style pooler,
``l3m.optim.head_param_names``). Frozen: everything else, the MLM head included, so the
auxiliary MLM loss shapes the adapters only.

Which linears: those of the encoder's layer stack (``layer_stack_linears``) whose name ends in
one of ``spec.target_modules``, by default peft's list for the family (BERT, RoBERTa, XLM-R,
ELECTRA: ``query`` + ``value``; DeBERTa-v2: ``query_proj`` + ``value_proj``). A family peft has
no default for needs ``target_modules`` in the config (e.g. DistilBERT ``[q_lin, v_lin]``).

Stored domain (``lora.safetensors``): the adapter weights (peft's state-dict names), the extras
(head and whatever the base checkpoint lacks) and the LoRA config; plus the classifier's
``config.json``. No merged full weights: merging changes the float rounding of every adapted
layer, while ``rebuild`` (base + extras + injected adapters, unmerged) computes exactly what
was trained and evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import peft
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import PreTrainedModel

from l3m.config import TunerSpec
from l3m.tuning.base import (
    FisherBatches,
    Tuner,
    find_classifier,
    head_prefixes,
    layer_stack_linears,
    register_tuner,
    split_decay,
    tensor_bytes,
)
from l3m.tuning.compact import base_extras, domain_meta, load_domain_file, write_domain_file

LORA_FILE = "lora.safetensors"
FORMAT = "l3m.lora/1"
ADAPTER = "default"


def lora_targets(family: str, linears: Iterable[str], wanted: list[str] | None) -> list[str]:
    """The encoder-layer linears (names) whose name ends in one of ``wanted`` (None: peft's default
    for ``family``); a ValueError naming what to set when there is none."""
    names = list(linears)
    endings = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = wanted or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(family)
    if not isinstance(chosen, list):
        raise ValueError(f"lora: peft has no default target modules for {family}; set tuners[].target_modules to "
                         f"names of its encoder-layer linears, e.g. {endings}")
    found = [n for n in names if any(n == w or n.endswith("." + w) for w in chosen)]
    if not found:
        raise ValueError(f"lora: no encoder-layer linear of {family} matches target_modules {chosen}; its linears "
                         f"end in {endings}")
    return found


def target_names(clf: PreTrainedModel, spec: TunerSpec) -> list[str]:
    """Full names (in ``clf``) of the encoder-layer linears to adapt."""
    return lora_targets(clf.config.model_type, layer_stack_linears(clf), spec.target_modules)


def _unwrapped(name: str) -> str:
    # peft keeps the adapted linear as ``<name>.base_layer``: the plain classifier's name.
    return name.replace(".base_layer.", ".")


class LoraTuner(Tuner):
    domain_file = LORA_FILE

    def __init__(self, spec: TunerSpec) -> None:
        super().__init__(spec)
        self.base_model_path: str | None = None  # from prepare(); export() can be told otherwise
        self.config: LoraConfig | None = None
        self.targets: list[str] = []

    def prepare(self, model: nn.Module, fisher_batches: FisherBatches | None = None) -> nn.Module:
        from l3m.optim import head_param_names  # l3m.optim imports this package

        clf = find_classifier(model)
        self.base_model_path = clf.name_or_path or None
        head = head_param_names(model) if self.spec.train_head else set()
        for p in model.parameters():  # every pretrained weight, MLM head included, is frozen
            p.requires_grad_(False)
        self.targets = target_names(clf, self.spec)
        self.config = LoraConfig(r=self.spec.rank, lora_alpha=self.spec.alpha, lora_dropout=self.spec.dropout,
                                 target_modules=self.targets, bias="none")
        inject_adapter_in_model(self.config, clf, adapter_name=ADAPTER)  # adapters trainable, the rest frozen
        for name, p in model.named_parameters():
            if name in head:
                p.requires_grad_(True)
        return model

    def optimizer_param_groups(
        self, model: nn.Module, base_lr: float, weight_decay: float
    ) -> list[dict[str, Any]] | None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        adapters = [p for n, p in trainable if ".lora_" in n]
        decay, no_decay = split_decay((n, p) for n, p in trainable if ".lora_" not in n)
        groups = [
            # lora_lr set: its own group, kept as given; else the body lr (l3m.optim.param_groups).
            {"params": adapters, "weight_decay": weight_decay} | ({"lr": self.spec.lora_lr} if self.spec.lora_lr else {}),
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def export(self, model: nn.Module, out_dir: Path, base_model_path: str | Path | None = None) -> dict[str, int]:
        """``config.json`` + ``lora.safetensors`` (adapters, extras, LoRA config); no full weights."""
        out_dir = Path(out_dir)
        base = base_model_path or self.base_model_path
        if not base or self.config is None:
            raise ValueError("lora.export needs a prepared model and its base model path (prepare() records both)")
        clf = find_classifier(model)
        adapters = {k: v.detach().to("cpu").contiguous()
                    for k, v in get_peft_model_state_dict(clf, adapter_name=ADAPTER).items()}
        plain = {_unwrapped(k): v for k, v in clf.state_dict().items() if ".lora_" not in k}
        extras = base_extras(plain, base, clf.config, self.base_revision)
        meta = {
            **domain_meta(FORMAT, base, self.base_revision),
            "peft_version": peft.__version__,
            "lora": {"r": self.config.r, "lora_alpha": self.config.lora_alpha, "lora_dropout": self.config.lora_dropout,
                     "target_modules": sorted(self.targets), "bias": self.config.bias},
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        clf.config.save_pretrained(out_dir)
        sizes = write_domain_file(out_dir / LORA_FILE, {"adapter": adapters, "extra": extras}, meta, head_prefixes(clf))
        # full_model_bytes: what the merged classifier's weights would take (its safetensors payload).
        return {"full_model_bytes": tensor_bytes(plain.values()), "adapter_bytes": tensor_bytes(adapters.values()),
                **sizes}

    def rebuild(self, base_model_path: str | Path, out_dir: Path, revision: str | None = None) -> nn.Module:
        """Base weights + stored extras + the stored adapters (unmerged) -> the trained classifier."""
        out_dir = Path(out_dir)
        model, tensors, meta = load_domain_file(base_model_path, out_dir, LORA_FILE, revision)
        with torch.random.fork_rng(devices=[]):  # the adapters' random init is overwritten below
            inject_adapter_in_model(LoraConfig(**meta["lora"]), model, adapter_name=ADAPTER)
        adapters = {k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")}
        result: Any = set_peft_model_state_dict(model, adapters, adapter_name=ADAPTER)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"{out_dir / LORA_FILE}: adapters do not fit the base "
                             f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")
        return model.eval()


register_tuner("lora", LoraTuner)
