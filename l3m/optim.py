"""Optimiser parameter groups and the classification-head option of one run.

L3Masking's authors (usk-Kimura/L3Masking, ``scripts/run_mlm_auxiliary_PLT-Masking.py``) train
two AdamW optimisers: the pretrained body (encoder + MLM head) at lr 1e-4, weight decay 0.01
except biases/LayerNorm, and the freshly initialised classification head at lr 1e-3 with weight
decay 0.1, both with betas (0.9, 0.98), eps 1e-6 and the same linear warmup/decay schedule.
One AdamW with per-group lr / weight decay is the same update, so ``param_groups`` splits the
trainable parameters into body and head groups (x decay / no decay) and the Trainer's scheduler
scales every group's own lr.

What counts as the head: the classifier's children outside the base encoder (BERT
``classifier``, RoBERTa ``classifier.{dense,out_proj}``) plus a BERT-style ``pooler``: its
dense+tanh is the head's hidden layer, it sees only the classification loss, and the MLM
checkpoints l3m starts from usually do not ship one (it is freshly initialised).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from l3m.config import TrainingSpec
from l3m.tuning.base import find_classifier, head_prefixes, is_head_param, split_decay


def head_param_names(model: nn.Module) -> set[str]:
    """Names (in ``model.named_parameters()``) of the classification head's parameters."""
    clf = find_classifier(model)
    prefixes = head_prefixes(clf) + [f"{clf.base_model_prefix}.pooler"]
    inner = {id(p) for n, p in clf.named_parameters() if is_head_param(n, prefixes)}
    return {n for n, p in model.named_parameters() if id(p) in inner}


def param_groups(model: nn.Module, t_cfg: TrainingSpec,
                 tuner_groups: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: the tuner's groups (or all trainable parameters) split into body and head.

    A tuner group that sets its own lr (weight_mask's mask scores) keeps it; otherwise body
    parameters get ``lr`` / ``weight_decay`` and head parameters ``head_lr`` /
    ``head_weight_decay`` (each falling back to the body value when unset). Biases and
    LayerNorm weights are not decayed, except the head's under ``head_bias_decay`` (the
    authors decay every head parameter).
    """
    head = head_param_names(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    if tuner_groups is None:
        decay, no_decay = split_decay((n, p) for n, p in model.named_parameters() if p.requires_grad)
        tuner_groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    head_lr = t_cfg.head_lr if t_cfg.head_lr is not None else t_cfg.lr
    head_wd = t_cfg.head_weight_decay if t_cfg.head_weight_decay is not None else t_cfg.weight_decay
    out: list[dict[str, Any]] = []
    for group in tuner_groups:
        params = list(group["params"])
        if "lr" in group and group["lr"] != t_cfg.lr:  # a tuner's own group (mask scores): as given
            out.append({**group, "params": params})
            continue
        undecayed = group.get("weight_decay", None) == 0.0
        body = [p for p in params if by_id.get(id(p)) not in head]
        heads = [p for p in params if by_id.get(id(p)) in head]
        out.append({**group, "params": body, "lr": t_cfg.lr, "weight_decay": 0.0 if undecayed else t_cfg.weight_decay})
        head_decay = 0.0 if undecayed and not t_cfg.head_bias_decay else head_wd
        out.append({**group, "params": heads, "lr": head_lr, "weight_decay": head_decay})
    return [g for g in out if g["params"]]


# Why a family's plain export cannot carry the authors' head (the refusal's explanation; which
# families are refused is decided from the model's structure by ``_authors_plan``).
_NO_AUTHORS_HEAD = {
    "distilbert": "its head is pre_classifier + ReLU, and DistilBertForSequenceClassification hard-codes the ReLU",
    "electra": "its head applies GELU after the dense layer, hard-coded in ElectraClassificationHead",
    "modernbert": "its head puts a LayerNorm after the activation (ModernBertPredictionHead), which no setting "
                  "removes",
}  # fmt: skip

HeadPlan = Callable[[PreTrainedModel], None]


def _classifier_dropout(clf: nn.Module) -> nn.Dropout | None:
    """The dropout a BERT-style classifier applies between its pooled vector and the linear layer."""
    drop, linear = getattr(clf, "dropout", None), getattr(clf, "classifier", None)
    return drop if isinstance(drop, nn.Dropout) and isinstance(linear, nn.Linear) else None


def _tanh_pooler(clf: PreTrainedModel) -> nn.Module | None:
    """A base-model pooler computing tanh(dense(first token)): BERT's ``pooler``, ALBERT's
    ``pooler`` + ``pooler_activation``."""
    base = clf.base_model
    pooler = getattr(base, "pooler", None)
    if isinstance(getattr(pooler, "dense", None), nn.Linear) and isinstance(getattr(pooler, "activation", None), nn.Tanh):
        return pooler
    if isinstance(pooler, nn.Linear) and isinstance(getattr(base, "pooler_activation", None), nn.Tanh):
        return pooler
    return None


def _pooler_plan(clf: PreTrainedModel) -> HeadPlan | None:
    """BERT, ALBERT: pooler (dense+tanh) -> dropout -> linear lacks the dropout on the first token.

    It is added as a forward pre-hook on the pooler, active in training only, with the head's
    own dropout rate, so the exported model is the family's plain classifier computing the same
    function at inference. The pooler is re-initialised: the authors' head starts from scratch.
    """
    pooler, drop = _tanh_pooler(clf), _classifier_dropout(clf)
    if pooler is None or drop is None:
        return None

    def apply(model: PreTrainedModel) -> None:
        p = drop.p

        def cls_dropout(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return (F.dropout(args[0], p=p, training=module.training), *args[1:])

        pooler.register_forward_pre_hook(cls_dropout)
        pooler.apply(model._init_weights)

    return apply


def _context_pooler_plan(clf: PreTrainedModel) -> HeadPlan | None:
    """DeBERTa: ``ContextPooler`` (first token -> dropout -> dense -> ``pooler_hidden_act``) ->
    dropout -> linear. Its activation is read from the config at every forward, so setting it to
    tanh is saved with the export; its dropout is set to the head's rate and the pooler re-initialised."""
    pooler, drop = getattr(clf, "pooler", None), _classifier_dropout(clf)
    pooler_drop = getattr(pooler, "dropout", None)
    if (drop is None or not isinstance(pooler, nn.Module) or not hasattr(clf.config, "pooler_hidden_act")
            or not isinstance(getattr(pooler, "dense", None), nn.Linear) or not isinstance(pooler_drop, nn.Dropout)):
        return None  # fmt: skip
    context_pooler, context_drop = pooler, pooler_drop

    def apply(model: PreTrainedModel) -> None:
        model.config.pooler_hidden_act = "tanh"
        model.config.pooler_dropout = context_drop.p = drop.p
        context_pooler.apply(model._init_weights)

    return apply


def _computes_authors_head(head: nn.Module) -> bool:
    """Whether ``head(features)`` is out_proj(tanh(dense(features[:, 0]))) at inference.

    Checked on a copy with random weights, so it also works on a model built on the meta device
    and catches an activation the module does not expose (RoBERTa's inline ``torch.tanh``)."""
    probe = copy.deepcopy(head).to_empty(device="cpu").float().eval()
    dense, out = probe.get_submodule("dense"), probe.get_submodule("out_proj")
    if not isinstance(dense, nn.Linear):
        return False
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in probe.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
        features = torch.randn(2, 3, dense.in_features, generator=generator)
        try:
            got = probe(features)
        except (TypeError, RuntimeError, ValueError):  # a head that needs more than the features
            return False
        return torch.allclose(got, out(torch.tanh(dense(features[:, 0]))), atol=1e-5)


def _first_token_head_plan(clf: PreTrainedModel) -> HeadPlan | None:
    """RoBERTa, XLM-R, MPNet: the checkpoint's own head already is the authors' one (first token
    -> dropout -> dense -> tanh -> dropout -> out_proj), freshly initialised when the MLM
    checkpoint has none: nothing to change."""
    head = getattr(clf, "classifier", None)
    if not (isinstance(head, nn.Module) and isinstance(getattr(head, "dense", None), nn.Linear)
            and isinstance(getattr(head, "out_proj", None), nn.Linear)):  # fmt: skip
        return None
    return (lambda model: None) if _computes_authors_head(head) else None


def _authors_plan(clf: PreTrainedModel) -> HeadPlan | None:
    for plan in (_pooler_plan, _context_pooler_plan, _first_token_head_plan):
        found = plan(clf)
        if found is not None:
            return found
    return None


def _refusal(clf: PreTrainedModel) -> str:
    family = clf.config.model_type
    why = _NO_AUTHORS_HEAD.get(family, "l3m knows no way to make its head compute it")
    return (f"model.head: authors is not available for {family} ({type(clf).__name__}): the authors' head "
            f"(first token -> dropout -> dense+tanh -> dropout -> linear) cannot be built while the export stays a "
            f"plain {type(clf).__name__}; {why}. Use model.head: auto (the family's own head).")  # fmt: skip


def authors_head_unsupported(config: PretrainedConfig | str) -> str | None:
    """None when ``model.head: authors`` works for this model, else why not (naming the family).

    ``config`` is the model's config or a ``model_type`` (e.g. ``"distilbert"``). The classifier
    is built on the meta device, so the check costs no weights and no download.
    """
    cfg = AutoConfig.for_model(config) if isinstance(config, str) else config
    try:
        with torch.device("meta"):
            clf = AutoModelForSequenceClassification.from_config(cfg)
    except ValueError:  # transformers has no sequence-classification class for this model type
        return (f"model.head: authors is not available for {cfg.model_type}: transformers has no "
                f"AutoModelForSequenceClassification for it, so it has no head to make the authors' one")  # fmt: skip
    return None if _authors_plan(clf) is not None else _refusal(clf)


def apply_head(model: nn.Module, kind: str) -> None:
    """Make the classifier's head the authors' one when ``kind == "authors"``.

    The authors' head is CLS -> dropout -> dense+tanh -> dropout -> linear, freshly initialised
    (their ``cls_pooler`` + feedforward). How depends on the family's head layout (the plans
    above); the exported model is always the family's plain ``...ForSequenceClassification``.
    A family whose plain classifier cannot compute it is refused (``authors_head_unsupported``
    says so before a run starts): never a silent fallback to another head.
    """
    if kind == "auto":
        return
    clf = find_classifier(model)
    plan = _authors_plan(clf)
    if plan is None:
        raise ValueError(_refusal(clf))
    plan(clf)
