"""One collator for every masking strategy, with transformers' MLM conventions.

Per batch it returns the clean classification inputs (``input_ids``, ``attention_mask``,
``token_type_ids``, ``labels``) and, when the strategy uses MLM, a masked copy
``mlm_input_ids`` with ``mlm_labels`` (-100 where not selected). With an ``mlm_pool`` (the
unlabelled in-domain corpus) the MLM batch also holds texts drawn from it, and comes with its
own ``mlm_attention_mask`` / ``mlm_token_type_ids``. The masking follows
``DataCollatorForLanguageModeling.torch_mask_tokens`` step for step, including the order of
the random draws on the seeded generator, so ``random`` reproduces it exactly:
  1. selected ~ Bernoulli(probs), probs zeroed at special tokens and padding;
  2. of those, ``mask_replace`` (80%) become [MASK];
  3. of the rest, ``random_replace / (1 - mask_replace)`` (10% overall) a random token;
  4. the remaining 10% stay unchanged (but are still predicted).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from l3m.masking.base import FLOAT_COLUMNS, INT_COLUMNS, MaskingStrategy

_TOKENIZER_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")


@dataclass
class MaskingStats:
    """Running totals over collated batches: realised vs expected masking rate."""

    content_tokens: int = 0
    selected_tokens: int = 0
    expected_selected: float = 0.0

    @property
    def realised_rate(self) -> float:
        return self.selected_tokens / self.content_tokens if self.content_tokens else 0.0

    @property
    def expected_rate(self) -> float:
        return self.expected_selected / self.content_tokens if self.content_tokens else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "content_tokens": self.content_tokens,
            "selected_tokens": self.selected_tokens,
            "realised_rate": self.realised_rate,
            "expected_rate": self.expected_rate,
        }


def _pad_column(rows: list[Any], length: int, value: float, dtype: torch.dtype, left: bool) -> torch.Tensor:
    """Pad per-token lists to ``length``; a row that lacks the column (None) is all ``value``."""
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r is None:
            continue
        t = torch.as_tensor(list(r)[:length], dtype=dtype)
        if left:
            out[i, length - len(t) :] = t
        else:
            out[i, : len(t)] = t
    return out


def first_token_of_word(word_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first token of each token's word (word ids per row, -1 outside words)."""
    B, L = word_ids.shape
    pos = torch.arange(L).expand(B, L)
    prev = torch.cat([torch.full((B, 1), -2, dtype=word_ids.dtype), word_ids[:, :-1]], dim=1)
    is_start = (word_ids != prev) | (word_ids < 0)
    return torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=1).values


@dataclass
class MaskingCollator:
    tokenizer: PreTrainedTokenizerBase
    strategy: MaskingStrategy
    seed: int | None = None
    pad_to_multiple_of: int | None = None
    # Extra MLM texts (encoded feature dicts, e.g. the unlabelled in-domain corpus); None = the
    # MLM batch is the classification batch's own texts.
    mlm_pool: Sequence[dict[str, Any]] | None = None
    pool_per_batch: int | None = None  # default: as many as the batch has
    stats: MaskingStats = field(default_factory=MaskingStats)

    def __post_init__(self) -> None:
        if self.strategy.uses_mlm and self.tokenizer.mask_token is None:
            raise ValueError("the tokenizer has no mask token; MLM strategies need one")
        spec = self.strategy.spec
        if spec.mask_replace + spec.random_replace > 1:
            raise ValueError("mask_replace + random_replace must be <= 1")
        self.generator: torch.Generator | None = None

    def _create_rng(self, seed: int) -> None:
        # Same rule as transformers: main process uses the seed, DataLoader worker k seed + k.
        offset = 0
        if mp.current_process().name != "MainProcess":
            info = torch.utils.data.get_worker_info()
            offset = info.id if info is not None else 0
        self.generator = torch.Generator().manual_seed(seed + offset)

    def _pad(self, features: Sequence[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Tokenizer padding plus the strategy's view: specials and the padded extra columns."""
        base = [{k: f[k] for k in _TOKENIZER_KEYS if k in f} for f in features]
        batch = dict(self.tokenizer.pad(base, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of))
        special = batch.pop("special_tokens_mask", None)
        if special is None:
            special = torch.tensor(
                [self.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in batch["input_ids"].tolist()]
            )
        special = special.bool() | (batch["attention_mask"] == 0)
        view = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "special_tokens_mask": special}
        if self.strategy.uses_mlm:
            length, left = batch["input_ids"].shape[1], self.tokenizer.padding_side == "left"
            for cols, fill, dtype in ((FLOAT_COLUMNS, float("nan"), torch.float32), (INT_COLUMNS, -1, torch.long)):
                for col in cols:
                    if any(col in f for f in features):
                        view[col] = _pad_column([f.get(col) for f in features], length, fill, dtype, left)
        return batch, view

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.seed is not None and self.generator is None:
            self._create_rng(self.seed)
        batch, view = self._pad(features)
        for key in ("label", "labels"):
            if key in features[0]:
                batch["labels"] = torch.as_tensor([f[key] for f in features], dtype=torch.long)
        if not self.strategy.uses_mlm:
            return batch
        if self.mlm_pool is not None and len(self.mlm_pool) > 0:
            # MLM on the batch's texts plus as many texts drawn (seeded) from the unlabelled
            # in-domain corpus; that batch is padded on its own.
            k = self.pool_per_batch or len(features)
            picks = torch.randint(len(self.mlm_pool), (k,), generator=self.generator).tolist()
            mlm_batch, view = self._pad(list(features) + [self.mlm_pool[i] for i in picks])
            batch["mlm_attention_mask"] = mlm_batch["attention_mask"]
            if "token_type_ids" in mlm_batch:
                batch["mlm_token_type_ids"] = mlm_batch["token_type_ids"]
        special = view["special_tokens_mask"]
        probs = self.strategy.selection_probs(view).float().masked_fill(special, 0.0)
        word_ids = view.get("word_ids") if self.strategy.whole_word else None
        batch["mlm_input_ids"], batch["mlm_labels"] = self.mask_tokens(view["input_ids"].clone(), probs, word_ids)
        self.stats.content_tokens += int((~special).sum())
        self.stats.selected_tokens += int((batch["mlm_labels"] != -100).sum())
        self.stats.expected_selected += float(probs.sum())
        return batch

    def mask_tokens(
        self, inputs: torch.Tensor, probs: torch.Tensor, word_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-4 above; ``probs`` already zero where masking is not allowed."""
        spec, g = self.strategy.spec, self.generator
        labels = inputs.clone()
        selected = torch.bernoulli(probs, generator=g).bool()
        if word_ids is not None:
            # One draw per word: every token copies the draw of its word's first token.
            selected = selected.gather(1, first_token_of_word(word_ids)) & (probs > 0)
        labels[~selected] = -100
        replaced = torch.bernoulli(torch.full(labels.shape, spec.mask_replace), generator=g).bool() & selected
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:  # __post_init__ refuses such tokenizers for MLM strategies
            raise ValueError("the tokenizer has no mask token")
        inputs[replaced] = mask_id
        if spec.mask_replace == 1 or spec.random_replace == 0:
            return inputs, labels
        scaled = spec.random_replace / (1 - spec.mask_replace)
        randomised = torch.bernoulli(torch.full(labels.shape, scaled), generator=g).bool() & selected & ~replaced
        random_words = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long, generator=g)
        inputs[randomised] = random_words[randomised]
        return inputs, labels
