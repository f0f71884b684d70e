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

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

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
    LayerNorm weights are never decayed.
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
        out.append({**group, "params": heads, "lr": head_lr, "weight_decay": 0.0 if undecayed else head_wd})
    return [g for g in out if g["params"]]


def apply_head(model: nn.Module, kind: str) -> None:
    """Make the classifier's head the authors' one when ``kind == "authors"``.

    The authors' head is CLS -> dropout -> dense+tanh -> dropout -> linear, freshly initialised
    (their ``cls_pooler`` + feedforward). RoBERTa's own head is exactly that. A BERT-style head
    (pooler dense+tanh on CLS -> dropout -> linear) lacks the first dropout: it is added as a
    forward pre-hook on the pooler, active in training only, so the exported model is a plain
    ``BertForSequenceClassification`` computing the same function at inference. The pooler is
    re-initialised, as the authors' head starts from scratch.
    """
    if kind == "auto":
        return
    clf = find_classifier(model)
    pooler = getattr(clf.base_model, "pooler", None)
    if pooler is None:  # RoBERTa-style: the checkpoint's head is already the authors' one
        return
    p = getattr(clf.config, "classifier_dropout", None)
    p = clf.config.hidden_dropout_prob if p is None else p

    def cls_dropout(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (F.dropout(args[0], p=p, training=module.training), *args[1:])

    pooler.register_forward_pre_hook(cls_dropout)
    pooler.apply(clf._init_weights)
