"""Learned binary weight masks (Zhao, Lin, Jaggi, Schütze, EMNLP 2020, "Masking as an
Efficient Alternative to Finetuning for Pretrained Language Models").

The pretrained weights stay frozen; each weight W of the selected linear layers gets a
real-valued score s, the forward pass uses W * 1[s >= tau] (tau = 0.01) and gradients reach s
through a straight-through estimator (dL/ds := dL/dM). Only the scores and the task head train.
A trained domain is then stored as one bit per masked weight plus the head
(``weight_mask.safetensors``) and rebuilt exactly from the base model.

Choices, following the authors' code (ptlmasking/maskbert, masking/maskers.py, main.py):

* Layers: every ``nn.Linear`` of the encoder blocks (Q, K, V, attention output, intermediate,
  output) -- modules of the encoder's layer stack (``encoder_layer_stack``, for every family)
  whose name contains ``spec.scope`` -- plus a BERT-style pooler's dense layer, which the authors
  "absorb" into the masked set. Biases are not masked (their ``mask_biases=False``).
* Score init (their default ``MaskedLinear1`` without controlled init): s ~ U(-a, b) with
  a = 0.02 and b = (a + tau) / sparsity - a, so a fraction ``initial_sparsity`` starts below tau.
* Threshold: the paper writes 1[s >= tau], their binarizer 1[s > tau]; the two differ only on a
  measure-zero set for continuous scores. We use the paper's ``>=``.
* ``train_head=False``: as in their main.py (``classifier_req_grad=False`` with
  ``mask_classifier=True``) the frozen head is masked too instead of left untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from l3m.config import TunerSpec
from l3m.tuning.base import (
    FisherBatches,
    Tuner,
    find_classifier,
    head_prefixes,
    is_head_param,
    layer_stack_linears,
    register_tuner,
    split_decay,
    tensor_bytes,
    weights_bytes,
)
from l3m.tuning.compact import base_extras, domain_meta, load_domain_file, write_domain_file
from l3m.tuning.packing import pack_mask, unpack_mask

MASK_FILE = "weight_mask.safetensors"
FORMAT = "l3m.weight_mask/1"
INIT_SCALE = 0.02  # the authors' --init_scale


class _BinarizeSTE(torch.autograd.Function):
    """Forward 1[s >= tau]; backward passes the gradient straight through (Zhao et al. 2020)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, tau: float) -> torch.Tensor:
        return (scores >= tau).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def init_scores(shape: torch.Size, tau: float, sparsity: float, device: torch.device) -> torch.Tensor:
    """Scores ~ U(-a, b), P(s < tau) = sparsity (the authors' uniform init, see module doc)."""
    if sparsity <= 0:
        low, high = tau, tau + 2 * INIT_SCALE  # nothing masked at the start
    else:
        low, high = -INIT_SCALE, (INIT_SCALE + tau) / sparsity - INIT_SCALE
    return torch.empty(shape, dtype=torch.float32, device=device).uniform_(low, high)


class MaskedLinear(nn.Module):
    """An ``nn.Linear`` whose frozen weight is multiplied by a learned binary mask.

    It keeps the original ``weight``/``bias`` Parameter objects under the same attribute names,
    so state-dict keys of the wrapped model do not change; only ``<name>.scores`` is added.
    """

    def __init__(self, linear: nn.Linear, tau: float, initial_sparsity: float) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.tau = tau
        # fp32 scores whatever the weight dtype: lr-1e-3 updates would vanish in bf16.
        self.scores = nn.Parameter(init_scores(self.weight.shape, tau, initial_sparsity, self.weight.device))

    def mask(self) -> torch.Tensor:
        return self.scores.detach() >= self.tau

    def merged_weight(self) -> torch.Tensor:
        """W * M exactly as the forward pass computes it (so saved logits are bit-identical)."""
        return self.weight.detach() * self.mask().to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = _BinarizeSTE.apply(self.scores, self.tau).to(self.weight.dtype)
        return F.linear(x, self.weight * mask, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}"


def masked_modules(module: nn.Module) -> dict[str, MaskedLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, MaskedLinear)}


def _linears_to_mask(clf: PreTrainedModel, scope: str, mask_head: bool) -> list[str]:
    """Names of the ``nn.Linear`` s to mask: those of the encoder's layer stack whose name contains
    ``scope``, a BERT-style pooler's dense layer, and with ``mask_head`` the task head's."""
    heads = head_prefixes(clf)
    layers = layer_stack_linears(clf)
    pooler = f"{clf.base_model_prefix}.pooler.dense"
    names = []
    for name, module in clf.named_modules():
        if type(module) is not nn.Linear:  # exact type, as the authors' replace()
            continue
        if is_head_param(name, heads):
            if mask_head:
                names.append(name)
        elif name == pooler or (name in layers and scope in name):
            names.append(name)
    return names


class WeightMaskTuner(Tuner):
    domain_file = MASK_FILE

    def __init__(self, spec: TunerSpec) -> None:
        super().__init__(spec)
        self.base_model_path: str | None = None  # from prepare(); export() can be told otherwise

    def prepare(self, model: nn.Module, fisher_batches: FisherBatches | None = None) -> nn.Module:
        clf = find_classifier(model)
        self.base_model_path = clf.name_or_path or None
        for p in model.parameters():  # every pretrained weight, MLM head included, is frozen
            p.requires_grad_(False)
        names = _linears_to_mask(clf, self.spec.scope, mask_head=not self.spec.train_head)
        if not names:
            raise ValueError(f"weight_mask: no nn.Linear in scope {self.spec.scope!r}")
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = clf.get_submodule(parent_name) if parent_name else clf
            setattr(parent, attr, MaskedLinear(getattr(parent, attr), self.spec.tau, self.spec.initial_sparsity))
        if self.spec.train_head:
            heads = head_prefixes(clf)
            for name, p in clf.named_parameters():
                if is_head_param(name, heads) and not name.endswith(".scores"):
                    p.requires_grad_(True)
        return model

    def optimizer_param_groups(
        self, model: nn.Module, base_lr: float, weight_decay: float
    ) -> list[dict[str, Any]] | None:
        scores = [m.scores for m in masked_modules(model).values()]
        rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".scores")]
        decay, no_decay = split_decay(rest)
        # No weight decay on scores: it would pull them below tau, a sparsity pressure the
        # method does not have (the authors train with weight_decay=0).
        groups = [
            {"params": scores, "lr": self.spec.mask_lr, "weight_decay": 0.0},
            {"params": decay, "lr": base_lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": base_lr, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def sparsity(self, model: nn.Module) -> float:
        """Fraction of masked-out (zeroed) weights over all masked layers."""
        masks = [m.mask() for m in masked_modules(model).values()]
        return 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def export(self, model: nn.Module, out_dir: Path, base_model_path: str | Path | None = None) -> dict[str, int]:
        """Merged classifier for serving + ``weight_mask.safetensors`` (packed masks + what the
        base cannot reproduce: the head and any randomly initialised part, e.g. a pooler the
        MLM checkpoint lacks)."""
        out_dir = Path(out_dir)
        base = base_model_path or self.base_model_path
        if not base:
            raise ValueError("weight_mask.export needs the base model path (prepare() records it)")
        clf = find_classifier(model)
        masked = masked_modules(clf)
        raw = {k: v for k, v in clf.state_dict().items() if not k.endswith(".scores")}
        merged = dict(raw)
        for name, module in masked.items():
            merged[f"{name}.weight"] = module.merged_weight()
        clf.save_pretrained(out_dir, state_dict=merged)

        extras = base_extras(raw, base, clf.config, self.base_revision)
        packed = {name: pack_mask(m.mask()) for name, m in masked.items()}
        meta = {
            **domain_meta(FORMAT, base, self.base_revision),
            "tau": self.spec.tau,
            "shapes": {n: list(m.weight.shape) for n, m in masked.items()},
            "sparsity": self.sparsity(clf),
        }
        sizes = write_domain_file(out_dir / MASK_FILE, {"mask": packed, "extra": extras}, meta, head_prefixes(clf))
        return {"full_model_bytes": weights_bytes(out_dir), "mask_bytes": tensor_bytes(packed.values()), **sizes}

    def rebuild(self, base_model_path: str | Path, out_dir: Path, revision: str | None = None) -> nn.Module:
        """Base weights + stored extras + stored masks -> the trained classifier (plain Linear)."""
        out_dir = Path(out_dir)
        model, tensors, meta = load_domain_file(base_model_path, out_dir, MASK_FILE, revision)
        with torch.no_grad():
            for name, shape in meta["shapes"].items():
                weight = model.get_parameter(f"{name}.weight")
                weight.mul_(unpack_mask(tensors[f"mask/{name}"], shape).to(weight.dtype))
        return model.eval()


register_tuner("weight_mask", WeightMaskTuner)
