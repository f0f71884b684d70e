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

Features that carry an ``example_id`` (training rows, see ``l3m.train``) are masked with draws
keyed by (seed, example id, ``epoch``) instead of the batch's generator stream: an example's
masks then do not depend on which batch or process it lands in, so ``torchrun`` with N
processes masks every example as one process does (the Trainer sets ``epoch`` on every rank
through a callback; an example can sit on another rank in the next epoch). The
draws are uniform variates compared with the same probabilities, so the masking distribution
is unchanged. The MLM texts drawn from a pool (the unlabelled corpus, or the train texts of
``mlm_batch: independent``) are keyed the same way, by the batch slot that draws them: the k-th
draw for example e in epoch t picks its text and masks it with a generator of (seed, "pool", e,
k, t). So those draws are rank-distinct under torchrun (each rank holds other examples), a run
resumed mid-epoch draws what the uninterrupted run drew, and N processes draw the texts one
process draws. Only features without an id (direct use of the collator) use the stream.

Each training batch also carries its example ids (``EXAMPLE_ID``) and its masking counts
(``MASKING_COUNTS``: content tokens, selected tokens, expected selections); the Trainer pops them
in its training step (``l3m.trainer.TrainProgress``), so only batches that were trained on are
counted, once, whatever the data loader prefetched or a resume skipped.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from l3m.masking.base import FLOAT_COLUMNS, INT_COLUMNS, MaskingStrategy

_TOKENIZER_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")
EXAMPLE_ID = "example_id"
MASKING_COUNTS = "masking_counts"


@dataclass
class Draws:
    """Uniform variates per token for steps 1-3 and the random replacement tokens (B x L)."""

    select: torch.Tensor
    replace: torch.Tensor
    randomise: torch.Tensor
    words: torch.Tensor


def example_seed(seed: int, example_id: int | str, epoch: int) -> int:
    """A 63-bit generator seed for one example's masking in one epoch under a run seed."""
    digest = hashlib.blake2b(f"{seed}:{example_id}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def pool_slot(example_id: int, k: int) -> str:
    """The key of the k-th pool text drawn beside example ``example_id`` (its pick and its masks)."""
    return f"pool:{example_id}:{k}"


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
    # True: the MLM batch is drawn from the pool alone, independently of the classification
    # batch (the L3Masking authors' setup: their MLM iterator runs over the task texts on its own).
    independent_mlm: bool = False
    # The MLM side's features of each train row by example id, when they differ from the
    # classification features (a domain's MLM text transform, l3m.data.transforms): the masked
    # copy of a batch is then built from these, padded on its own.
    mlm_twins: Mapping[int, dict[str, Any]] | None = None
    stats: MaskingStats = field(default_factory=MaskingStats)
    epoch: int = 0  # part of the keyed draws' key; the Trainer's callback advances it

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
        ids = [f.get(EXAMPLE_ID) for f in features]
        if all(i is not None for i in ids):
            batch[EXAMPLE_ID] = torch.as_tensor(ids, dtype=torch.long)
        if not self.strategy.uses_mlm:
            return batch
        keys: list[int | str | None] = list(ids)
        separate = self.mlm_twins is not None
        if self.mlm_twins is not None:
            features = [self.mlm_twins[int(f[EXAMPLE_ID])] for f in features]
        if self.mlm_pool is not None and len(self.mlm_pool) > 0:
            # MLM on the batch's texts plus as many texts drawn (seeded) from the unlabelled
            # in-domain corpus; that batch is padded on its own.
            drawn, slots = self._draw_pool(ids)
            features = drawn if self.independent_mlm else list(features) + drawn
            keys = slots if self.independent_mlm else keys + slots
            separate = True
        if separate:
            mlm_batch, view = self._pad(features)
            batch["mlm_attention_mask"] = mlm_batch["attention_mask"]
            if "token_type_ids" in mlm_batch:
                batch["mlm_token_type_ids"] = mlm_batch["token_type_ids"]
        special = view["special_tokens_mask"]
        probs = self.strategy.selection_probs(view).float().masked_fill(special, 0.0)
        word_ids = view.get("word_ids") if self.strategy.whole_word else None
        draws = self._keyed_draws(keys, view["attention_mask"]) if self.seed is not None else None
        batch["mlm_input_ids"], batch["mlm_labels"] = self.mask_tokens(view["input_ids"].clone(), probs, word_ids, draws)
        counts = (int((~special).sum()), int((batch["mlm_labels"] != -100).sum()), float(probs.sum()))
        self.stats.content_tokens += counts[0]
        self.stats.selected_tokens += counts[1]
        self.stats.expected_selected += counts[2]
        batch[MASKING_COUNTS] = torch.tensor(counts, dtype=torch.float64)
        return batch

    def _draw_pool(self, ids: list[Any]) -> tuple[list[dict[str, Any]], list[int | str | None]]:
        """The pool texts of one batch and their draw keys: keyed by batch slot when every example
        has an id (the module docstring), else from the stream (keys None)."""
        assert self.mlm_pool is not None
        k, n = self.pool_per_batch or len(ids), len(self.mlm_pool)
        if self.seed is None or any(i is None for i in ids):
            picks = torch.randint(n, (k,), generator=self.generator).tolist()
            return [self.mlm_pool[i] for i in picks], [None] * k
        slots: list[int | str | None] = [pool_slot(int(ids[j % len(ids)]), j // len(ids)) for j in range(k)]
        # The pick has a key of its own: its masks are drawn from a generator of the slot's key.
        picks = [int(torch.randint(n, (1,), generator=self._keyed(f"{s}:pick")).item()) for s in slots]
        return [self.mlm_pool[i] for i in picks], slots

    def _keyed(self, key: int | str) -> torch.Generator:
        return torch.Generator().manual_seed(example_seed(int(self.seed or 0), key, self.epoch))

    def _keyed_draws(self, keys: Sequence[int | str | None], attention: torch.Tensor) -> Draws | None:
        """Keyed draws per row when the batch's rows carry keys (example ids, pool slots: see the
        module docstring); rows without a key draw from the stream."""
        if all(k is None for k in keys):
            return None
        shape, vocab = attention.shape, len(self.tokenizer)
        # 1.0 never falls below a probability: padding is never selected whatever its draw.
        select, replace, randomise = (torch.ones(shape) for _ in range(3))
        words = torch.zeros(shape, dtype=torch.long)
        for i in range(shape[0]):
            key = keys[i] if i < len(keys) else None
            g = self.generator if key is None else self._keyed(key)
            pos = attention[i].nonzero().squeeze(1)  # the row's tokens, wherever the padding is
            for t in (select, replace, randomise):
                t[i, pos] = torch.rand(len(pos), generator=g)
            words[i, pos] = torch.randint(vocab, (len(pos),), generator=g)
        return Draws(select, replace, randomise, words)

    def mask_tokens(
        self, inputs: torch.Tensor, probs: torch.Tensor, word_ids: torch.Tensor | None = None,
        draws: Draws | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-4 above; ``probs`` already zero where masking is not allowed. With ``draws``
        each Bernoulli(p) is ``u < p`` on the given variates, else a draw on the stream."""
        if draws is not None:
            return self._mask_with(inputs, probs, word_ids, draws)
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

    def _mask_with(
        self, inputs: torch.Tensor, probs: torch.Tensor, word_ids: torch.Tensor | None, draws: Draws
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mask_tokens`` on precomputed variates (the keyed path)."""
        spec = self.strategy.spec
        labels = inputs.clone()
        selected = draws.select < probs
        if word_ids is not None:
            selected = selected.gather(1, first_token_of_word(word_ids)) & (probs > 0)
        labels[~selected] = -100
        replaced = (draws.replace < spec.mask_replace) & selected
        if self.tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token")
        inputs[replaced] = self.tokenizer.mask_token_id
        if spec.mask_replace == 1 or spec.random_replace == 0:
            return inputs, labels
        scaled = spec.random_replace / (1 - spec.mask_replace)
        randomised = (draws.randomise < scaled) & selected & ~replaced
        inputs[randomised] = draws.words[randomised]
        return inputs, labels
