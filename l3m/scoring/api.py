"""``score_texts``: the store-aware entry point every consumer uses.

It looks every item up in the store first and loads the model only when something is missing,
so a rerun over scored texts never builds a model nor runs a forward pass. Missing texts are
scored in length order and written in chunks (one shard per chunk), so an interrupted run keeps
what it finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l3m.scoring.engine import PLLScorer
from l3m.scoring.keys import scorer_key
from l3m.scoring.plans import Item, Metric, Mode, normalise_items
from l3m.scoring.store import ScoreStore

# Texts per store shard while scoring: small enough that a crash loses little, large enough
# that shards stay few (compact() merges them anyway).
FLUSH_TEXTS = 512

_SCORERS: dict[tuple[str, str | None, str, str], PLLScorer] = {}
_SCORERS_LOCK = threading.Lock()


def get_scorer(
    model: str, revision: str | None = None, dtype: str = "auto", device: str = "auto"
) -> PLLScorer:
    """A process-wide scorer per (model, revision, dtype, device): flows call this per shard."""
    key = (str(model), revision, dtype, device)
    with _SCORERS_LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = PLLScorer(str(model), revision=revision, dtype=dtype, device=device)
        return _SCORERS[key]


@dataclass
class ScoreStats:
    """What one ``score_texts`` call did (filled in when passed as ``stats=``)."""

    texts: int = 0
    cached: int = 0  # served from the store
    scored: int = 0  # newly scored (distinct texts)
    tokens_scored: int = 0  # scorable tokens of the newly scored texts
    seconds: float = 0.0  # model time of the newly scored texts (waits for a shared model excluded)
    scorer_key: str | None = None
    path: str | None = None  # the scorer's path (packed | generic | generic-full-logits); None: all from the store
    path_reason: str | None = None
    sum_logp: float = 0.0  # over the scorable tokens of all texts (for mean PLL)
    n_logp: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else 0.0


def score_texts(
    items: Sequence[Item | str],
    *,
    model: str | Path | PLLScorer,
    metric: Metric = "within_word_l2r",
    max_length: int = 128,
    mode: Mode = "exact",
    stride: int = 4,
    dtype: str = "auto",
    device: str = "auto",
    token_budget: int = 8192,
    store: ScoreStore | None = None,
    progress: Callable[[int, int], None] | None = None,
    revision: str | None = None,
    stats: ScoreStats | None = None,
) -> list[np.ndarray]:
    """Per-token log p(token | context) for each (text, text_pair): float32 [len(input_ids)],
    NaN at special tokens. Scores only the items missing from ``store`` and writes them there.

    ``model`` is a path / hub id, or a ``PLLScorer`` (its own dtype/device then apply).
    ``progress(done, total)`` counts texts, the cached ones included.
    """
    pairs = normalise_items(items)
    st = stats if stats is not None else ScoreStats()
    st.texts += len(pairs)
    scorer_obj = model if isinstance(model, PLLScorer) else None
    model_name = scorer_obj.name if scorer_obj is not None else str(model)
    if scorer_obj is not None and revision is None:
        revision = scorer_obj.revision
    key = None
    if store is not None:
        key = scorer_key(model_name, revision, metric, max_length, mode, stride)
        st.scorer_key = key
        found = store.get_many(key, pairs)
    else:
        found = [None] * len(pairs)
    # Distinct missing items (a duplicate text is scored once).
    missing: dict[Item, list[int]] = {}
    for i, (it, f) in enumerate(zip(pairs, found, strict=True)):
        if f is None:
            missing.setdefault(it, []).append(i)
    st.cached += len(pairs) - sum(len(v) for v in missing.values())
    done = len(pairs) - sum(len(v) for v in missing.values())
    if progress is not None:
        progress(done, len(pairs))
    out: list[np.ndarray | None] = list(found)
    if missing:
        scorer = scorer_obj or get_scorer(model_name, revision, dtype, device)
        st.path, st.path_reason = scorer.path, scorer.path_reason
        todo = list(missing)
        encs = scorer.encode(todo, max_length)
        order = sorted(range(len(todo)), key=lambda i: -encs[i].length)
        meta = {
            "model": model_name, "revision": revision, "metric": metric, "max_length": max_length,
            "mode": mode, "stride": stride, "dtype": str(scorer.compute_dtype), "device": str(scorer.device),
        }  # fmt: skip
        for a in range(0, len(order), FLUSH_TEXTS):
            chunk = order[a : a + FLUSH_TEXTS]
            # Per-batch progress inside the chunk (distinct texts; exact counts after the chunk).
            inner = None if progress is None else (lambda d, _n, base=done: progress(base + d, len(pairs)))
            res = scorer.score_encoded(
                [encs[i] for i in chunk],
                metric=metric,
                mode=mode,
                stride=stride,
                token_budget=token_budget,
                progress=inner,
            )
            st.seconds += scorer.last_seconds
            for i, r in zip(chunk, res, strict=True):
                for j in missing[todo[i]]:
                    out[j] = r
                st.tokens_scored += int(np.isfinite(r).sum())
                done += len(missing[todo[i]])
            st.scored += len(chunk)
            if store is not None and key is not None:
                store.put_many(key, [todo[i] for i in chunk], res, meta=meta)
            if progress is not None:
                progress(done, len(pairs))
    final = [o for o in out if o is not None]
    for r in final:
        fin = r[np.isfinite(r)]
        st.sum_logp += float(fin.sum(dtype=np.float64))
        st.n_logp += int(fin.shape[0])
    return final
