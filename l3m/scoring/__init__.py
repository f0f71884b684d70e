"""Vanilla-model token likelihoods (pseudo-log-likelihood scoring) and their store.

Public API (see docs/scoring.md):

* ``score_texts(items, *, model, metric, max_length, mode, stride, dtype, device,
  token_budget, store, progress)`` -> list of float32 arrays, one per item, of length
  ``len(input_ids)``: log p(token | context), natural log, NaN at special tokens.
* ``PLLScorer``: the engine without the store.
* ``ScoreStore(root)``: ``get_many`` / ``put_many`` on append-only Parquet shards.
* ``scorer_key(model, revision, metric, max_length, mode, stride)``.

This package never imports prefect or bentoml.
"""

from l3m.scoring.api import ScoreStats, get_scorer, score_texts
from l3m.scoring.engine import EngineStats, PLLScorer
from l3m.scoring.keys import item_key, scorer_key
from l3m.scoring.plans import METRICS, MODES, EncodedText, Plan, make_plan
from l3m.scoring.store import ScoreStore

__all__ = [
    "METRICS",
    "MODES",
    "EncodedText",
    "EngineStats",
    "PLLScorer",
    "Plan",
    "ScoreStats",
    "ScoreStore",
    "get_scorer",
    "item_key",
    "make_plan",
    "score_texts",
    "scorer_key",
]
