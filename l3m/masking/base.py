"""The masking-strategy interface and its registry.

A strategy only decides *which* tokens the auxiliary MLM loss should predict: it maps a padded
batch to a matrix of per-token selection probabilities. Everything else (Bernoulli sampling,
80/10/10 replacement, -100 labels, never masking specials or padding) lives in one collator
(``l3m.masking.collator``), so strategies cannot drift apart on those conventions. This mirrors
transformers' ``DataCollatorForLanguageModeling``, whose masking is a probability matrix too.

Registering a strategy (``register_masking("kind", Cls)``) is all it takes for the collator
contract tests (tests/test_masking_contract.py) to run over it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from l3m.config import MaskingSpec
from l3m.plugins import Registry

# Extra per-token columns a strategy may ask the collator to pad and pass through. Float
# columns are padded with NaN, integer columns with -1.
FLOAT_COLUMNS = ("token_logp", "selective_mask")
INT_COLUMNS = ("word_ids",)


class MaskingStrategy(ABC):
    """Maps a padded batch to selection probabilities ``Tensor[B, L]`` in [0, 1].

    ``batch`` holds ``input_ids``, ``attention_mask``, ``special_tokens_mask`` (bool, True at
    special tokens and padding) and the padded extra columns named in ``columns``. The
    collator zeroes specials/padding afterwards, but strategies should not rely on that for
    their own normalisation: "content tokens" are ``~special_tokens_mask``.
    """

    kind: ClassVar[str] = ""
    # False for single-task learning: no MLM batch is built and no MLM loss is computed.
    uses_mlm: ClassVar[bool] = True
    # Dataset columns (beyond the tokenizer's) the strategy reads; training attaches them.
    columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: MaskingSpec) -> None:
        self.spec = spec

    @property
    def rate(self) -> float:
        return self.spec.rate

    @property
    def whole_word(self) -> bool:
        return self.spec.whole_word

    @abstractmethod
    def selection_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token probability of being selected for MLM prediction, shape ``[B, L]``."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.spec.model_dump()}


_REGISTRY: Registry[MaskingStrategy] = Registry("masking")


def register_masking(kind: str, cls: type[MaskingStrategy]) -> None:
    """Make ``cls`` buildable from a ``MaskingSpec(kind=kind)``."""
    _REGISTRY.register(kind, cls)


def registered_kinds() -> list[str]:
    return _REGISTRY.kinds()


def build_masking(spec: MaskingSpec) -> MaskingStrategy:
    return _REGISTRY.get(spec.kind)(spec)


def content_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """True at tokens that may be masked: not special, not padding."""
    special = batch["special_tokens_mask"].bool()
    if "attention_mask" in batch:
        special = special | (batch["attention_mask"] == 0)
    return ~special
