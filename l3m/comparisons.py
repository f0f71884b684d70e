"""Paired comparisons of an experiment's runs on the test split: strategy pairs per tuner and
tuner pairs per strategy.

Both kinds compare two sets of runs paired by seed (``l3m.stats``: a paired bootstrap over test
examples and a seed-level t-test); a row says which strategy or which tuner it holds fixed, the
other key is "".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from l3m.data.loading import DataError
from l3m.evaluate import PREDICTIONS_DIR
from l3m.stats import INDICATIVE, MIN_SEEDS, Metric, metric_value, paired_bootstrap, seed_test
from l3m.train import RUN_RECORD, RunRecord

LABELS = {"none": "STL", "random": "RTM", "selective": "Selective", "l3": "L3"}
ORDER = {"none": 0, "random": 1, "selective": 2, "l3": 3}
# The comparisons the users ask about first (does L3 beat RTM, does RTM beat STL); every other
# pair follows, the more elaborate method first.
FIRST_PAIRS = [("l3", "random"), ("random", "none"), ("l3", "none")]
# Tuner pairs: each compact tuner against full first, then the others, the later one as A.
TUNER_ORDER = {"full": 0, "child_f": 1, "child_d": 2, "weight_mask": 3, "lora": 4}
COMPARISON_FIELDS = ["tuner", "pair", "a", "b", "seeds", "metric", "diff", "ci_low", "ci_high", "p_value",
                     "verdict", "note", "seed_ci_low", "seed_ci_high", "seed_p_value", "seed_higher", "seed_verdict",
                     "strategy"]

Predictions = tuple[np.ndarray, np.ndarray, list[str]]


def _label(strategy: str) -> str:
    return LABELS.get(strategy, strategy)


def _pairs(strategies: Iterable[str]) -> list[tuple[str, str]]:
    present = sorted(set(strategies), key=lambda s: (-ORDER.get(s, 9), s))
    pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
    return [p for p in FIRST_PAIRS if p in pairs] + [p for p in pairs if p not in FIRST_PAIRS]


def _tuner_pairs(tuners: Iterable[str]) -> list[tuple[str, str]]:
    """(A, B) with B the earlier tuner: with full present, every other tuner against full comes first."""
    present = sorted(set(tuners), key=lambda t: (TUNER_ORDER.get(t, 9), t))
    return [(a, b) for i, b in enumerate(present) for a in present[i + 1:]]


def load_test_predictions(run_dir: Path, label_names: list[str] | None) -> Predictions | None:
    """Gold and predicted label ids of a run's test split and the label set, or None for a run that
    predates stored predictions.

    ``label_names`` is the domain's label set (id order); without it the probability map of the
    first record gives it (``prediction_records`` writes it in label order).
    """
    path = Path(run_dir) / "model" / PREDICTIONS_DIR / "test.jsonl"
    if not path.exists():
        return None
    gold: list[int] = []
    pred: list[int] = []
    names = label_names
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not JSON ({e.msg})") from None
        names = names or list(rec.get("probabilities") or {})
        for field, out in (("gold", gold), ("label", pred)):
            if rec.get(field) not in names:
                raise DataError(f"{path}:{line_no}: field {field!r} is {rec.get(field)!r}, not one of the "
                                 f"domain's labels {names}")
            out.append(names.index(rec[field]))
    return np.array(gold, dtype=np.int64), np.array(pred, dtype=np.int64), names or []


def _group(run_dirs: Iterable[Path], outer: str, inner: str) -> dict[str, dict[str, dict[int, Path]]]:
    """The finished runs among ``run_dirs`` as {outer value: {inner value: {seed: run dir}}}
    (``outer``/``inner``: "tuner" or "strategy")."""
    runs: dict[str, dict[str, dict[int, Path]]] = {}
    for d in run_dirs:
        if (Path(d) / RUN_RECORD).exists():
            rec = RunRecord.load(Path(d) / RUN_RECORD)
            runs.setdefault(getattr(rec, outer), {}).setdefault(getattr(rec, inner), {})[rec.seed] = Path(d)
    return runs


def _skipped(row: dict[str, Any], seeds: int, reason: str) -> dict[str, Any]:
    return {**row, "seeds": seeds, "diff": None, "ci_low": None, "ci_high": None, "p_value": None,
            "verdict": "skipped", "note": reason, "seed_ci_low": None, "seed_ci_high": None, "seed_p_value": None,
            "seed_higher": None, "seed_verdict": None}


def compare_pair(row: dict[str, Any], names: tuple[str, str], a_runs: dict[int, Path], b_runs: dict[int, Path],
                 metric: Metric, label_names: list[str] | None, n_boot: int,
                 cache: dict[Path, Predictions | None]) -> dict[str, Any]:
    """One comparison row: A's runs against B's ({seed: run dir}), paired on the seeds both have.

    ``row`` holds the keys that say what is compared (tuner, strategy, a, b, metric); ``names``
    are A's and B's names in the pair label and the verdicts. The pair is skipped, with the
    reason, when one of its runs has no stored test predictions (runs older than per-example
    predictions), when they share no seed, or when their test examples differ. ``cache`` keeps
    each run's loaded predictions across pairs.
    """
    row = {**row, "pair": f"{names[0]} vs {names[1]}"}
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        return _skipped(row, 0, "no seed in common")
    dirs = [runs[seed] for runs in (a_runs, b_runs) for seed in seeds]
    for d in dirs:
        if d not in cache:
            cache[d] = load_test_predictions(d, label_names)
    missing = [d.name for d in dirs if cache[d] is None]
    if missing:
        return _skipped(row, len(seeds), f"no test predictions stored in {', '.join(missing)} (runs older than "
                        "per-example predictions)")
    loaded = [x for x in (cache[d] for d in dirs) if x is not None]
    gold = loaded[0][0]
    if any(not np.array_equal(x[0], gold) for x in loaded):
        return _skipped(row, len(seeds), "the runs' test predictions are not over the same examples")
    preds = [x[1] for x in loaded]
    n_labels = len(loaded[0][2])
    c = paired_bootstrap(gold, dict(zip(seeds, preds[:len(seeds)], strict=True)),
                         dict(zip(seeds, preds[len(seeds):], strict=True)), n_labels, metric, names=names,
                         n_boot=n_boot)
    per_seed = [metric_value(gold, p, n_labels, metric) for p in preds]
    st = seed_test(per_seed[:len(seeds)], per_seed[len(seeds):], names=names)
    return {**row, "seeds": c.seeds, "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value,
            "verdict": c.verdict, "note": INDICATIVE if c.seeds < MIN_SEEDS else "", "seed_ci_low": st.ci_low,
            "seed_ci_high": st.ci_high, "seed_p_value": st.p_value, "seed_higher": st.higher,
            "seed_verdict": st.verdict}


def compare_strategies(run_dirs: Iterable[Path], metric: Metric = "macro_f1", label_names: list[str] | None = None,
                       n_boot: int = 10_000) -> list[dict[str, Any]]:
    """Paired bootstrap of every strategy pair per tuner on the test split (``l3m.stats``).

    One row per pair, the more elaborate method as A; diff and CI in points of ``metric``;
    ``strategy`` is "". Skipped pairs: ``compare_pair``.
    """
    cache: dict[Path, Predictions | None] = {}
    return [compare_pair({"tuner": tuner, "strategy": "", "a": a, "b": b, "metric": metric}, (_label(a), _label(b)),
                         by_strategy[a], by_strategy[b], metric, label_names, n_boot, cache)
            for tuner, by_strategy in _group(run_dirs, "tuner", "strategy").items()
            for a, b in _pairs(by_strategy)]


def compare_tuners(run_dirs: Iterable[Path], metric: Metric = "macro_f1", label_names: list[str] | None = None,
                   n_boot: int = 10_000) -> list[dict[str, Any]]:
    """Paired bootstrap of tuner pairs per strategy on the test split, for strategies run with two
    or more tuners.

    Each compact tuner as A against ``full`` as B first (a negative diff is the accuracy the
    compact tuner costs), then the remaining pairs, the later tuner of ``TUNER_ORDER`` as A;
    ``tuner`` is "". Skipped pairs: ``compare_pair``.
    """
    cache: dict[Path, Predictions | None] = {}
    by_strategy = sorted(_group(run_dirs, "strategy", "tuner").items(), key=lambda kv: (ORDER.get(kv[0], 9), kv[0]))
    return [compare_pair({"tuner": "", "strategy": strategy, "a": a, "b": b, "metric": metric}, (a, b),
                         by_tuner[a], by_tuner[b], metric, label_names, n_boot, cache)
            for strategy, by_tuner in by_strategy
            for a, b in _tuner_pairs(by_tuner)]


def compare_all(run_dirs: Iterable[Path], metric: Metric = "macro_f1", label_names: list[str] | None = None,
                n_boot: int = 10_000) -> list[dict[str, Any]]:
    """The strategy comparisons, then the tuner comparisons (the rows of ``comparisons.csv``)."""
    run_dirs = list(run_dirs)
    return (compare_strategies(run_dirs, metric, label_names, n_boot)
            + compare_tuners(run_dirs, metric, label_names, n_boot))


def is_tuner_row(row: dict[str, Any]) -> bool:
    return bool(row.get("strategy"))


INTRO = ("A minus B in points, mean over the seeds both have; 95% paired bootstrap percentile interval over "
         "test examples; p: two-sided paired permutation test (both conditional on the trained seeds). "
         "Across seeds: a paired t-test on the per-seed differences (95% t interval, p, seeds on which A "
         f"is higher): does the difference hold for other seeds. Fewer than {MIN_SEEDS} seeds: indicative only.")


def _table(rows: list[dict[str, Any]], heading: str, intro: str, column: str) -> str:
    """A comparison section: one line per row, ``column`` (tuner or strategy) the one held fixed."""
    lines = [heading, "", intro, "",
             f"| pair | {column} | seeds | mean diff | 95% CI | p | verdict | across seeds: 95% CI | p | A higher | "
             "verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        held = _label(r[column]) if column == "strategy" else r[column]
        if r["diff"] is None:
            lines.append(f"| {r['pair']} | {held} | {r['seeds']} | - | - | - | skipped: {r['note']} "
                         "| - | - | - | - |")
            continue
        verdict = f"{r['verdict']} {r['note']}".strip()
        lines.append(f"| {r['pair']} | {held} | {r['seeds']} | {r['diff']:+.2f} | "
                     f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p_value']:.4f} | {verdict} | "
                     f"{_seed_cells(r)} |")
    return "\n".join(lines) + "\n"


def comparisons_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """The strategy comparisons (``compare_strategies`` rows)."""
    return _table(rows, f"## Pairwise comparisons (test {metric.replace('_', '-')})", INTRO, "tuner")


def tuner_comparisons_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """The tuner comparisons (``compare_tuners`` rows)."""
    intro = ("Per strategy, each compact tuner as A against the full tuner as B (a negative difference is what "
             "the compact tuner costs), then the other tuner pairs. " + INTRO)
    return _table(rows, f"## Tuner comparisons (test {metric.replace('_', '-')})", intro, "strategy")


def _seed_cells(r: dict[str, Any]) -> str:
    """The across-seeds columns of a comparison row ('-' where one seed leaves nothing to test)."""
    seeds = f"{r['seed_higher']}/{r['seeds']}"
    if r["seed_p_value"] is None or np.isnan(r["seed_p_value"]):
        return f"- | - | {seeds} | {r['seed_verdict']}"
    return (f"[{r['seed_ci_low']:+.2f}, {r['seed_ci_high']:+.2f}] | {r['seed_p_value']:.4f} | {seeds} | "
            f"{r['seed_verdict']}")
