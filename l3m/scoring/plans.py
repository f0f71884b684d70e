"""Encoding of texts and the masked-copy plans of the PLL metrics.

A *plan* for one encoded text lists its masked copies: copy r replaces the positions in
``mask[r]`` by [MASK] and reads the scores of ``targets[r]`` off that copy. Every metric and
mode is one such plan, so the forward code never branches on them.

* exact / ``original`` (Salazar et al. 2020): one copy per scorable token t_i,
  mask = {i}; score_i = log p(t_i | x without t_i).
* exact / ``within_word_l2r`` (Kauf & Ivanova 2023, Eq. 3): for subword t_i of word w,
  mask = {i} and every later subword of w (so the model cannot peek at the rest of its own
  word); score_i = log p(t_i | x without t_i..t_end(w)).
* ``strided`` (our approximation, k passes): pass j scores the targets whose rank among the
  scorable tokens is = j (mod k) all at once; its mask is the union of those targets' exact
  mask sets. Every target therefore keeps the masking its exact metric prescribes, plus about
  1/k of the other tokens masked, which is what makes it an approximation: k copies per text
  instead of n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Metric = Literal["original", "within_word_l2r"]
Mode = Literal["exact", "strided"]
METRICS: tuple[str, ...] = ("original", "within_word_l2r")
MODES: tuple[str, ...] = ("exact", "strided")
Item = tuple[str, str | None]


@dataclass(frozen=True)
class EncodedText:
    """One text as the model sees it, plus what the metrics need to know about its tokens."""

    input_ids: np.ndarray  # int64 [L]
    token_type_ids: np.ndarray | None  # int64 [L], None when the tokenizer makes none
    scorable: np.ndarray  # bool [L]: False at special tokens (their score is NaN)
    word_end: np.ndarray  # int64 [L]: last position of the token's word (itself for specials)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.scorable.sum())


@dataclass(frozen=True)
class Plan:
    """The masked copies of one text: ``mask`` bool [c, L], ``targets`` int64 [c, m] (-1 = none)."""

    mask: np.ndarray
    targets: np.ndarray

    @property
    def n_copies(self) -> int:
        return int(self.mask.shape[0])


def normalise_items(items: Sequence[Item | str]) -> list[Item]:
    """Accept bare strings as (text, None); reject anything else early with a clear message."""
    out: list[Item] = []
    for it in items:
        if isinstance(it, str):
            out.append((it, None))
        elif isinstance(it, tuple | list) and len(it) == 2 and isinstance(it[0], str):
            pair = it[1]
            if pair is not None and not isinstance(pair, str):
                raise TypeError(f"text_pair must be str or None, got {type(pair).__name__}")
            out.append((it[0], pair))
        else:
            raise TypeError(f"expected (text, text_pair) or str, got {it!r:.80}")
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    # [UNK] stays scorable (minicons scores it too); the others carry no token to predict.
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    ids.discard(unk)
    return ids


def encode(tokenizer: Any, items: Sequence[Item], max_length: int) -> list[EncodedText]:
    """Encode exactly as training does: ``tokenizer(text, text_pair, truncation=True, max_length)``.

    Items with and without a pair are tokenized in two batched calls (a fast tokenizer cannot mix
    them in one call); batching does not change the ids, as no padding is requested.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("PLL scoring needs a fast tokenizer (word_ids() gives the word boundaries)")
    specials = _special_ids(tokenizer)
    by_marker = not _splits_words(getattr(tokenizer, "backend_tokenizer", None))
    out: list[EncodedText | None] = [None] * len(items)
    # An empty pair is no pair for ``tokenizer(text, "")`` (it tests truthiness), but a batched
    # call would add a second [SEP]: route it with the singles so both agree.
    singles = [i for i, (_, p) in enumerate(items) if not p]
    pairs = [i for i, (_, p) in enumerate(items) if p]
    for idx, with_pair in ((singles, False), (pairs, True)):
        if not idx:
            continue
        texts = [items[i][0] for i in idx]
        enc = tokenizer(
            texts,
            [items[i][1] for i in idx] if with_pair else None,
            truncation=True,
            max_length=max_length,
        )
        for j, i in enumerate(idx):
            out[i] = _from_encoding(enc, j, specials, by_marker)
    return [e for e in out if e is not None]


def _splits_words(backend: Any) -> bool:
    """Whether word_ids() holds: the pre-tokenizer splits "a b" into two words.

    Without a pre-tokenizer (SentencePiece conversions that put the "▁" in the normalizer), or with
    one that does not split (``Metaspace(split=False)``), a fast tokenizer reports one word per
    sequence: the word starts are then read off the pieces.
    """
    if backend is None:
        return True
    pre = backend.pre_tokenizer
    return pre is not None and len(pre.pre_tokenize_str("a b")) > 1


# Pieces that start a word: SentencePiece "▁" and byte-level BPE "Ġ" mark the word's first piece
# (WordPiece marks the others with "##", and always has a pre-tokenizer, so word_ids() holds).
WORD_START = ("▁", "Ġ")


def _marker_words(tokens: list[str], seq_ids: list[int | None]) -> list[int | None]:
    """Word ids from the pieces' word-start markers (a new sequence starts a new word too).

    A piece belongs to the word of its first non-marker character. Without a splitting
    pre-tokenizer a piece can end with the next word's marker (",▁", "▁with▁"): the piece after
    it then starts a word. A piece of markers only ("▁") starts the word it precedes.
    """
    out: list[int | None] = []
    word = -1
    prev = ""
    for p, (t, s) in enumerate(zip(tokens, seq_ids, strict=True)):
        if s is None:
            out.append(None)
            prev = ""
            continue
        after_marker = prev.endswith(WORD_START) and bool(prev.strip("".join(WORD_START)))
        if word < 0 or t.startswith(WORD_START) or after_marker or seq_ids[p - 1] != s:
            word += 1
        out.append(word)
        prev = t
    return out


def _from_encoding(enc: Any, j: int, specials: set[int], by_marker: bool = False) -> EncodedText:
    ids = np.asarray(enc["input_ids"][j], dtype=np.int64)
    tti = enc.get("token_type_ids")
    tt = np.asarray(tti[j], dtype=np.int64) if tti is not None else None
    seq_ids = enc.sequence_ids(j)
    word_ids = _marker_words(enc.tokens(j), seq_ids) if by_marker else enc.word_ids(j)
    L = len(ids)
    scorable = np.array(
        [seq_ids[p] is not None and int(ids[p]) not in specials for p in range(L)], dtype=bool
    )
    # A word is identified by (sequence id, word id): word ids restart in the second sequence
    # of a pair, so the word id alone would merge two unrelated words.
    word_end = np.arange(L, dtype=np.int64)
    for p in range(L - 2, -1, -1):
        if word_ids[p] is not None and (seq_ids[p], word_ids[p]) == (seq_ids[p + 1], word_ids[p + 1]):
            word_end[p] = word_end[p + 1]
    return EncodedText(ids, tt, scorable, word_end)


def _exact_masks(enc: EncodedText, metric: Metric, targets: np.ndarray) -> np.ndarray:
    pos = np.arange(enc.length)
    start = targets[:, None]
    if metric == "original":
        return pos[None, :] == start
    if metric == "within_word_l2r":
        # minicons bounds the right-context by the last scorable token; word_end never passes
        # it because special tokens end every word.
        end = np.minimum(enc.word_end[targets], targets.max(initial=0))[:, None]
        return (pos[None, :] >= start) & (pos[None, :] <= np.maximum(end, start))
    raise ValueError(f"unknown PLL metric {metric!r}; expected one of {METRICS}")


def make_plan(enc: EncodedText, metric: Metric, mode: Mode = "exact", stride: int = 4) -> Plan:
    """The masked copies that score every scorable token of ``enc`` (see the module docstring)."""
    targets = np.flatnonzero(enc.scorable).astype(np.int64)
    exact = _exact_masks(enc, metric, targets)
    if mode == "exact":
        return Plan(exact, targets[:, None])
    if mode != "strided":
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {MODES}")
    if stride < 2:
        raise ValueError("strided mode needs stride >= 2")
    n = targets.shape[0]
    k = min(stride, max(n, 1))
    m = -(-n // k) if n else 0
    mask = np.zeros((k if n else 0, enc.length), dtype=bool)
    tgt = np.full((mask.shape[0], max(m, 1)), -1, dtype=np.int64)
    for j in range(mask.shape[0]):
        rows = np.arange(j, n, k)
        mask[j] = exact[rows].any(axis=0)
        tgt[j, : rows.shape[0]] = targets[rows]
    return Plan(mask, tgt)
