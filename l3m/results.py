"""The results table of one experiment: mean ± std over seeds per (strategy, tuner).

It aggregates exactly the runs it is given (the experiment's planned runs, by identity), never
whatever happens to lie in a directory, and it states the settings, split sizes and the
majority-class baseline the numbers belong to.
"""

from __future__ import annotations

import json
import statistics
import textwrap
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
COMPARISON_FIELDS = ["tuner", "pair", "a", "b", "seeds", "metric", "diff", "ci_low", "ci_high", "p_value",
                     "verdict", "note", "seed_ci_low", "seed_ci_high", "seed_p_value", "seed_higher", "seed_verdict"]


def summarize(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """One row per (strategy, tuner) over the finished runs among ``run_dirs``, in points (x100)."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for d in run_dirs:
        if (Path(d) / RUN_RECORD).exists():
            rec = RunRecord.load(Path(d) / RUN_RECORD)
            groups.setdefault((rec.strategy, rec.tuner), []).append(rec)
    rows = []
    for (strategy, tuner), recs in sorted(groups.items(), key=lambda kv: (ORDER.get(kv[0][0], 9), kv[0])):
        row: dict[str, Any] = {"strategy": strategy, "tuner": tuner, "seeds": len(recs)}
        for split in ("dev", "test"):
            for m in ("accuracy", "macro_f1"):
                vals = [100 * r.metrics[split][m] for r in recs]
                row[f"{split}_{m}_mean"] = statistics.fmean(vals)
                row[f"{split}_{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["realised_rate"] = statistics.fmean(r.masking.get("realised_rate", 0.0) for r in recs)
        row["median_step_ms"] = 1000 * statistics.fmean(r.median_step_seconds for r in recs)
        row["train_seconds"] = statistics.fmean(r.train_seconds for r in recs)
        row["train_rows"] = max(r.train_rows for r in recs)
        staged = [r.stages for r in recs if "stage2" in r.stages]
        if staged:  # stage 2 ran: what stage 1 alone gave (the run without stage 2: identical stage 1)
            for split in ("dev", "test"):
                vals = [100 * st["stage1"]["metrics"][split]["macro_f1"] for st in staged]
                row[f"stage1_{split}_macro_f1_mean"] = statistics.fmean(vals)
                row[f"stage1_{split}_macro_f1_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row["stage2_kept"] = sum(st["kept"] == "stage2" for st in staged)
            row["staged_runs"] = len(staged)
        rows.append(row)
    return rows


def table_markdown(rows: Iterable[dict[str, Any]], baseline: dict[str, Any] | None = None) -> str:
    lines = ["| strategy | tuner | seeds | test acc | test macro-F1 | dev acc | dev macro-F1 | realised mask rate | step ms |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(r: dict[str, Any], s: str, m: str) -> str:
        return f"{r[f'{s}_{m}_mean']:.2f} ± {r[f'{s}_{m}_std']:.2f}"

    for r in rows:
        rate = f"{r['realised_rate']:.3f}" if r["strategy"] != "none" else "-"
        lines.append(f"| {LABELS.get(r['strategy'], r['strategy'])} | {r['tuner']} | {r['seeds']} | "
                     f"{cell(r, 'test', 'accuracy')} | {cell(r, 'test', 'macro_f1')} | {cell(r, 'dev', 'accuracy')} | "
                     f"{cell(r, 'dev', 'macro_f1')} | {rate} | {r['median_step_ms']:.1f} |")
    if baseline:
        t, d = baseline["test"], baseline["dev"]
        lines.append(f"| majority class ({baseline['name']}) | - | - | {100 * t['accuracy']:.2f} | "
                     f"{100 * t['macro_f1']:.2f} | {100 * d['accuracy']:.2f} | {100 * d['macro_f1']:.2f} | - | - |")
        lines.append("")
        above = [f"{LABELS.get(r['strategy'], r['strategy'])} {'yes' if r['dev_macro_f1_mean'] > 100 * d['macro_f1'] else 'NO'}"
                 for r in rows]
        lines.append(f"Dev macro-F1 above the majority baseline ({100 * d['macro_f1']:.2f}): {', '.join(above)}.")
    return "\n".join(lines) + "\n"


def stage2_markdown(rows: Iterable[dict[str, Any]]) -> str:
    """What stage 2 added: stage-1 scores (= the same runs without stage 2) against the final ones."""
    staged = [r for r in rows if "staged_runs" in r]
    if not staged:
        return ""
    lines = ["## Stage 2 (classification-only fine-tuning from the best stage-1 checkpoint)", "",
             "Stage 1 alone is the run without stage 2 (stage 1 is identical); stage 2 is kept only when its best "
             "dev score beats stage 1's.", "",
             "| strategy | tuner | runs | stage-1 test macro-F1 | final test macro-F1 | stage-1 dev macro-F1 | "
             "final dev macro-F1 | stage 2 kept |", "|---|---|---|---|---|---|---|---|"]
    def pm(r: dict[str, Any], key: str) -> str:
        return f"{r[key + '_mean']:.2f} ± {r[key + '_std']:.2f}"

    for r in staged:
        lines.append(f"| {LABELS.get(r['strategy'], r['strategy'])} | {r['tuner']} | {r['staged_runs']} | "
                     f"{pm(r, 'stage1_test_macro_f1')} | {pm(r, 'test_macro_f1')} | {pm(r, 'stage1_dev_macro_f1')} | "
                     f"{pm(r, 'dev_macro_f1')} | {r['stage2_kept']}/{r['staged_runs']} |")
    return "\n".join(lines) + "\n"


def _label(strategy: str) -> str:
    return LABELS.get(strategy, strategy)


def _pairs(strategies: Iterable[str]) -> list[tuple[str, str]]:
    present = sorted(set(strategies), key=lambda s: (-ORDER.get(s, 9), s))
    pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
    return [p for p in FIRST_PAIRS if p in pairs] + [p for p in pairs if p not in FIRST_PAIRS]


def load_test_predictions(run_dir: Path, label_names: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
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


def _skipped(tuner: str, a: str, b: str, metric: str, seeds: int, reason: str) -> dict[str, Any]:
    return {"tuner": tuner, "pair": f"{_label(a)} vs {_label(b)}", "a": a, "b": b, "seeds": seeds, "metric": metric,
            "diff": None, "ci_low": None, "ci_high": None, "p_value": None, "verdict": "skipped", "note": reason,
            "seed_ci_low": None, "seed_ci_high": None, "seed_p_value": None, "seed_higher": None, "seed_verdict": None}


def compare_strategies(run_dirs: Iterable[Path], metric: Metric = "macro_f1", label_names: list[str] | None = None,
                       n_boot: int = 10_000) -> list[dict[str, Any]]:
    """Paired bootstrap of every strategy pair per tuner on the test split (``l3m.stats``).

    One row per pair, the more elaborate method as A; diff and CI in points of ``metric``. A pair
    is skipped, with the reason, when one of its runs has no stored test predictions (runs older
    than per-example predictions), when they share no seed, or when their test examples differ.
    """
    runs: dict[str, dict[str, dict[int, Path]]] = {}
    for d in run_dirs:
        if (Path(d) / RUN_RECORD).exists():
            rec = RunRecord.load(Path(d) / RUN_RECORD)
            runs.setdefault(rec.tuner, {}).setdefault(rec.strategy, {})[rec.seed] = Path(d)
    cache: dict[Path, tuple[np.ndarray, np.ndarray, list[str]] | None] = {}
    rows = []
    for tuner, by_strategy in runs.items():
        for a, b in _pairs(by_strategy):
            seeds = sorted(set(by_strategy[a]) & set(by_strategy[b]))
            if not seeds:
                rows.append(_skipped(tuner, a, b, metric, 0, "no seed in common"))
                continue
            dirs = [by_strategy[s][seed] for s in (a, b) for seed in seeds]
            for d in dirs:
                if d not in cache:
                    cache[d] = load_test_predictions(d, label_names)
            missing = [d.name for d in dirs if cache[d] is None]
            if missing:
                rows.append(_skipped(tuner, a, b, metric, len(seeds), "no test predictions stored in "
                                     f"{', '.join(missing)} (runs older than per-example predictions)"))
                continue
            loaded = [x for x in (cache[d] for d in dirs) if x is not None]
            gold = loaded[0][0]
            if any(not np.array_equal(x[0], gold) for x in loaded):
                rows.append(_skipped(tuner, a, b, metric, len(seeds), "the runs' test predictions are not over "
                                     "the same examples"))
                continue
            preds = [x[1] for x in loaded]
            n_labels = len(loaded[0][2])
            c = paired_bootstrap(gold, dict(zip(seeds, preds[:len(seeds)], strict=True)),
                                 dict(zip(seeds, preds[len(seeds):], strict=True)), n_labels, metric,
                                 names=(_label(a), _label(b)), n_boot=n_boot)
            per_seed = [metric_value(gold, p, n_labels, metric) for p in preds]
            st = seed_test(per_seed[:len(seeds)], per_seed[len(seeds):], names=(_label(a), _label(b)))
            rows.append({"tuner": tuner, "pair": f"{c.a} vs {c.b}", "a": a, "b": b, "seeds": c.seeds, "metric": metric,
                         "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value,
                         "verdict": c.verdict, "note": INDICATIVE if c.seeds < MIN_SEEDS else "",
                         "seed_ci_low": st.ci_low, "seed_ci_high": st.ci_high, "seed_p_value": st.p_value,
                         "seed_higher": st.higher, "seed_verdict": st.verdict})
    return rows


def comparisons_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"## Pairwise comparisons (test {metric.replace('_', '-')})", "",
             f"A minus B in points, mean over the seeds both have; 95% paired bootstrap percentile interval over "
             f"test examples; p: two-sided paired permutation test (both conditional on the trained seeds). "
             f"Across seeds: a paired t-test on the per-seed differences (95% t interval, p, seeds on which A "
             f"is higher): does the difference hold for other seeds. Fewer than {MIN_SEEDS} seeds: indicative only.",
             "", "| pair | tuner | seeds | mean diff | 95% CI | p | verdict | across seeds: 95% CI | p | A higher | "
             "verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["diff"] is None:
            lines.append(f"| {r['pair']} | {r['tuner']} | {r['seeds']} | - | - | - | skipped: {r['note']} "
                         "| - | - | - | - |")
            continue
        verdict = f"{r['verdict']} {r['note']}".strip()
        lines.append(f"| {r['pair']} | {r['tuner']} | {r['seeds']} | {r['diff']:+.2f} | "
                     f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p_value']:.4f} | {verdict} | "
                     f"{_seed_cells(r)} |")
    return "\n".join(lines) + "\n"


def _seed_cells(r: dict[str, Any]) -> str:
    """The across-seeds columns of a comparison row ('-' where one seed leaves nothing to test)."""
    seeds = f"{r['seed_higher']}/{r['seeds']}"
    if r["seed_p_value"] is None or np.isnan(r["seed_p_value"]):
        return f"- | - | {seeds} | {r['seed_verdict']}"
    return (f"[{r['seed_ci_low']:+.2f}, {r['seed_ci_high']:+.2f}] | {r['seed_p_value']:.4f} | {seeds} | "
            f"{r['seed_verdict']}")


def write_results(exp_dir: Path, run_dirs: list[Path], title: str = "", header: list[str] | None = None,
                  baseline: dict[str, Any] | None = None, metric: Metric = "macro_f1",
                  label_names: list[str] | None = None,
                  comparisons: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """results.md / results.csv / comparisons.csv / results.png of the finished runs among ``run_dirs``.

    ``comparisons`` (``compare_strategies`` rows) are computed here when not given.
    """
    import pandas as pd

    rows = summarize(run_dirs)
    if comparisons is None:
        comparisons = compare_strategies(run_dirs, metric, label_names)
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    out = {"md": exp_dir / "results.md", "csv": exp_dir / "results.csv", "png": exp_dir / "results.png",
           "comparisons": exp_dir / "comparisons.csv"}
    intro = [f"# {title}", ""] if title else []
    intro += [*(f"- {h}" for h in header or []), "", "Scores in points, mean ± sample std over seeds.", ""]
    tables = table_markdown(rows, baseline)
    stage2 = stage2_markdown(rows)
    if stage2:
        tables += "\n" + stage2
    if comparisons:
        tables += "\n" + comparisons_markdown(comparisons, metric)
    out["md"].write_text("\n".join(intro) + "\n" + tables)
    pd.DataFrame(rows).to_csv(out["csv"], index=False)
    pd.DataFrame(comparisons, columns=COMPARISON_FIELDS).to_csv(out["comparisons"], index=False)
    _plot(rows, out["png"], title, header, baseline)
    return out


def _plot(rows: list[dict[str, Any]], path: Path, title: str, header: list[str] | None,
          baseline: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{LABELS.get(r['strategy'], r['strategy'])}" + (f"\n{r['tuner']}" if r["tuner"] != "full" else "") for r in rows]
    x = np.arange(len(rows))
    width = max(5.5, 1.4 * len(rows) + 2)
    # The settings these numbers belong to, wrapped under the axes (the first lines: model,
    # splits, training, scores; the data notes are in results.md).
    notes = textwrap.wrap("; ".join((header or [])[:4]), width=int(width * 17))[:4]
    fig, ax = plt.subplots(figsize=(width, 4.0 + 0.16 * len(notes)))
    for off, m, color in ((-0.18, "accuracy", "#4c72b0"), (0.18, "macro_f1", "#dd8452")):
        ax.bar(x + off, [r[f"test_{m}_mean"] for r in rows], 0.36, yerr=[r[f"test_{m}_std"] for r in rows],
               capsize=3, label=f"test {m.replace('_', '-')}", color=color)
    lo = min([r["test_macro_f1_mean"] - r["test_macro_f1_std"] for r in rows] + [100])
    if baseline:
        base = 100 * baseline["test"]["macro_f1"]
        ax.axhline(base, color="#555", linestyle="--", linewidth=1, label="majority-class macro-F1")
        lo = min(lo, base)
    ax.set_xticks(x, names)
    ax.set_ylabel("points")
    ax.set_ylim(max(0, lo - 10), 100)
    ax.legend(loc="upper right", fontsize=8)  # bars start at 0 and rarely reach the top
    ax.set_title(title or "strategies (mean ± std over seeds)", fontsize=10)
    bottom = 0.045 * len(notes)
    for i, line in enumerate(notes):
        fig.text(0.01, bottom - 0.04 * (i + 1) + 0.01, line, fontsize=6.5, color="#444")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
