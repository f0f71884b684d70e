"""The multi-task model: one shared encoder, a classification head and the pretrained MLM head.

Built from two transformers models so that the pieces keep their standard behaviour:

* ``classifier_model`` = ``AutoModelForSequenceClassification.from_pretrained(base)``: encoder
  + task head (for BERT: pooled first token, dropout, linear). This is what gets exported, so
  serving loads a plain ``AutoModelForSequenceClassification``.
* ``mlm_model`` = ``AutoModelForMaskedLM.from_pretrained(base)`` whose encoder is *replaced*
  by the classifier's (shared), its decoder re-tied to the shared input embeddings, so the
  MLM head keeps its pretrained weights (the authors start from RobertaForMaskedLM too).

Loss (L3Masking Sec. 3, the authors' fixed-weight "default" task weighting):
    L = L_cls(clean input) + lambda * L_mlm(masked copy of the same texts).
``task_losses`` gives the two terms unweighted, for weightings that learn the weights
(``l3m.weighting``: META-TARTAN takes each task's gradient separately).
The MLM head is applied only at selected positions: the vocabulary projection is the
dominant MLM cost, and the loss equals transformers' (mean CE over non -100 labels). That needs a
head that is one position-wise module (BERT ``cls``, RoBERTa ``lm_head``); it is checked once on
a short input against the masked LM's own forward, and a head that takes more than the hidden
states (DeBERTa-v2's ``lm_predictions`` with ``legacy: false``) or returns a tuple (XLM) trains
through the masked LM's own forward instead (the same loss, the logits at every position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import ModelOutput

from l3m.quiet import quiet_loading_bars

quiet_loading_bars()  # no per-load 'Loading weights' bar (l3m.quiet)


@dataclass
class MultiTaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def share_encoder(classifier: PreTrainedModel, mlm: PreTrainedModel) -> None:
    """Point ``mlm`` at the classifier's encoder and re-tie its decoder to the shared embeddings."""
    out = mlm.get_output_embeddings()
    # Re-tie only a decoder that was tied: some families' ``get_output_embeddings`` returns another
    # layer (DeBERTa-v2 with ``legacy: false`` returns its head's dense), which must keep its weight.
    tied = out is not None and out.weight is mlm.get_input_embeddings().weight
    setattr(mlm, mlm.base_model_prefix, classifier.base_model)
    if tied:
        out.weight = classifier.get_input_embeddings().weight


class MultiTaskModel(nn.Module):
    # Read by Trainer when it reloads a checkpoint.
    _keys_to_ignore_on_save = None
    # forward() takes **kwargs (the collator's extra columns), which transformers' Trainer reads as
    # "the model scales its loss for gradient accumulation itself" and then skips dividing the
    # loss by the accumulation steps; it does not, so say so.
    accepts_loss_kwargs = False

    def __init__(self, classifier_model: PreTrainedModel, mlm_model: PreTrainedModel | None = None,
                 mlm_weight: float = 1.0) -> None:
        super().__init__()
        self.classifier_model = classifier_model
        self.mlm_model = mlm_model
        self.mlm_weight = mlm_weight
        self.last_losses: dict[str, torch.Tensor] = {}
        heads = [] if mlm_model is None else [
            m for n, m in mlm_model.named_children() if n != mlm_model.base_model_prefix
        ]
        # One head module (BERT ``cls``, RoBERTa ``lm_head``) can be applied to gathered
        # positions; other layouts fall back to the model's own forward.
        self._mlm_head = heads[0] if len(heads) == 1 and self._head_is_positionwise(heads[0]) else None

    @property
    def config(self):  # noqa: ANN201  (Trainer reads model.config)
        return self.classifier_model.config

    def _head_is_positionwise(self, head: nn.Module) -> bool:
        """``head(hidden[selected])`` == the masked LM's own logits there (eval mode, no RNG used)."""
        assert self.mlm_model is not None
        cfg: Any = self.mlm_model.config
        ids = torch.randint(5, max(6, int(cfg.vocab_size)), (2, 8), generator=torch.Generator().manual_seed(0))
        ids = ids.to(next(self.mlm_model.parameters()).device)
        selected = torch.zeros_like(ids, dtype=torch.bool)
        selected[0, 2] = selected[1, 5] = True
        was_training = self.mlm_model.training
        self.mlm_model.eval()
        try:
            with torch.no_grad():
                own = self.mlm_model(input_ids=ids).logits[selected].float()
                hidden = self.classifier_model.base_model(input_ids=ids)[0]
                mine = head(hidden[selected])
                return isinstance(mine, torch.Tensor) and mine.shape == own.shape and bool(
                    torch.allclose(mine.float(), own, atol=1e-4, rtol=1e-4))
        except Exception:  # noqa: BLE001 - any failure of the shortcut means: use the own forward
            return False
        finally:
            self.mlm_model.train(was_training)

    def mlm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 token_type_ids: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        assert self.mlm_model is not None
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        selected = labels != -100
        if self._mlm_head is None:
            logits = self.mlm_model(input_ids=input_ids, **kwargs).logits[selected]
        else:
            hidden = self.classifier_model.base_model(input_ids=input_ids, **kwargs)[0]
            logits = self._mlm_head(hidden[selected])
        # Sum / max(count, 1): a batch with nothing selected contributes 0, not NaN.
        loss = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
        return loss / selected.sum().clamp_min(1)

    def task_losses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                    mlm_input_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                    mlm_attention_mask: torch.Tensor | None = None, mlm_token_type_ids: torch.Tensor | None = None,
                    with_mlm: bool = True, **_: object) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The unweighted task losses (``cls``, and ``mlm`` when computed) and the class logits.

        A loss weighting (``l3m.weighting``) that needs each task's gradient reads them here.
        """
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.classifier_model(input_ids=input_ids, labels=labels, **kwargs)
        losses = {} if out.loss is None else {"cls": out.loss}
        if (with_mlm and self.training and self.mlm_model is not None and out.loss is not None
                and mlm_input_ids is not None and mlm_labels is not None):
            # The MLM batch has its own padding when it carries extra (unlabelled) texts.
            own = mlm_attention_mask is not None
            mlm = self.mlm_loss(mlm_input_ids, mlm_attention_mask if own else attention_mask,
                                mlm_token_type_ids if own else token_type_ids, mlm_labels)
            self.last_losses = {"cls_loss": out.loss.detach(), "mlm_loss": mlm.detach()}
            losses["mlm"] = mlm
        return losses, out.logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                mlm_input_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                mlm_attention_mask: torch.Tensor | None = None, mlm_token_type_ids: torch.Tensor | None = None,
                **_: object) -> MultiTaskOutput:
        losses, logits = self.task_losses(input_ids, attention_mask, token_type_ids, labels, mlm_input_ids,
                                          mlm_labels, mlm_attention_mask, mlm_token_type_ids,
                                          with_mlm=self.mlm_weight > 0)
        loss = losses.get("cls")
        if loss is not None and "mlm" in losses:
            loss = loss + self.mlm_weight * losses["mlm"]
        return MultiTaskOutput(loss=loss, logits=logits)


def alias_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with another name (the shared encoder, tied decoder)."""
    by_ptr: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        by_ptr.setdefault(tensor.data_ptr(), []).append(name)
    return {n for names in by_ptr.values() if len(names) > 1 for n in names}


def build_multitask_model(base: str, label_names: list[str], *, with_mlm: bool, mlm_weight: float = 1.0,
                          revision: str | None = None) -> MultiTaskModel:
    id2label = dict(enumerate(label_names))
    classifier = AutoModelForSequenceClassification.from_pretrained(
        base, revision=revision, num_labels=len(label_names), id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    mlm = None
    if with_mlm:
        mlm = AutoModelForMaskedLM.from_pretrained(base, revision=revision)
        if type(mlm.base_model) is not type(classifier.base_model):  # refused up front by l3m.capabilities
            raise ValueError(f"{type(classifier).__name__}'s encoder ({type(classifier.base_model).__name__}) is not "
                             f"{type(mlm).__name__}'s ({type(mlm.base_model).__name__}): they cannot share it")
        share_encoder(classifier, mlm)
    return MultiTaskModel(classifier, mlm, mlm_weight=mlm_weight)
