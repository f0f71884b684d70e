"""The encoded data of a run: tokenized splits, the run's train rows, their per-token columns.

Split out of ``l3m.train``; scoring (``l3m.inputs``) computes the same train rows beforehand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from l3m.data.loading import LoadedDomain, encode_kwargs


@dataclass
class TrainInputs:
    """What a run needs besides the config: the data and the precomputed per-token columns.

    ``token_logp`` / ``selective_mask`` are aligned with ``loaded.dataset["train"]`` rows and
    each array has the length of that row's ``input_ids`` (the scoring contract). A row no run
    trains on (outside every seed's ``train_limit`` subsample) may hold None: it is never scored.
    """

    loaded: LoadedDomain
    token_logp: list[np.ndarray | None] | None = None
    selective_mask: list[np.ndarray] | None = None
    score_key: str | None = None
    # The unlabelled in-domain corpus (training.use_unlabelled) and its vanilla scores.
    unlabelled: list[str] | None = None
    unlabelled_logp: list[np.ndarray] | None = None
    # What a run's identity calls its data: the snapshot fingerprint (+ the corpus when used).
    data_fingerprint: str = ""
    # The train rows' (text, pair) as the MLM side reads them under a domain's mlm_text
    # transform (l3m.data.transforms); token_logp then belongs to these. None: the rows' own.
    mlm_items: list[tuple[str, str | None]] | None = None

    def __post_init__(self) -> None:
        self.data_fingerprint = self.data_fingerprint or self.loaded.fingerprint


def global_word_ids(enc: Any, i: int | None = None) -> list[int]:
    """Word index per token, unique across the two segments of a pair, -1 at special tokens."""
    words = enc.word_ids(i) if i is not None else enc.word_ids()
    seqs = enc.sequence_ids(i) if i is not None else enc.sequence_ids()
    out, last, gid = [], None, -1
    for w, s in zip(words, seqs, strict=True):
        if w is None:
            out.append(-1)
            continue
        if (w, s) != last:
            gid, last = gid + 1, (w, s)
        out.append(gid)
    return out


def encode(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, has_pair: bool) -> Dataset:
    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pair = batch["text_pair"] if has_pair else None
        enc = tokenizer(batch["text"], pair, return_special_tokens_mask=True, **encode_kwargs(max_length))
        out = dict(enc)
        if tokenizer.is_fast:
            out["word_ids"] = [global_word_ids(enc, i) for i in range(len(batch["text"]))]
        return out

    return ds.map(fn, batched=True, desc="tokenize")


def train_rows(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """The train rows a run of ``seed`` trains on: all, or a seeded subsample of ``limit`` rows.

    A function of its own so scoring can compute the same rows beforehand and score only them.
    """
    if not limit or limit >= n_rows:
        return list(range(n_rows))
    return sorted(np.random.default_rng(seed).permutation(n_rows)[:limit].tolist())


def attach(ds: Dataset, name: str, arrays: Sequence[np.ndarray | None]) -> Dataset:
    """Add a per-token float column, checking each array matches its row's token count."""
    if len(arrays) != ds.num_rows:
        raise ValueError(f"{name}: {len(arrays)} arrays for {ds.num_rows} rows")
    lengths = [len(ids) for ids in ds["input_ids"]]
    for i, (a, n) in enumerate(zip(arrays, lengths, strict=True)):
        if a is None or len(a) != n:
            raise ValueError(f"{name}: row {i} has {None if a is None else len(a)} values for {n} tokens "
                             "(scores computed with another tokenizer or max_length?)")
    return ds.add_column(name, [np.asarray(a, dtype=np.float32).tolist() for a in arrays])


def encode_domain(inputs: TrainInputs, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    loaded = inputs.loaded
    return DatasetDict({k: encode(v, tokenizer, max_length, loaded.has_pair) for k, v in loaded.dataset.items()})


def select_train(train: Dataset, inputs: TrainInputs, rows: list[int]) -> Dataset:
    """The run's train rows with their per-token columns (scores, selective picks) attached."""
    ds = train.select(rows) if len(rows) != train.num_rows else train
    if inputs.token_logp is not None and inputs.mlm_items is None:  # else they go to mlm_side
        ds = attach(ds, "token_logp", [inputs.token_logp[i] for i in rows])
    if inputs.selective_mask is not None:
        ds = attach(ds, "selective_mask", [inputs.selective_mask[i] for i in rows])
    return ds


def mlm_side(inputs: TrainInputs, train_ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
             rows: list[int]) -> Dataset:
    """The MLM side's features of the run's train rows (``train_ds``, carrying ``example_id``):
    ``train_ds`` itself, or under a text transform the transformed texts' encoding with their
    scores and the same example ids (the collator's ``mlm_twins`` / independent pool)."""
    from l3m.masking.collator import EXAMPLE_ID

    if inputs.mlm_items is None:
        return train_ds
    items = [inputs.mlm_items[i] for i in rows]
    has_pair = inputs.loaded.has_pair
    data: dict[str, list[Any]] = {"text": [t for t, _ in items]}
    if has_pair:
        data["text_pair"] = [p or "" for _, p in items]
    ds = encode(Dataset.from_dict(data), tokenizer, max_length, has_pair).remove_columns(list(data))
    if inputs.token_logp is not None:
        ds = attach(ds, "token_logp", [inputs.token_logp[i] for i in rows])
    return ds.add_column(EXAMPLE_ID, rows)


def encode_pool(inputs: TrainInputs, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """The unlabelled corpus as MLM-only features (no label, no selective column)."""
    pool = encode(Dataset.from_dict({"text": inputs.unlabelled or []}), tokenizer, max_length, has_pair=False)
    if inputs.unlabelled_logp is not None:
        pool = attach(pool, "token_logp", inputs.unlabelled_logp)
    return pool.remove_columns("text")
