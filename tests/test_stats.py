"""Paired bootstrap comparisons: the statistic, its interval and verdict, and the results table rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score
from test_training import domain, tiny_model  # noqa: F401  (fixtures)

from l3m import comparisons, experiment, results, stats
from l3m.config import RunConfig
from l3m.data.loading import DataError
from l3m.evaluate import headline
from l3m.identity import RunKey
from l3m.train import RunRecord, TrainInputs

N_LABELS = 3


def _correct_on(gold: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Predictions right on exactly ``share`` of the examples (random ones), wrong elsewhere."""
    pred = (gold + 1) % N_LABELS
    right = rng.permutation(len(gold))[: round(share * len(gold))]
    pred[right] = gold[right]
    return pred


@pytest.fixture
def gold() -> np.ndarray:
    return np.random.default_rng(0).integers(0, N_LABELS, 1000)


def test_interval_covers_a_known_accuracy_difference_and_excludes_zero(gold):
    rng = np.random.default_rng(1)
    a = {s: _correct_on(gold, 0.8, rng) for s in range(5)}
    b = {s: _correct_on(gold, 0.6, rng) for s in range(5)}
    c = stats.paired_bootstrap(gold, a, b, N_LABELS, "accuracy", names=("L3", "RTM"), n_boot=2000)
    assert c.diff == pytest.approx(20.0)
    assert c.ci_low < 20.0 < c.ci_high and c.ci_low > 0
    assert c.ci_high - c.ci_low < 10  # 5 seeds x 1,000 examples pin a 20-point gap to a few points
    assert c.verdict == "L3 > RTM (CI excludes 0)" and c.seeds == 5
    assert c.p_value < 0.01
    flipped = stats.paired_bootstrap(gold, b, a, N_LABELS, "accuracy", names=("RTM", "L3"), n_boot=2000)
    assert flipped.verdict == "RTM < L3 (CI excludes 0)"
    assert flipped.ci_high < 0 and flipped.diff == pytest.approx(-20.0)


def test_identical_predictions_show_no_detectable_difference(gold):
    pred = _correct_on(gold, 0.7, np.random.default_rng(2))
    c = stats.paired_bootstrap(gold, {1: pred}, {1: pred.copy()}, N_LABELS, "macro_f1", names=("L3", "RTM"),
                               n_boot=1000)
    assert c.verdict == "no detectable difference"
    assert c.ci_low <= 0 <= c.ci_high and c.diff == 0
    assert c.p_value == 1.0


def test_small_noisy_difference_is_not_called():
    # Two runs of equal skill that disagree on a handful of examples: no verdict either way.
    gold = np.random.default_rng(3).integers(0, N_LABELS, 200)
    a = _correct_on(gold, 0.7, np.random.default_rng(4))
    b = _correct_on(gold, 0.7, np.random.default_rng(5))
    c = stats.paired_bootstrap(gold, {1: a}, {1: b}, N_LABELS, names=("L3", "RTM"), n_boot=2000)
    assert c.verdict == "no detectable difference" and c.ci_low < 0 < c.ci_high and c.p_value > 0.05


def test_only_seeds_both_strategies_have_are_compared(gold):
    rng = np.random.default_rng(6)
    a = {s: _correct_on(gold, 0.8, rng) for s in (2, 3)}
    b = {s: _correct_on(gold, 0.6, rng) for s in (2, 3, 4)}
    paired = stats.paired_bootstrap(gold, a, b, N_LABELS, "accuracy", n_boot=500)
    # A seed only A has (and a terrible one): ignored, so the result is unchanged.
    with_extra = stats.paired_bootstrap(gold, {**a, 1: (gold + 1) % N_LABELS}, b, N_LABELS, "accuracy", n_boot=500)
    assert with_extra == paired and paired.seeds == 2
    assert paired.diff == pytest.approx(20.0)
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired_bootstrap(gold, {1: a[2]}, {2: b[2]}, N_LABELS)


def test_macro_f1_averages_every_declared_class_also_one_the_split_lacks():
    """ChemProt's test split lacks a train class: the tables' macro-F1 (l3m.evaluate) and the
    comparisons' (l3m.stats) must both average over the whole label set, whether or not a
    model ever predicts the missing class."""
    from types import SimpleNamespace

    from l3m.evaluate import compute_metrics, full_report, majority_baseline

    gold = np.array([0, 0, 1, 1, 1, 0])  # class 2 declared, absent from this split
    never = np.array([0, 1, 1, 1, 0, 0])  # predicts only the present classes
    once = np.array([0, 1, 1, 2, 0, 0])  # predicts the absent class once
    for pred in (never, once):
        table = headline(gold, pred, 3)["macro_f1"]
        assert table == pytest.approx(stats.metric_value(gold, pred, 3, "macro_f1"), abs=1e-12)
        assert table == pytest.approx(f1_score(gold, pred, labels=[0, 1, 2], average="macro", zero_division=0))
        assert full_report(gold, pred, ["a", "b", "c"])["macro_f1"] == pytest.approx(table)
        logits = np.eye(3)[pred]
        assert compute_metrics(SimpleNamespace(predictions=logits, label_ids=gold))["macro_f1"] == pytest.approx(table)
    # Three classes averaged, not two: the F1s of classes 0 and 1 over 3.
    assert headline(gold, never, 3)["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 3)
    assert majority_baseline([0, 0, 1], {"test": gold}, 3)["test"]["macro_f1"] == pytest.approx((2 / 3) / 3)


def test_macro_f1_is_sklearns_and_evaluates_on_the_full_sample():
    rng = np.random.default_rng(7)
    gold, pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    value = stats.metric_value(gold, pred, 5, "macro_f1")
    assert value == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
    assert value == pytest.approx(headline(gold, pred, 5)["macro_f1"], abs=1e-12)
    assert stats.metric_value(gold, pred, 5, "accuracy") == pytest.approx(headline(gold, pred, 5)["accuracy"])
    # Over the domain's label set: a label nobody predicts nor has counts as F1 0, as in sklearn.
    assert stats.metric_value(gold, pred, 7, "macro_f1") == pytest.approx(
        f1_score(gold, pred, labels=range(7), average="macro", zero_division=0), abs=1e-12)
    # The observed difference is the mean over seeds of sklearn's macro-F1 differences.
    a = {s: rng.integers(0, 5, 300) for s in range(3)}
    b = {s: rng.integers(0, 5, 300) for s in range(3)}
    c = stats.paired_bootstrap(gold, a, b, 5, "macro_f1", n_boot=200)
    expected = np.mean([f1_score(gold, a[s], average="macro") - f1_score(gold, b[s], average="macro") for s in a])
    assert c.diff == pytest.approx(100 * expected, abs=1e-9)


def test_every_resample_scores_what_sklearn_scores_with_those_draw_counts():
    rng = np.random.default_rng(8)
    gold, pred = rng.integers(0, 4, 120), rng.integers(0, 4, 120)
    errors, gold_onehot = stats._errors(gold, pred, 4), stats._one_hot(gold, 4)
    weights, _ = next(stats._draws(np.random.default_rng(0), 20, len(gold)))
    assert weights.shape == (20, 120) and (weights.sum(1) == 120).all()
    fast = stats._score(weights @ errors, weights @ gold_onehot, len(gold), "macro_f1")
    slow = [f1_score(gold, pred, labels=range(4), average="macro", zero_division=0, sample_weight=w) for w in weights]
    assert fast == pytest.approx(slow, abs=1e-12)


def test_a_chemprot_sized_gap_is_detected():
    rng = np.random.default_rng(9)
    gold = rng.integers(0, 13, 3500)

    def noisy(right: float) -> np.ndarray:
        pred = gold.copy()
        wrong = rng.random(len(gold)) > right
        pred[wrong] = rng.integers(0, 13, wrong.sum())
        return pred

    a, b = {s: noisy(0.8) for s in range(5)}, {s: noisy(0.75) for s in range(5)}
    c = stats.paired_bootstrap(gold, a, b, 13, "macro_f1")
    assert c.n_boot == 10_000 and c.verdict.startswith("A > B") and c.ci_low > 0


# --- the results table -------------------------------------------------------------------------

LABEL_NAMES = ["neg", "pos", "mixed"]


def _write_run(run_dir, strategy, seed, gold, pred, predictions=True, tuner="full"):
    run_dir.mkdir(parents=True)
    acc = float((gold == pred).mean())
    m = {"accuracy": acc, "macro_f1": acc, "n": len(gold)}
    RunRecord(domain="toy", strategy=strategy, tuner=tuner, seed=seed, metrics={"dev": m, "test": m},
              median_step_seconds=0.01, train_rows=40).save(run_dir / "run.json")
    if predictions:
        path = run_dir / "model" / "predictions" / "test.jsonl"
        path.parent.mkdir(parents=True)
        with path.open("w") as f:
            for g, p in zip(gold, pred, strict=True):
                probs = {n: float(i == p) for i, n in enumerate(LABEL_NAMES)}
                f.write(json.dumps({"text": "t", "gold": LABEL_NAMES[g], "label": LABEL_NAMES[p],
                                    "probabilities": probs}) + "\n")


def _runs(tmp_path, seeds, skill, missing=()):
    gold = np.random.default_rng(0).integers(0, 3, 400)
    rng = np.random.default_rng(1)
    dirs = []
    for strategy, right in skill.items():
        for seed in seeds[strategy]:
            d = RunKey(strategy, "full", seed, f"{strategy}{seed}".ljust(64, "0")).path(tmp_path)
            _write_run(d, strategy, seed, gold, _correct_on(gold, right, rng), (strategy, seed) not in missing)
            dirs.append(d)
    return dirs


def test_results_table_has_the_pairwise_comparisons(tmp_path):
    seeds = {"none": [1, 2, 3], "random": [1, 2, 3], "l3": [1, 2, 3, 4]}
    dirs = _runs(tmp_path, seeds, {"none": 0.5, "random": 0.7, "l3": 0.7})
    base = {"name": "neg", "dev": {"accuracy": 0.4, "macro_f1": 0.2}, "test": {"accuracy": 0.4, "macro_f1": 0.2}}
    paths = results.write_results(tmp_path / "exp", dirs, title="toy", baseline=base, metric="accuracy",
                                  label_names=LABEL_NAMES)
    md = paths["md"].read_text()
    assert "| majority class (neg) | - | - | 40.00 |" in md  # the baseline row stays
    table = md.split("## Pairwise comparisons (test accuracy)")[1]
    lines = [line for line in table.splitlines() if line.startswith("| ") and "vs" in line]
    assert [line.split(" | ")[0] for line in lines] == ["| L3 vs RTM", "| RTM vs STL", "| L3 vs STL"]
    # Paired on seeds 1-3 (L3's seed 4 has no RTM partner), flagged as fewer than 5 seeds.
    assert lines[0].startswith("| L3 vs RTM | full | 3 |")
    assert "no detectable difference (n seeds < 5: indicative only)" in lines[0]
    assert "| +20.00 |" in lines[1] and "RTM > STL (CI excludes 0) (n seeds < 5: indicative only)" in lines[1]
    rows = list(csv.DictReader(paths["comparisons"].open()))
    assert [(r["a"], r["b"]) for r in rows] == [("l3", "random"), ("random", "none"), ("l3", "none")]
    assert float(rows[2]["diff"]) == pytest.approx(20.0) and float(rows[2]["ci_low"]) > 0
    assert rows[2]["note"] == stats.INDICATIVE


def test_five_paired_seeds_are_not_flagged(tmp_path):
    dirs = _runs(tmp_path, {"none": range(5), "l3": range(5)}, {"none": 0.5, "l3": 0.8})
    rows = results.compare_strategies(dirs, "accuracy", LABEL_NAMES, n_boot=1000)
    assert len(rows) == 1 and rows[0]["pair"] == "L3 vs STL" and rows[0]["seeds"] == 5
    assert rows[0]["verdict"] == "L3 > STL (CI excludes 0)" and rows[0]["note"] == ""


def test_seed_test_is_a_paired_t_test_over_seeds():
    from scipy.stats import ttest_rel

    a, b = [0.71, 0.69, 0.74, 0.70, 0.72], [0.60, 0.62, 0.61, 0.59, 0.63]
    st = stats.seed_test(a, b, names=("L3", "STL"))
    assert st.p_value == pytest.approx(ttest_rel(a, b).pvalue) and st.p_value < 0.05
    assert st.verdict == "L3 > STL across seeds" and st.higher == 5 and st.ci_low > 0
    assert st.diff == pytest.approx(100 * (np.mean(a) - np.mean(b)))
    mixed = stats.seed_test([0.80, 0.50, 0.78, 0.52, 0.79], [0.6] * 5, names=("L3", "STL"))
    assert mixed.verdict == "no detectable difference across seeds" and mixed.higher == 3
    assert mixed.ci_low < 0 < mixed.ci_high
    assert stats.seed_test([0.7], [0.6]).verdict == "not tested (one seed)"
    with pytest.raises(ValueError, match="pair them by seed"):
        stats.seed_test([0.7, 0.6], [0.6])


def test_a_verdict_says_whether_it_holds_across_seeds(tmp_path):
    """Pooled over 400 test examples x 5 seeds, L3's mean advantage is clear to the example-level
    bootstrap, but it wins on 3 seeds and loses on 2: across seeds nothing is detectable."""
    gold = np.random.default_rng(0).integers(0, 3, 400)
    rng = np.random.default_rng(1)
    dirs = []
    for strategy, skills in {"none": [0.6] * 5, "l3": [0.80, 0.50, 0.78, 0.52, 0.79]}.items():
        for seed, right in enumerate(skills):
            d = RunKey(strategy, "full", seed, f"{strategy}{seed}".ljust(64, "0")).path(tmp_path)
            _write_run(d, strategy, seed, gold, _correct_on(gold, right, rng))
            dirs.append(d)
    (row,) = results.compare_strategies(dirs, "accuracy", LABEL_NAMES, n_boot=1000)
    assert row["verdict"] == "L3 > STL (CI excludes 0)"
    assert row["seed_verdict"] == "no detectable difference across seeds" and row["seed_higher"] == 3
    assert row["seed_p_value"] > 0.05 and row["seed_ci_low"] < 0 < row["seed_ci_high"]
    md = results.comparisons_markdown([row], "accuracy")
    assert "| L3 > STL (CI excludes 0) | [" in md and "| 3/5 | no detectable difference across seeds |" in md


def test_a_pair_with_a_run_without_predictions_is_skipped_with_the_reason(tmp_path):
    seeds = {"none": [1, 2], "random": [1, 2], "l3": [1, 2]}
    dirs = _runs(tmp_path, seeds, {"none": 0.5, "random": 0.6, "l3": 0.7}, missing={("none", 2)})
    rows = {r["pair"]: r for r in results.compare_strategies(dirs, "macro_f1", LABEL_NAMES, n_boot=500)}
    assert rows["L3 vs RTM"]["diff"] is not None  # the pair with predictions is still compared
    for pair in ("RTM vs STL", "L3 vs STL"):
        assert rows[pair]["diff"] is None and rows[pair]["verdict"] == "skipped"
        assert "no test predictions stored in none-full-seed2-" in rows[pair]["note"]
    md = results.comparisons_markdown(list(rows.values()), "macro_f1")
    assert "| RTM vs STL | full | 2 | - | - | - | skipped: no test predictions stored in none-full-seed2-" in md
    assert md.count("| - | - | - | - |") == 2  # nor across seeds


def _tuner_runs(tmp_path, tuners):
    """Runs of {strategy: [tuner, ...]} over seeds 0-4: weight_mask right on 60-64% of the test
    examples (60% + seed points), every other tuner on 80%, lora with exactly full's predictions."""
    gold = np.random.default_rng(0).integers(0, 3, 400)
    rng = np.random.default_rng(1)
    dirs = []
    for strategy, kinds in tuners.items():
        for seed in range(5):
            full = _correct_on(gold, 0.8, rng)
            for tuner in kinds:
                pred = _correct_on(gold, 0.6 + seed / 100, rng) if tuner == "weight_mask" else full
                d = RunKey(strategy, tuner, seed, f"{strategy}{tuner}{seed}".ljust(64, "0")).path(tmp_path)
                _write_run(d, strategy, seed, gold, pred, tuner=tuner)
                dirs.append(d)
    return dirs


def test_compact_tuners_are_compared_against_full_first(tmp_path):
    dirs = _tuner_runs(tmp_path, {"none": ["lora", "weight_mask", "full"]})
    rows = comparisons.compare_tuners(dirs, "accuracy", LABEL_NAMES, n_boot=1000)
    assert [(r["pair"], r["a"], r["b"]) for r in rows] == [
        ("weight_mask vs full", "weight_mask", "full"), ("lora vs full", "lora", "full"),
        ("lora vs weight_mask", "lora", "weight_mask")]
    assert all(r["strategy"] == "none" and r["tuner"] == "" and r["seeds"] == 5 for r in rows)
    cost, same, other = rows
    assert cost["diff"] == pytest.approx(-18.0) and cost["ci_high"] < 0  # the compact tuner's cost
    assert cost["verdict"] == "weight_mask < full (CI excludes 0)" and cost["note"] == ""
    assert cost["seed_verdict"] == "weight_mask < full across seeds"
    assert same["diff"] == 0 and same["verdict"] == "no detectable difference" and same["ci_low"] <= 0 <= same["ci_high"]
    assert same["seed_verdict"] == "not tested (no spread across seeds)"
    assert other["diff"] == pytest.approx(18.0) and other["verdict"] == "lora > weight_mask (CI excludes 0)"


def test_a_strategy_run_with_one_tuner_has_no_tuner_comparison(tmp_path):
    dirs = _tuner_runs(tmp_path, {"l3": ["full"], "none": ["full", "weight_mask"]})
    rows = comparisons.compare_tuners(dirs, "accuracy", LABEL_NAMES, n_boot=200)
    assert [(r["strategy"], r["pair"]) for r in rows] == [("none", "weight_mask vs full")]
    assert comparisons.compare_tuners(_tuner_runs(tmp_path / "one", {"l3": ["full"]}), "accuracy", LABEL_NAMES) == []
    # The strategy comparison of the same runs: per tuner, with an empty strategy key.
    [row] = results.compare_strategies(dirs, "accuracy", LABEL_NAMES, n_boot=200)
    assert (row["pair"], row["tuner"], row["strategy"]) == ("L3 vs STL", "full", "")


def test_results_table_has_the_tuner_comparisons_only_with_several_tuners(tmp_path):
    dirs = _tuner_runs(tmp_path, {"none": ["full", "weight_mask"], "l3": ["full"]})
    paths = results.write_results(tmp_path / "exp", dirs, metric="accuracy", label_names=LABEL_NAMES)
    md = paths["md"].read_text()
    assert "## Pairwise comparisons (test accuracy)" in md and "| pair | strategy | seeds |" in md
    table = md.split("## Tuner comparisons (test accuracy)")[1]
    assert "| weight_mask vs full | STL | 5 | -18.00 | [" in table
    assert "| L3 vs STL |" not in table
    rows = list(csv.DictReader(paths["comparisons"].open()))
    assert list(rows[0]) == results.COMPARISON_FIELDS and results.COMPARISON_FIELDS[-1] == "strategy"
    assert [(r["pair"], r["tuner"], r["strategy"]) for r in rows] == [
        ("L3 vs STL", "full", ""), ("weight_mask vs full", "", "none")]

    single = results.write_results(tmp_path / "exp1", _runs(tmp_path / "one", {"none": [1, 2], "l3": [1, 2]},
                                                            {"none": 0.5, "l3": 0.7}), label_names=LABEL_NAMES)
    assert "Tuner comparisons" not in single["md"].read_text()
    [row] = csv.DictReader(single["comparisons"].open())
    assert row["pair"] == "L3 vs STL" and row["strategy"] == ""


def test_a_prediction_outside_the_label_set_names_file_line_and_field(tmp_path):
    gold = np.array([0, 1, 2])
    _write_run(tmp_path / "run", "l3", 1, gold, gold)
    path = tmp_path / "run" / "model" / "predictions" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"label": "pos"', '"label": "positive"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl:2: field 'label' is 'positive', not one of"):
        results.load_test_predictions(tmp_path / "run", LABEL_NAMES)


def test_tabulate_writes_the_comparisons_into_experiment_json(domain, tiny_model, tmp_path):  # noqa: F811
    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                    strategies=[{"kind": "none"}, {"kind": "random"}], training={"seeds": [1, 2]},
                    output_dir=str(tmp_path))
    loaded = experiment.load_domain(domain)
    keys = [k for k, _ in experiment.plan_runs(cfg, loaded.fingerprint)]
    gold = np.array(loaded.dataset["test"]["label"])
    for key in keys:
        pred = gold if key.strategy == "random" else np.zeros_like(gold)
        d = key.path(tmp_path)
        d.mkdir(parents=True)
        acc = float((gold == pred).mean())
        m = {"accuracy": acc, "macro_f1": acc}
        RunRecord(domain="toy", strategy=key.strategy, tuner=key.tuner, seed=key.seed,
                  metrics={"dev": m, "test": m}).save(d / "run.json")
        (d / "model" / "predictions").mkdir(parents=True)
        (d / "model" / "predictions" / "test.jsonl").write_text("".join(
            json.dumps({"gold": loaded.label_names[g], "label": loaded.label_names[p]}) + "\n"
            for g, p in zip(gold, pred, strict=True)))
    paths = experiment.tabulate(cfg, TrainInputs(loaded, data_fingerprint=loaded.fingerprint), keys)
    record = json.loads(paths["json"].read_text())
    [row] = record["comparisons"]
    assert row["pair"] == "RTM vs STL" and row["metric"] == "macro_f1" and row["seeds"] == 2
    expected = 100 * (1.0 - f1_score(gold, np.zeros_like(gold), average="macro"))
    assert row["diff"] == pytest.approx(expected)
    assert "| RTM vs STL | full | 2 |" in paths["md"].read_text() and paths["comparisons"].exists()


def test_a_direction_needs_the_interval_and_the_permutation_test_to_agree():
    assert stats.verdict("L3", "RTM", 0.5, 2.0, p_value=0.01) == "L3 > RTM (CI excludes 0)"
    assert stats.verdict("L3", "RTM", -2.0, -0.5, p_value=0.01) == "L3 < RTM (CI excludes 0)"
    # The 1-seed demo case: a percentile interval just above 0 while p = 0.13.
    assert stats.verdict("L3", "RTM", 0.07, 1.65, p_value=0.13).startswith("no detectable difference (CI excludes 0")
    assert stats.verdict("L3", "RTM", -0.1, 1.0, p_value=0.01) == "no detectable difference"


def test_the_same_difference_on_every_seed_is_not_called_significant():
    """Two seeds each 0.5 points apart (up to float noise) have no spread to test against: no verdict."""
    from l3m.stats import seed_test

    got = seed_test([0.800, 0.705], [0.795, 0.700], names=("L3", "STL"))
    assert got.verdict == "not tested (no spread across seeds)" and got.higher == 2
    assert np.isnan(got.p_value) and abs(got.diff - 0.5) < 1e-9


def test_the_baseline_check_names_the_tuner_when_a_table_has_several():
    row = {"strategy": "none", "seeds": 5, "realised_rate": 0.0, "median_step_ms": 1.0,
           **{f"{s}_{m}_{k}": 20.0 for s in ("test", "dev") for m in ("accuracy", "macro_f1") for k in ("mean", "std")}}
    base = {"name": "neg", **{s: {"accuracy": 0.5, "macro_f1": 0.25} for s in ("test", "dev")}}
    rows = [row | {"tuner": "full"}, row | {"tuner": "lora", "dev_macro_f1_mean": 11.0}]
    md = results.table_markdown(iter(rows), base)
    assert "Dev macro-F1 above the majority baseline (25.00): STL / full NO, STL / lora NO." in md
    rows[0]["dev_macro_f1_mean"] = 30.0
    assert "(25.00): STL / full yes, STL / lora NO." in results.table_markdown(rows, base)
    assert "(25.00): STL yes." in results.table_markdown(rows[:1], base)
