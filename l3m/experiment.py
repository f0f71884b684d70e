"""Strategies x tuners x seeds on one domain, and the paper-style results table.

Layout under the experiment directory (``cfg.resolved_output_dir()``):
    <strategy>/<tuner>/seed<k>/{run.json, report.md, model/}   one run each (train.py)
    results.md  results.csv  results.png                        the table (mean +- std)
    tokenview.html                                              what L3 masks, a few texts
    selective/                                                  stored Selective Masking picks

Every run writes its own ``run.json``, so runs can be spread over processes or Prefect tasks
and the table rebuilt from whatever has finished (``summarize``). Vanilla scores are read
from (or written once to) the score store before any training; training never scores.

CLI (also what the Prefect flow ``train`` calls piecewise):
    python -m l3m.experiment domains/citation_intent.yaml strategies='[{kind: none}, {kind: l3}]'
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from l3m.config import MaskingSpec, RunConfig, TunerSpec, load_config
from l3m.data.loading import LoadedDomain, encode_kwargs, load_domain, load_unlabelled
from l3m.train import RUN_RECORD, RunRecord, TrainInputs, train_one

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunKey:
    strategy: str
    tuner: str
    seed: int

    def path(self, exp_dir: Path) -> Path:
        return exp_dir / self.strategy / self.tuner / f"seed{self.seed}"


def plan(cfg: RunConfig) -> list[RunKey]:
    return [RunKey(s.kind, t.kind, seed) for s in cfg.strategies for t in cfg.tuners for seed in cfg.training.seeds]


def _spec(cfg: RunConfig, kind: str) -> MaskingSpec:
    return next(s for s in cfg.strategies if s.kind == kind)


def _tuner(cfg: RunConfig, kind: str) -> TunerSpec:
    return next(t for t in cfg.tuners if t.kind == kind)


def train_items(loaded: LoadedDomain) -> list[tuple[str, str | None]]:
    train = loaded.dataset["train"]
    pairs = list(train["text_pair"]) if loaded.has_pair else [None] * train.num_rows
    return list(zip(list(train["text"]), pairs, strict=True))


def score_train(cfg: RunConfig, loaded: LoadedDomain) -> tuple[list[np.ndarray], str]:
    """Vanilla token log-likelihoods of the train texts: a store read when already scored."""
    return score_items(cfg, train_items(loaded))


def score_items(cfg: RunConfig, items: list[tuple[str, str | None]]) -> tuple[list[np.ndarray], str]:
    from l3m.scoring import ScoreStore, score_texts, scorer_key

    sc, model = cfg.scoring, cfg.model
    store = ScoreStore(cfg.score_store_dir())
    arrays = score_texts(items, model=model.resolved(), metric=sc.metric, max_length=model.max_length,
                         mode=sc.mode, stride=sc.stride, dtype=sc.dtype, device=sc.device,
                         token_budget=sc.token_budget, store=store, revision=model.revision)
    key = scorer_key(model.resolved(), model.revision, sc.metric, model.max_length, sc.mode, sc.stride)
    return list(arrays), key


def prepare_inputs(cfg: RunConfig, loaded: LoadedDomain | None = None, log: Log = print) -> TrainInputs:
    loaded = loaded or load_domain(cfg.domain)
    inputs = TrainInputs(loaded)
    if any(s.kind == "l3" for s in cfg.strategies):
        log(f"scores: {loaded.dataset['train'].num_rows} train texts ({cfg.scoring.metric}, {cfg.scoring.mode})")
        inputs.token_logp, inputs.score_key = score_train(cfg, loaded)
    if cfg.training.use_unlabelled:
        inputs.unlabelled = load_unlabelled(cfg.domain)
        if not inputs.unlabelled:
            raise ValueError(f"{cfg.domain.name}: training.use_unlabelled is set but the domain has no unlabelled corpus")
        if inputs.token_logp is not None:
            log(f"scores: {len(inputs.unlabelled)} unlabelled texts")
            inputs.unlabelled_logp, _ = score_items(cfg, [(t, None) for t in inputs.unlabelled])
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


def selective_masks(cfg: RunConfig, inputs: TrainInputs, exp_dir: Path, log: Log = print) -> list[np.ndarray]:
    """Gu et al.'s selection, from an STL classifier of this experiment (trained if needed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from l3m.masking.selective import SelectiveStore, compute_selective_masks

    spec = _spec(cfg, "selective")
    seed = cfg.training.seeds[0]
    # Reuse this experiment's STL run when there is one; otherwise train the rater outside the
    # table's layout (selective/classifier is not a <strategy>/<tuner>/seed<k> directory).
    clf_run = RunKey("none", cfg.tuners[0].kind, seed).path(exp_dir)
    if not (clf_run / RUN_RECORD).exists():
        clf_run = exp_dir / "selective" / "classifier"
    if not (clf_run / RUN_RECORD).exists():
        log("selective: training the STL classifier that rates token importance")
        train_one(cfg, MaskingSpec(kind="none"), cfg.tuners[0], seed, TrainInputs(inputs.loaded), clf_run)
    rec = RunRecord.load(clf_run / RUN_RECORD)
    store = SelectiveStore(exp_dir / "selective")
    key = store.key(f"{clf_run}:{rec.metrics['dev']}", inputs.loaded.fingerprint, spec.rate, spec.delta,
                    cfg.model.max_length)
    cached = store.get(key)
    if cached is not None:
        return cached
    tok = AutoTokenizer.from_pretrained(rec.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rec.model_dir)
    items = train_items(inputs.loaded)
    encs = [dict(tok(t, p, **encode_kwargs(cfg.model.max_length))) for t, p in items]
    labels = list(inputs.loaded.dataset["train"]["label"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"selective: {len(encs)} texts, prefix evaluations batched on {device}")
    masks = compute_selective_masks(model, tok, encs, labels, rate=spec.rate, delta=spec.delta, device=device)
    store.put(key, masks)
    return masks


def write_token_view(cfg: RunConfig, inputs: TrainInputs, exp_dir: Path, n: int = 8) -> Path | None:
    if inputs.token_logp is None:
        return None
    from transformers import AutoTokenizer

    from l3m.tokenview import write_token_view as write

    tok = AutoTokenizer.from_pretrained(cfg.model.resolved())
    items = train_items(inputs.loaded)[:n]
    toks = [tok.convert_ids_to_tokens(tok(t, p, **encode_kwargs(cfg.model.max_length))["input_ids"]) for t, p in items]
    names = list(inputs.loaded.dataset["train"]["label_name"])[:n]
    rate = next((s.rate for s in cfg.strategies if s.kind == "l3"), 0.15)
    return write(exp_dir / "tokenview.html", toks, inputs.token_logp[:n], rate=rate,
                 titles=[f"train[{i}] label={lab}" for i, lab in enumerate(names)],
                 heading=f"{cfg.domain.name}: vanilla surprisal and L3 masking probability ({cfg.model.name_or_path})")


def run_one(cfg: RunConfig, key: RunKey, inputs: TrainInputs, exp_dir: Path, log: Log = print) -> RunRecord:
    if key.strategy == "selective" and inputs.selective_mask is None:
        inputs.selective_mask = selective_masks(cfg, inputs, exp_dir, log)
    log(f"run {key.strategy}/{key.tuner}/seed{key.seed}")
    return train_one(cfg, _spec(cfg, key.strategy), _tuner(cfg, key.tuner), key.seed, inputs, key.path(exp_dir))


def summarize(exp_dir: Path) -> list[dict[str, Any]]:
    """One row per (strategy, tuner): mean and sample std over seeds, in points (x100)."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for path in sorted(Path(exp_dir).glob(f"*/*/seed*/{RUN_RECORD}")):
        rec = RunRecord.load(path)
        groups.setdefault((rec.strategy, rec.tuner), []).append(rec)
    order = {"none": 0, "random": 1, "selective": 2, "l3": 3}
    rows = []
    for (strategy, tuner), recs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0])):
        row: dict[str, Any] = {"strategy": strategy, "tuner": tuner, "seeds": len(recs)}
        for split in ("dev", "test"):
            for m in ("accuracy", "macro_f1"):
                vals = [100 * r.metrics[split][m] for r in recs]
                row[f"{split}_{m}_mean"] = statistics.fmean(vals)
                row[f"{split}_{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["realised_rate"] = statistics.fmean(r.masking.get("realised_rate", 0.0) for r in recs)
        row["median_step_ms"] = 1000 * statistics.fmean(r.median_step_seconds for r in recs)
        row["train_seconds"] = statistics.fmean(r.train_seconds for r in recs)
        rows.append(row)
    return rows


LABELS = {"none": "STL", "random": "RTM", "selective": "Selective", "l3": "L3"}


def table_markdown(rows: Iterable[dict[str, Any]]) -> str:
    lines = ["| strategy | tuner | seeds | test acc | test macro-F1 | dev acc | dev macro-F1 | realised mask rate | step ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    def cell(r: dict[str, Any], s: str, m: str) -> str:
        return f"{r[f'{s}_{m}_mean']:.2f} ± {r[f'{s}_{m}_std']:.2f}"

    for r in rows:
        rate = f"{r['realised_rate']:.3f}" if r["strategy"] != "none" else "-"
        lines.append(f"| {LABELS.get(r['strategy'], r['strategy'])} | {r['tuner']} | {r['seeds']} | "
                     f"{cell(r, 'test', 'accuracy')} | {cell(r, 'test', 'macro_f1')} | {cell(r, 'dev', 'accuracy')} | "
                     f"{cell(r, 'dev', 'macro_f1')} | {rate} | {r['median_step_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(exp_dir: Path, title: str = "") -> dict[str, Path]:
    """results.md / results.csv / results.png from the finished runs under ``exp_dir``."""
    import pandas as pd

    rows = summarize(exp_dir)
    exp_dir = Path(exp_dir)
    out = {"md": exp_dir / "results.md", "csv": exp_dir / "results.csv", "png": exp_dir / "results.png"}
    out["md"].write_text((f"# {title}\n\n" if title else "") + "Test/dev scores in points, mean ± sample std over seeds.\n\n"
                         + table_markdown(rows))
    pd.DataFrame(rows).to_csv(out["csv"], index=False)
    _plot(rows, out["png"], title)
    return out


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{LABELS.get(r['strategy'], r['strategy'])}" + (f"\n{r['tuner']}" if r["tuner"] != "full" else "") for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(rows) + 2), 3.6))
    for off, m, color in ((-0.18, "accuracy", "#4c72b0"), (0.18, "macro_f1", "#dd8452")):
        ax.bar(x + off, [r[f"test_{m}_mean"] for r in rows], 0.36, yerr=[r[f"test_{m}_std"] for r in rows],
               capsize=3, label=f"test {m.replace('_', '-')}", color=color)
    ax.set_xticks(x, names)
    ax.set_ylabel("points")
    lo = min([r["test_macro_f1_mean"] - r["test_macro_f1_std"] for r in rows] + [100])
    ax.set_ylim(max(0, lo - 10), 100)
    ax.legend(loc="upper right")  # bars start at 0 and rarely reach the top
    ax.set_title(title or "strategies (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_experiment(cfg: RunConfig, log: Log = print) -> dict[str, Path]:
    """Everything in one process: score once, train every planned run, write the table."""
    exp_dir = cfg.resolved_output_dir()
    exp_dir.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(cfg, log=log)
    outputs = {}
    if (view := write_token_view(cfg, inputs, exp_dir)) is not None:
        outputs["tokenview"] = view
    for key in plan(cfg):
        rec = run_one(cfg, key, inputs, exp_dir, log)
        log(f"  test acc {100 * rec.metrics['test']['accuracy']:.2f} macro-F1 {100 * rec.metrics['test']['macro_f1']:.2f}")
    outputs.update(write_results(exp_dir, title=f"{cfg.domain.name} ({cfg.model.name_or_path})"))
    return outputs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m l3m.experiment", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value (YAML values)")
    ap.add_argument("--summarize-only", action="store_true", help="rebuild the table from finished runs")
    ap.add_argument("--prepare-only", action="store_true",
                    help="score the train texts into the store and write the token view, train nothing")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    if a.prepare_only:
        exp_dir = cfg.resolved_output_dir()
        exp_dir.mkdir(parents=True, exist_ok=True)
        inputs = prepare_inputs(cfg)
        print(f"tokenview: {write_token_view(cfg, inputs, exp_dir)}")
        if inputs.token_logp is not None:
            rates = l3_rates(inputs.token_logp, _spec(cfg, "l3").rate)
            (exp_dir / "l3_rates.json").write_text(json.dumps(rates, indent=2))
            print(f"l3 rates: {rates}")
        return
    if a.summarize_only:
        paths = write_results(cfg.resolved_output_dir(), title=f"{cfg.domain.name} ({cfg.model.name_or_path})")
    else:
        paths = run_experiment(cfg)
    print(Path(paths["md"]).read_text())
    for k, p in paths.items():
        print(f"{k}: {p}")


if __name__ == "__main__":
    main()
