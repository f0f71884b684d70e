"""Selective Masking (Gu et al., "Train No Evil", EMNLP 2020): mask task-important tokens.

Importance comes from a classifier already fine-tuned on the task. Each text is grown token
by token; with P_k = P(gold | first k content tokens) (special tokens kept in place),
token k is important when its gain P_k - P_{k-1} exceeds ``delta``. Important tokens that are
not stopwords are masked, the largest gains first, capped at ``rate`` of the content tokens.

Note on fidelity: the authors' ``sc_mask_gen.py`` compares the prefix's confidence with the
*full* sentence's (a token is chosen when the prefix gets within ``threshold`` of it, and is
then dropped from the prefix). We implement the gain form, as specified for this project;
both read "does this token move the classifier towards the gold label".

The selection is computed once per (classifier, dataset) and stored (``SelectiveStore``);
the strategy then only reads the stored 0/1 column ``selective_mask``, like L3 reads scores.
The n + 1 prefix evaluations of all texts are batched together, sorted by length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from l3m.locking import exclusive
from l3m.masking.base import MaskingStrategy, content_mask, register_masking

log = logging.getLogger("l3m.selective")

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class SelectiveMasking(MaskingStrategy):
    columns = ("selective_mask",)

    def selection_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "selective_mask" not in batch:
            raise KeyError("selective masking needs the 'selective_mask' column (see compute_selective_masks)")
        sel = torch.nan_to_num(batch["selective_mask"].float(), nan=0.0).clamp(0, 1)
        return sel * content_mask(batch)


register_masking("selective", SelectiveMasking)


def is_stopword(token: str) -> bool:
    word = token.lower().removeprefix("##").lstrip("Ġ▁")
    return word in ENGLISH_STOP_WORDS or not any(ch.isalnum() for ch in word)


def _prefix_rows(input_ids: list[int], special: list[int], type_ids: list[int] | None) -> list[tuple[list[int], list[int] | None]]:
    """Prefix k (k = 0..n) keeps every special token and the first k content tokens."""
    content = [i for i, s in enumerate(special) if not s]
    rows = []
    for k in range(len(content) + 1):
        keep = set(content[:k])
        idx = [i for i in range(len(input_ids)) if special[i] or i in keep]
        rows.append(([input_ids[i] for i in idx], [type_ids[i] for i in idx] if type_ids else None))
    return rows


@torch.no_grad()
def prefix_gold_probs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encodings: Sequence[dict[str, list[int]]],
    labels: Sequence[int],
    *,
    token_budget: int = 16384,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """P(gold | prefix_k) for k = 0..n of every encoded text, batched across texts."""
    jobs: list[tuple[int, int, list[int], list[int] | None]] = []
    for t, enc in enumerate(encodings):
        special = tokenizer.get_special_tokens_mask(enc["input_ids"], already_has_special_tokens=True)
        for k, (ids, types) in enumerate(_prefix_rows(enc["input_ids"], special, enc.get("token_type_ids"))):
            jobs.append((t, k, ids, types))
    counts = np.bincount([j[0] for j in jobs], minlength=len(encodings))
    out = [np.zeros(c, dtype=np.float32) for c in counts]
    jobs.sort(key=lambda j: len(j[2]))
    model.eval().to(device)
    start = 0
    while start < len(jobs):
        # Length-sorted, so each batch pads little; the token budget bounds memory.
        end = start + 1
        while end < len(jobs) and (end - start + 1) * len(jobs[end][2]) <= token_budget:
            end += 1
        chunk = jobs[start:end]
        width = len(chunk[-1][2])
        batch = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        att = torch.zeros_like(batch)
        typ = torch.zeros_like(batch)
        for r, (_, _, row, types) in enumerate(chunk):
            batch[r, : len(row)] = torch.tensor(row)
            att[r, : len(row)] = 1
            if types:
                typ[r, : len(row)] = torch.tensor(types)
        kwargs = {"input_ids": batch.to(device), "attention_mask": att.to(device)}
        if any(c[3] for c in chunk):
            kwargs["token_type_ids"] = typ.to(device)
        probs = torch.softmax(model(**kwargs).logits.float(), dim=-1).cpu()
        for r, (t, k, _, _) in enumerate(chunk):
            out[t][k] = probs[r, labels[t]]
        start = end
    return out


def select_important(
    gold_probs: np.ndarray, special: Sequence[int], tokens: Sequence[str], *, rate: float, delta: float
) -> np.ndarray:
    """0/1 per token: gain > delta, not a stopword, top gains up to max(1, int(rate * n))."""
    mask = np.zeros(len(special), dtype=np.float32)
    content = [i for i, s in enumerate(special) if not s]
    gains = np.diff(gold_probs)  # gain of the k-th content token = P_k - P_{k-1}
    cands = [(g, pos) for g, pos in zip(gains, content, strict=True) if g > delta and not is_stopword(tokens[pos])]
    cands.sort(key=lambda x: -x[0])
    for _, pos in cands[: max(1, int(rate * len(content)))]:
        mask[pos] = 1.0
    return mask


def compute_selective_masks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encodings: Sequence[dict[str, list[int]]],
    labels: Sequence[int],
    *,
    rate: float,
    delta: float,
    token_budget: int = 16384,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    gold = prefix_gold_probs(model, tokenizer, encodings, labels, token_budget=token_budget, device=device)
    masks = []
    for enc, g in zip(encodings, gold, strict=True):
        special = tokenizer.get_special_tokens_mask(enc["input_ids"], already_has_special_tokens=True)
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        masks.append(select_important(g, special, tokens, rate=rate, delta=delta))
    return masks


class SelectiveStore:
    """Stored selections, one .npz per (classifier, data, rate, delta, max_length) key.

    Several processes can ask for one key at once (the ranks of ``l3m train --nproc``, workers
    sharing an output directory): ``get_or_compute`` holds a per-key lock, so one computes and
    the others read its file. Writes go to a temporary file unique to the writer, then replace
    the target in one step, so a reader never sees half a file; an unreadable file (a disk full
    before this rule, a copy cut short) is recomputed, not trusted.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(classifier_id: str, data_fingerprint: str, rate: float, delta: float, max_length: int) -> str:
        raw = json.dumps([classifier_id, data_fingerprint, rate, delta, max_length])
        return hashlib.sha256(raw.encode()).hexdigest()[:20]

    def path(self, key: str) -> Path:
        return self.root / f"selective-{key}.npz"

    def get(self, key: str) -> list[np.ndarray] | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            with np.load(p) as z:
                flat, lengths = z["flat"], z["lengths"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("selective store: %s is unreadable (%s); recomputing", p.name, e)
            return None
        if int(lengths.sum()) != len(flat):
            log.warning("selective store: %s is inconsistent; recomputing", p.name)
            return None
        return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []

    def put(self, key: str, masks: list[np.ndarray]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(m) for m in masks], dtype=np.int64)
        flat = np.concatenate(masks) if masks else np.zeros(0, dtype=np.float32)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".selective-{key}.", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, flat=flat, lengths=lengths)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_or_compute(self, key: str, compute: Callable[[], list[np.ndarray]], expected: int) -> list[np.ndarray]:
        """The stored selection of ``key`` if it holds ``expected`` texts, else ``compute()``'s
        (stored); one process computes a key at a time."""
        with exclusive(self.root / f".selective-{key}.lock"):
            found = self.get(key)
            if found is not None and len(found) == expected:
                return found
            masks = compute()
            self.put(key, masks)
            return masks
