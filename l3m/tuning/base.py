"""The Tuner interface, its registry and the model-locating helpers every tuner shares.

A tuner decides *which* weights a run changes and *how* a trained domain is stored. It never
owns the training loop (that is ``l3m.train`` on transformers' Trainer); it plugs into it at
four points, in the spirit of peft's tuners:

1. ``prepare(model, fisher_batches)`` before the Trainer is built: wrap modules, freeze
   parameters, estimate statistics (Child-Tuning_D's Fisher information);
2. ``callbacks()``: TrainerCallbacks, e.g. gradient masking in ``on_pre_optimizer_step``;
3. ``optimizer_param_groups(model, base_lr, weight_decay)``: ``None`` means the Trainer's own
   optimizer groups, a list means "build AdamW over these groups";
4. ``export(model, out_dir)`` / ``rebuild(base_model_path, out_dir)``: write the weights part
   of the trained-model directory and read it back.

The model handed to ``prepare`` may be the multi-task module of ``l3m.modeling`` (classifier +
MLM head sharing one encoder) or a bare ``AutoModelForSequenceClassification``; tuners find
what they need by parameter/module *name* (``find_classifier``, ``scoped_parameters``) so they
do not depend on one model class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, TrainerCallback

from l3m.config import TunerSpec
from l3m.plugins import Registry
from l3m.quiet import quiet_loading_bars

quiet_loading_bars()  # no per-load 'Loading weights' bar (l3m.quiet)

FisherBatches = Callable[[], Iterable[dict[str, Any]]]

# transformers' default "no weight decay" rule (Trainer.get_decay_parameter_names): biases
# and normalisation weights are not decayed.
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class Tuner:
    """Plain fine-tuning semantics; subclasses override the hooks they need."""

    kind: ClassVar[str] = ""
    # The file that holds a trained domain over its frozen base (masks or adapters + head + what
    # the base lacks), for tuners whose domain is small: a registry can keep this file and a
    # reference to the base instead of full weights, and ``rebuild`` reads it. None: a full copy.
    domain_file: ClassVar[str | None] = None

    def __init__(self, spec: TunerSpec) -> None:
        self.spec = spec
        # The revision of the base model (``model.revision``; build_parts sets it): a compact
        # tuner loads the base again at export, and must load the one it trained on.
        self.base_revision: str | None = None

    def prepare(self, model: nn.Module, fisher_batches: FisherBatches | None = None) -> nn.Module:
        """Make ``model`` ready for training (wrap / freeze / estimate); returns the model to train."""
        return model

    def callbacks(self) -> list[TrainerCallback]:
        return []

    def optimizer_param_groups(
        self, model: nn.Module, base_lr: float, weight_decay: float
    ) -> list[dict[str, Any]] | None:
        return None

    def export(self, model: nn.Module, out_dir: Path) -> dict[str, int]:
        """Write the classifier so ``AutoModelForSequenceClassification.from_pretrained`` loads it."""
        out_dir = Path(out_dir)
        find_classifier(model).save_pretrained(out_dir)
        size = weights_bytes(out_dir)
        # A fine-tuned domain costs a whole model copy: the number weight_mask is compared to.
        return {"full_model_bytes": size, "task_bytes": size}

    def rebuild(self, base_model_path: str | Path, out_dir: Path, revision: str | None = None) -> nn.Module:
        """The trained classifier from ``out_dir`` (the base, at ``revision`` for a hub id, is not
        needed for a full copy)."""
        return AutoModelForSequenceClassification.from_pretrained(str(out_dir)).eval()


_REGISTRY: Registry[Tuner] = Registry("tuner")


def register_tuner(kind: str, cls: type[Tuner]) -> type[Tuner]:
    """Register ``cls`` under ``kind`` (a ``TunerSpec.kind`` value); returns ``cls``."""
    return _REGISTRY.register(kind, cls)


def build_tuner(spec: TunerSpec) -> Tuner:
    return _REGISTRY.get(spec.kind)(spec)


def tuner_class(kind: str) -> type[Tuner]:
    """The tuner class of ``kind`` (its class-level facts, e.g. ``domain_file``, without a spec)."""
    return _REGISTRY.get(kind)


def registered_tuners() -> list[str]:
    return _REGISTRY.kinds()


# ---------------------------------------------------------------------------------- helpers


def find_classifier(model: nn.Module) -> PreTrainedModel:
    """The AutoModelForSequenceClassification inside ``model`` (or ``model`` itself).

    Order: a ``classifier_model`` attribute (the multi-task module's convention), the model
    itself when it is a PreTrainedModel, else the first sub-module whose class name says
    ``...ForSequenceClassification``.
    """
    found = getattr(model, "classifier_model", None)
    if isinstance(found, PreTrainedModel):
        return found
    if isinstance(model, PreTrainedModel):
        return model
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and "ForSequenceClassification" in type(module).__name__:
            return module
    raise TypeError(f"no sequence-classification PreTrainedModel found inside {type(model).__name__}")


def head_prefixes(clf: PreTrainedModel) -> list[str]:
    """Names (relative to ``clf``) of the top-level children that are not the base encoder.

    For BERT that is ``classifier`` (+ ``dropout``), for RoBERTa ``classifier`` (dense +
    out_proj): the task head that fine-tuning creates and every tuner trains.
    """
    base = clf.base_model_prefix
    return [name for name, _ in clf.named_children() if name != base]


def is_head_param(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def encoder_layer_stack(clf: PreTrainedModel) -> list[nn.ModuleList]:
    """The encoder's block lists: the outermost ``nn.ModuleList`` s with parameters inside ``clf.base_model``.

    One structural rule for every family instead of a name per family: BERT, RoBERTa, XLM-R,
    ELECTRA, DeBERTa-v2 and MPNet ``encoder.layer``, DistilBERT ``transformer.layer``, ALBERT's
    shared ``encoder.albert_layer_groups``, ModernBERT ``layers``. Embeddings, relative-position
    tables, final norms, poolers and every head (the task head, the MLM head of the multi-task
    model) are outside these lists, so a scope taken from them cannot reach them.
    """
    stack: list[nn.ModuleList] = []
    inside: set[int] = set()
    for _, module in clf.base_model.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        if any(True for _ in module.parameters()):
            stack.append(module)
            inside.update(id(m) for m in module.modules())
    if not stack:
        raise ValueError(f"{type(clf).__name__}: no encoder layer list (nn.ModuleList) found in its base model")
    return stack


def layer_stack_linears(clf: PreTrainedModel) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` s (exact type) inside the encoder's layer stack, by name in ``clf``."""
    layers = {id(m) for block in encoder_layer_stack(clf) for m in block.modules()}
    return {n: m for n, m in clf.named_modules() if type(m) is nn.Linear and id(m) in layers}


def scoped_parameters(model: nn.Module, scope: str) -> Iterator[tuple[str, nn.Parameter]]:
    """Trainable encoder-layer parameters whose name contains ``scope`` (Child-Tuning's ``'layer' in name``).

    The candidates are the parameters of the encoder's layer stack (``encoder_layer_stack``),
    named as in ``model``; ``scope`` then narrows them by name, case-sensitively like the
    authors' code. A bare substring over the whole model would also catch an MLM head's
    ``lm_head.layer_norm`` (RoBERTa, XLM-R, MPNet) or ``vocab_layer_norm`` (DistilBERT). Shared
    parameters appear once (``named_parameters`` de-duplicates), so an encoder shared by two
    heads is counted once.
    """
    layers = {id(p) for block in encoder_layer_stack(find_classifier(model)) for p in block.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) in layers and scope in name:
            yield name, param


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the classifier inside ``model``: embeddings, encoder, task head.

    What the Child-Tuning authors' optimizer held; an auxiliary MLM head (its own transform and
    output bias; the decoder weight is the shared input embedding) is not among them.
    """
    return [p for p in find_classifier(model).parameters() if p.requires_grad]


def split_decay(named: Iterable[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named:
        (no_decay if any(nd in name for nd in NO_DECAY) else decay).append(param)
    return decay, no_decay


def weights_bytes(out_dir: Path) -> int:
    """Bytes of the safetensors weight files ``save_pretrained`` wrote (shards summed)."""
    return sum(p.stat().st_size for p in Path(out_dir).glob("model*.safetensors"))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
