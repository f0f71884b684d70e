"""The results table of one experiment: mean ± std over seeds per (strategy, tuner).

It aggregates exactly the runs it is given (the experiment's planned runs, by identity), never
whatever happens to lie in a directory, and it states the settings, split sizes and the
majority-class baseline the numbers belong to.
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from l3m.comparisons import (
    COMPARISON_FIELDS,
    LABELS,
    ORDER,
    compare_all,
    compare_strategies,
    comparisons_markdown,
    is_tuner_row,
    load_test_predictions,
    tuner_comparisons_markdown,
)
from l3m.stats import Metric
from l3m.train import RUN_RECORD, RunRecord

# The comparisons live in l3m.comparisons; these names stay importable from here.
__all__ = ["compare_strategies", "comparisons_markdown", "load_test_predictions", "summarize", "table_markdown",
           "stage2_markdown", "write_results"]


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
    rows = list(rows)
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
        several = len({r["tuner"] for r in rows}) > 1  # then each row is named with its tuner
        above = [f"{LABELS.get(r['strategy'], r['strategy'])}{' / ' + r['tuner'] if several else ''} "
                 f"{'yes' if r['dev_macro_f1_mean'] > 100 * d['macro_f1'] else 'NO'}" for r in rows]
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


def write_results(exp_dir: Path, run_dirs: list[Path], title: str = "", header: list[str] | None = None,
                  baseline: dict[str, Any] | None = None, metric: Metric = "macro_f1",
                  label_names: list[str] | None = None,
                  comparisons: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """results.md / results.csv / comparisons.csv / results.png of the finished runs among ``run_dirs``.

    ``comparisons`` (``compare_strategies`` then ``compare_tuners`` rows) are computed here when not
    given; the tuner section is written only when there are tuner rows.
    """
    import pandas as pd

    rows = summarize(run_dirs)
    if comparisons is None:
        comparisons = compare_all(run_dirs, metric, label_names)
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
    by_strategy = [r for r in comparisons if not is_tuner_row(r)]
    by_tuner = [r for r in comparisons if is_tuner_row(r)]
    if by_strategy:
        tables += "\n" + comparisons_markdown(by_strategy, metric)
    if by_tuner:
        tables += "\n" + tuner_comparisons_markdown(by_tuner, metric)
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
