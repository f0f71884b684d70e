"""Prefect flow ``score``: vanilla-model token PLLs of what the runs read, into the score store.

Scope (``plan_items``): the train rows some planned run trains on (all of them unless
``training.train_limit``), the unlabelled corpus when ``training.use_unlabelled``, and dev/test
only with ``scoring.shift_summary``; nothing when no strategy reads vanilla scores. The
summary says which, and why.

Thin on purpose: the splits are cut into shards, one task per shard calls
``l3m.scoring.score_texts`` (which reads the store first, so a scored shard costs a lookup and
no forward pass), and the flow publishes a summary artifact: tokens scored, tokens/s and the
mean token log-likelihood per split (the vanilla model's surprise on the domain).

Default runner: threads in this process (shards share one model; the engine serialises
forwards). ``score_with_dask(address=...)`` returns the same flow on a ``DaskTaskRunner``:
each worker process loads its own model on its own device, so shards spread over GPUs/hosts
that share the store directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import artifact_key, as_config, load_data
from l3m import experiment
from l3m.config import RunConfig
from l3m.data.loading import LoadedDomain
from l3m.inputs import mlm_corpus, mlm_train_items
from l3m.modelcheck import check_run_model
from l3m.scoring import ScoreStats, ScoreStore, score_texts

Item = tuple[str, str | None]

_STORES: dict[str, ScoreStore] = {}


def _store(root: str) -> ScoreStore:
    # One store object per process: its in-memory index is read from disk once, not per shard.
    if root not in _STORES:
        _STORES[root] = ScoreStore(root)
    return _STORES[root]


@task(name="score-shard", cache_policy=NONE, retries=1)
def score_shard(
    split: str, shard: int, items: list[tuple[str, str | None]], settings: dict[str, Any]
) -> dict[str, Any]:
    st = ScoreStats()
    settings = dict(settings)  # a retry gets the same dict: do not consume it
    store = _store(settings.pop("store_dir"))
    score_texts(items, store=store, stats=st, **settings)
    get_run_logger().info(
        "%s shard %d: %d texts, %d from the store, %d scored (%d tokens, %.1f tokens/s)",
        split, shard, st.texts, st.cached, st.scored, st.tokens_scored, st.tokens_per_s,
    )  # fmt: skip
    return {
        "split": split, "texts": st.texts, "cached": st.cached, "scored": st.scored,
        "tokens_scored": st.tokens_scored, "seconds": st.seconds, "sum_logp": st.sum_logp,
        "n_logp": st.n_logp, "scorer_key": st.scorer_key, "path": st.path, "path_reason": st.path_reason,
    }  # fmt: skip


def plan_items(cfg: RunConfig, loaded: LoadedDomain) -> tuple[dict[str, list[Item]], list[str]]:
    """What the run needs scored, per split, and one line per split saying why (or why not)."""
    out: dict[str, list[Item]] = {}
    why: list[str] = []
    n_train = loaded.dataset["train"].num_rows
    if experiment.needs_scores(cfg):
        rows = experiment.needed_train_rows(cfg, n_train)
        items = mlm_train_items(cfg, loaded)  # what the MLM side reads (domain.mlm_text)
        out["train"] = [items[i] for i in rows]
        limit = cfg.training.train_limit
        why.append(f"train: {len(rows)} of {n_train} rows"
                   + (f" (the rows training.train_limit={limit} selects for seeds {cfg.training.seeds})"
                      if len(rows) < n_train else ""))
        if cfg.training.use_unlabelled and loaded.unlabelled:
            out["unlabelled"] = [(t, None) for t in mlm_corpus(cfg, loaded.unlabelled)]
            why.append(f"unlabelled: {len(loaded.unlabelled)} texts (training.use_unlabelled)")
    else:
        why.append("train: not scored (no strategy in this config reads vanilla scores)")
    if cfg.scoring.shift_summary:
        for split in ("dev", "test"):
            out[split] = _split_items(loaded, split)
        why.append("dev/test: scored for the domain-shift summary (scoring.shift_summary)")
    else:
        why.append("dev/test: not scored (set scoring.shift_summary: true for their mean log-likelihood)")
    if cfg.scoring.limit:
        out = {k: v[: cfg.scoring.limit] for k, v in out.items()}
        why.append(f"scoring.limit: at most {cfg.scoring.limit} texts per split")
    return out, why


def _split_items(loaded: LoadedDomain, split: str) -> list[Item]:
    ds = loaded.dataset[split]
    texts = list(ds["text"])
    pairs = list(ds["text_pair"]) if "text_pair" in ds.column_names else [None] * len(texts)
    return list(zip(texts, pairs, strict=True))


def summarise(cfg: RunConfig, results: list[dict[str, Any]], wall_seconds: float,
              why: list[str] | None = None) -> dict[str, Any]:
    """Per-split and total counts; mean PLL = mean log p over scorable tokens (nats/token).

    ``seconds`` is model time (shards wait for each other's forward, uncounted); ``wall_seconds``
    the flow's scoring phase end to end (store reads and writes included)."""
    splits: dict[str, dict[str, Any]] = {}
    for r in results:
        s = splits.setdefault(r["split"], {"texts": 0, "cached": 0, "scored": 0, "tokens_scored": 0,
                                           "seconds": 0.0, "sum_logp": 0.0, "n_logp": 0})  # fmt: skip
        for k in s:
            s[k] += r[k]
    for s in splits.values():
        s["mean_logp"] = s["sum_logp"] / s["n_logp"] if s["n_logp"] else float("nan")
        s["tokens_per_s"] = s["tokens_scored"] / s["seconds"] if s["seconds"] else 0.0
    tokens = sum(s["tokens_scored"] for s in splits.values())
    seconds = sum(s["seconds"] for s in splits.values())
    keys = {r["scorer_key"] for r in results if r["scorer_key"]}
    paths = {(r.get("path"), r.get("path_reason")) for r in results if r.get("path")}
    none = "nothing scored: every text came from the store" if results else "nothing to score: no strategy reads them"
    path, reason = next(iter(paths), (None, none))
    return {
        "domain": cfg.domain.name, "scorer_key": next(iter(keys), None), "store": str(cfg.score_store_dir()),
        "splits": splits, "tokens_scored": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0, "wall_seconds": wall_seconds,
        "scope": why or [], "path": path, "path_reason": reason,
    }  # fmt: skip


def to_markdown(summary: dict[str, Any], cfg: RunConfig) -> str:
    sc = cfg.scoring
    lines = [
        f"# Vanilla-model token scores: {summary['domain']}",
        "",
        f"Model `{cfg.model.name_or_path}`, metric `{sc.metric}`, mode `{sc.mode}`"
        + (f" (k={sc.stride})" if sc.mode == "strided" else "")
        + f", max_length {cfg.model.max_length}. Store key `{summary['scorer_key']}` in `{summary['store']}`.",
        "",
        *(f"- {line}" for line in summary["scope"]),
        f"- scoring path: {summary['path'] or 'none'} ({summary['path_reason']})",
        "",
        "| split | texts | from store | newly scored | tokens scored | tokens/s | mean log p (nats/token) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summary["splits"].items():
        lines.append(
            f"| {name} | {s['texts']} | {s['cached']} | {s['scored']} | {s['tokens_scored']} "
            f"| {s['tokens_per_s']:.1f} | {s['mean_logp']:.3f} |"
        )
    lines += [
        "",
        f"Total: {summary['tokens_scored']} tokens scored in {summary['seconds']:.1f} s of model time "
        f"({summary['tokens_per_s']:.1f} tokens/s), {summary['wall_seconds']:.1f} s end to end. "
        "A lower mean log p means the vanilla model is "
        "more surprised by the domain (more for L3Masking to teach).",
    ]
    return "\n".join(lines)


# The arg-type ignore below: Prefect's runner generics are invariant in the future type, so its
# own runners do not type-check against TaskRunner[PrefectFuture[Any]] (prefect 3.8 stubs).
@flow(name="score", task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def score(config: str | Path | RunConfig | dict, overrides: list[str] | None = None,
          snapshot: str | None = None) -> dict[str, Any]:
    """Score what the config's runs need (see ``plan_items``) into the store; returns the summary.

    ``snapshot``: the validated data snapshot (the pipeline passes its validate step's); without
    it the domain's data is validated into one first.
    """
    cfg = as_config(config, overrides)
    check_run_model(cfg, training=False)  # a bad model, or one that cannot score, fails here
    if snapshot is None:
        from flows.train import ensure_snapshot

        snapshot = ensure_snapshot(cfg)
    planned, why = plan_items(cfg, load_data(cfg, snapshot))
    for line in why:
        get_run_logger().info("scoring scope: %s", line)
    sc, model = cfg.scoring, cfg.model
    settings = {
        "model": model.resolved(), "revision": model.revision, "metric": sc.metric,
        "max_length": model.max_length, "mode": sc.mode, "stride": sc.stride, "dtype": sc.dtype,
        "device": sc.device, "token_budget": sc.token_budget, "store_dir": str(cfg.score_store_dir()),
    }  # fmt: skip
    t0 = time.perf_counter()
    futures = []
    for split, items in planned.items():
        for i, a in enumerate(range(0, len(items), sc.shard_size)):
            shard_items = items[a : a + sc.shard_size]
            futures.append(score_shard.submit(split, i, shard_items, dict(settings)))
    # sync_compatible: in a sync flow the call returns the UUID itself, not a coroutine.
    progress = cast(UUID, create_progress_artifact(0.0, description=f"scoring {cfg.domain.name}: shards done (%)"))
    results = []
    for fut in as_completed(futures):
        results.append(fut.result())
        update_progress_artifact(progress, 100.0 * len(results) / len(futures))
    summary = summarise(cfg, results, wall_seconds=time.perf_counter() - t0, why=why)
    create_markdown_artifact(
        markdown=to_markdown(summary, cfg),
        key=artifact_key("scores", cfg.domain.name),
        description=f"Vanilla-model PLL scores of {cfg.domain.name}",
    )
    get_run_logger().info(
        "scored %d tokens (%.1f tokens/s of model time; %.1f s end to end); path %s: %s",
        summary["tokens_scored"], summary["tokens_per_s"], summary["wall_seconds"],
        summary["path"] or "none", summary["path_reason"],
    )  # fmt: skip
    return summary


def score_with_dask(address: str | None = None, n_workers: int | None = None) -> Flow:
    """The ``score`` flow on a Dask cluster (an existing scheduler ``address``, or a local one)."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": n_workers or 1, "threads_per_worker": 1})
    return score.with_options(task_runner=runner)  # type: ignore[arg-type]  # see @flow above
