"""What a run needs besides its config: the data, the vanilla scores of the rows it trains on,
the unlabelled corpus; and the token view of those scores.

Scoring here covers exactly the train rows some planned run trains on (``train_limit``
subsamples per seed, see ``l3m.train.train_rows``) and the corpus when runs use it: a store read
for texts already scored, a forward pass for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from l3m.config import RunConfig
from l3m.data.loading import LoadedDomain, encode_kwargs, load_domain, load_unlabelled
from l3m.data.transforms import transform_items
from l3m.encoding import TrainInputs, train_rows
from l3m.identity import digest

Log = Callable[[str], None]
MLM_SCORED = ("l3",)  # strategies that read the vanilla scores


def needs_scores(cfg: RunConfig) -> bool:
    return any(s.kind in MLM_SCORED for s in cfg.strategies)


def current_score_key(cfg: RunConfig) -> str | None:
    """The key of the scores L3 runs would read (no scoring: a hash of model files and settings)."""
    if not needs_scores(cfg):
        return None
    from l3m.scoring import scorer_key

    sc, m = cfg.scoring, cfg.model
    return score_set_key(cfg, scorer_key(m.resolved(), m.revision, sc.metric, m.max_length, sc.mode, sc.stride))


def score_set_key(cfg: RunConfig, scorer: str) -> str:
    """The scorer's key, plus the domain's MLM text transform when it has one: the same scorer
    over transformed texts is another score set (the store itself is keyed by text content)."""
    return scorer if cfg.domain.mlm_text == "raw" else f"{scorer}+text-{cfg.domain.mlm_text}"


def data_identity(loaded: LoadedDomain, unlabelled: list[str] | None) -> str:
    """The labelled snapshot's fingerprint, plus the unlabelled corpus when runs use it."""
    return loaded.fingerprint if unlabelled is None else digest([loaded.fingerprint, unlabelled])[:16]


def needed_train_rows(cfg: RunConfig, n_rows: int) -> list[int]:
    """Train rows any planned seed trains on (all of them unless ``training.train_limit``)."""
    rows: set[int] = set()
    for seed in cfg.training.seeds:
        rows.update(train_rows(n_rows, cfg.training.train_limit, seed))
    return sorted(rows)


def train_items(loaded: LoadedDomain) -> list[tuple[str, str | None]]:
    train = loaded.dataset["train"]
    pairs = list(train["text_pair"]) if loaded.has_pair else [None] * train.num_rows
    return list(zip(list(train["text"]), pairs, strict=True))


def mlm_train_items(cfg: RunConfig, loaded: LoadedDomain) -> list[tuple[str, str | None]]:
    """The train rows as the MLM side reads them: through the domain's ``mlm_text`` transform."""
    return transform_items(cfg.domain.mlm_text, train_items(loaded))


def mlm_corpus(cfg: RunConfig, texts: list[str]) -> list[str]:
    """The unlabelled corpus as the MLM side reads it (it only ever feeds the MLM side)."""
    return [t for t, _ in transform_items(cfg.domain.mlm_text, [(t, None) for t in texts])]


def score_train(cfg: RunConfig, loaded: LoadedDomain) -> tuple[list[np.ndarray | None], str]:
    """Vanilla token log-likelihoods of the train rows runs train on (None elsewhere), of their
    MLM-side text (``mlm_train_items``)."""
    items = mlm_train_items(cfg, loaded)
    rows = needed_train_rows(cfg, len(items))
    arrays, key = score_items(cfg, [items[i] for i in rows])
    out: list[np.ndarray | None] = [None] * len(items)
    for i, a in zip(rows, arrays, strict=True):
        out[i] = a
    return out, key


def score_items(cfg: RunConfig, items: list[tuple[str, str | None]]) -> tuple[list[np.ndarray], str]:
    from l3m.scoring import ScoreStore, score_texts, scorer_key

    sc, model = cfg.scoring, cfg.model
    store = ScoreStore(cfg.score_store_dir())
    arrays = score_texts(items, model=model.resolved(), metric=sc.metric, max_length=model.max_length,
                         mode=sc.mode, stride=sc.stride, dtype=sc.dtype, device=sc.device,
                         token_budget=sc.token_budget, store=store, revision=model.revision)
    key = scorer_key(model.resolved(), model.revision, sc.metric, model.max_length, sc.mode, sc.stride)
    return list(arrays), score_set_key(cfg, key)


def prepare_inputs(cfg: RunConfig, loaded: LoadedDomain | None = None, log: Log = print) -> TrainInputs:
    loaded = loaded or load_domain(cfg.domain)
    inputs = TrainInputs(loaded)
    if cfg.domain.mlm_text != "raw":
        inputs.mlm_items = mlm_train_items(cfg, loaded)
    if needs_scores(cfg):
        n = len(needed_train_rows(cfg, loaded.dataset["train"].num_rows))
        log(f"scores: {n} of {loaded.dataset['train'].num_rows} train texts ({cfg.scoring.metric}, {cfg.scoring.mode})")
        inputs.token_logp, inputs.score_key = score_train(cfg, loaded)
    if cfg.training.use_unlabelled:
        corpus = loaded.unlabelled if loaded.unlabelled is not None else load_unlabelled(cfg.domain)
        inputs.unlabelled = mlm_corpus(cfg, corpus)
        if not inputs.unlabelled:
            raise ValueError(f"{cfg.domain.name}: training.use_unlabelled is set but the domain has no unlabelled corpus")
        if inputs.token_logp is not None:
            log(f"scores: {len(inputs.unlabelled)} unlabelled texts")
            inputs.unlabelled_logp, _ = score_items(cfg, [(t, None) for t in inputs.unlabelled])
    # The corpus as shipped: the mlm_text transform is recorded on its own (MLM runs' identity), so
    # switching it does not move STL runs.
    inputs.data_fingerprint = data_identity(loaded, corpus if cfg.training.use_unlabelled else None)
    return inputs


def l3_rates(token_logp: list[np.ndarray], rate: float) -> dict[str, float]:
    """Expected masking rate of the paper and calibrated mappings over the scored texts."""
    import torch

    from l3m.masking.l3 import calibrated_probs, paper_probs, surprisal

    totals = {"paper": 0.0, "calibrated": 0.0, "tokens": 0.0, "texts_below_r": 0}
    for a in token_logp:
        lp = torch.from_numpy(np.array(a, dtype=np.float32))[None, :]
        content = torch.isfinite(lp)
        s = surprisal(lp, content)
        pap = float(paper_probs(s, content, rate).sum())
        totals["paper"] += pap
        totals["calibrated"] += float(calibrated_probs(s, content, rate).sum())
        totals["tokens"] += float(content.sum())
        totals["texts_below_r"] += int(pap < rate * float(content.sum()) - 1e-3)
    n = max(totals["tokens"], 1.0)
    return {"target": rate, "paper_expected_rate": totals["paper"] / n,
            "calibrated_expected_rate": totals["calibrated"] / n,
            "texts": len(token_logp), "texts_where_paper_falls_short": totals["texts_below_r"]}


def write_token_view(cfg: RunConfig, inputs: TrainInputs, exp_dir: Path, n: int = 8) -> Path | None:
    if inputs.token_logp is None:
        return None
    from transformers import AutoTokenizer

    from l3m.tokenview import write_token_view as write

    tok = AutoTokenizer.from_pretrained(cfg.model.resolved())
    rows = [i for i, a in enumerate(inputs.token_logp) if a is not None][:n]
    items = mlm_train_items(cfg, inputs.loaded)  # the texts the scores belong to
    toks = [tok.convert_ids_to_tokens(tok(*items[i], **encode_kwargs(cfg.model.max_length))["input_ids"]) for i in rows]
    names = list(inputs.loaded.dataset["train"]["label_name"])
    rate = next((s.rate for s in cfg.strategies if s.kind == "l3"), 0.15)
    exp_dir.mkdir(parents=True, exist_ok=True)
    scores = [a for a in (inputs.token_logp[i] for i in rows) if a is not None]
    return write(exp_dir / "tokenview.html", toks, scores, rate=rate,
                 titles=[f"train[{i}] label={names[i]}" for i in rows],
                 heading=f"{cfg.domain.name}: vanilla surprisal and L3 masking probability ({cfg.model.name_or_path})")
