"""Experiment runner: the results table from run records, and a tiny strategies x seeds run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_training import _fake_logp, domain, tiny_model  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from l3m import experiment, results
from l3m import inputs as inputs_module
from l3m.config import RunConfig
from l3m.evaluate import majority_baseline
from l3m.identity import RunKey
from l3m.tokenview import render_token_view
from l3m.train import RunRecord


def _record(strategy, seed, acc, f1):
    m = {"accuracy": acc, "macro_f1": f1, "n": 10}
    return RunRecord(domain="toy", strategy=strategy, tuner="full", seed=seed, metrics={"dev": m, "test": m},
                     masking={"realised_rate": 0.15 if strategy != "none" else 0.0}, median_step_seconds=0.01,
                     train_rows=40)


def test_results_table_aggregates_exactly_the_given_runs(tmp_path):
    dirs = []
    for strategy, vals in {"l3": [(0.7, 0.6), (0.8, 0.7), (0.9, 0.8)], "none": [(0.5, 0.4), (0.5, 0.4)]}.items():
        for seed, (acc, f1) in enumerate(vals):
            d = RunKey(strategy, "full", seed, f"{strategy}{seed}".ljust(64, "0")).path(tmp_path)
            d.mkdir(parents=True)
            _record(strategy, seed, acc, f1).save(d / "run.json")
            dirs.append(d)
    # A run of another experiment beside them (other settings) is not part of this table.
    stray = RunKey("l3", "full", 7, "f" * 64).path(tmp_path)
    stray.mkdir(parents=True)
    _record("l3", 7, 0.0, 0.0).save(stray / "run.json")
    rows = results.summarize(dirs)
    assert [r["strategy"] for r in rows] == ["none", "l3"]  # paper order: STL, RTM, ..., L3
    l3 = rows[1]
    assert l3["seeds"] == 3 and l3["test_accuracy_mean"] == pytest.approx(80.0)
    assert l3["test_macro_f1_std"] == pytest.approx(10.0)  # sample std of 60, 70, 80
    base = {"name": "neg", "dev": {"accuracy": 0.5, "macro_f1": 1 / 3}, "test": {"accuracy": 0.5, "macro_f1": 1 / 3}}
    paths = results.write_results(tmp_path / "exp", dirs, title="toy", header=["model `m`, max_length 32"],
                                  baseline=base)
    md = paths["md"].read_text()
    assert "| L3 | full | 3 | 80.00 ± 10.00 | 70.00 ± 10.00 |" in md and "| STL |" in md
    assert "| majority class (neg) | - | - | 50.00 | 33.33 | 50.00 | 33.33 |" in md
    assert "- model `m`, max_length 32" in md
    assert list(csv.DictReader(paths["csv"].open()))[1]["strategy"] == "l3"
    assert paths["png"].stat().st_size > 1000


def test_majority_baseline_is_what_a_collapsed_classifier_scores():
    base = majority_baseline([0, 0, 0, 1, 2], {"dev": [0, 1, 2, 0]}, 3)
    assert base["label"] == 0
    assert base["dev"]["accuracy"] == pytest.approx(0.5)
    assert base["dev"]["macro_f1"] == pytest.approx((2 / 3) / 3)  # F1 2/3 on class 0, 0 on the others


def test_token_view_shades_by_surprisal():
    page = render_token_view([["[CLS]", "the", "zyx", "[SEP]"]], [np.array([np.nan, -0.1, -9.0, np.nan])], rate=0.15)
    assert page.startswith("<!doctype html>") and "zyx" in page and "-log p = 9.00" in page
    # The surprising token is shaded darker than the predictable one.
    alpha = lambda tok: float(page.split(f'>{tok}</span>')[0].rsplit("rgba(", 1)[1].split(",")[3].split(")")[0])  # noqa: E731
    assert alpha("zyx") > alpha("the")


@pytest.mark.slow
def test_run_experiment_end_to_end(domain, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                    strategies=[{"kind": "none"}, {"kind": "random"}, {"kind": "l3"}, {"kind": "selective"}],
                    training={"epochs": 1, "batch_size": 16, "seeds": [1, 2], "fp16_on_cuda": False},
                    output_dir=str(tmp_path))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    monkeypatch.setattr(inputs_module, "score_train", lambda cfg, loaded: (_fake_logp(loaded, tok), "fake-key"))
    out = experiment.run_experiment(cfg, log=lambda s: None)
    keys = [k for k, _ in experiment.plan_runs(cfg, experiment.load_domain(domain).fingerprint)]
    assert json.loads(out["json"].read_text())["runs"] == [k.name for k in keys]
    rows = {r["strategy"]: r for r in results.summarize([k.path(tmp_path) for k in keys])}
    assert set(rows) == {"none", "random", "l3", "selective"} and all(r["seeds"] == 2 for r in rows.values())
    assert abs(rows["l3"]["realised_rate"] - 0.15) < 0.05
    assert out["tokenview"].exists() and out["md"].exists()
    assert list((tmp_path / "selective").glob("selective-*.npz"))
    # The STL run of seed 1 rated the tokens: no extra rater run beside the 8 planned ones.
    assert len(list((tmp_path / "runs").glob("*/run.json"))) == 8


@pytest.mark.slow
def test_selective_alone_trains_its_rater_beside_the_table(domain, tiny_model, tmp_path):  # noqa: F811
    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                    strategies=[{"kind": "selective", "delta": 0.0}],
                    training={"epochs": 1, "batch_size": 16, "seeds": [1], "fp16_on_cuda": False},
                    output_dir=str(tmp_path))
    out = experiment.run_experiment(cfg, log=lambda s: None)
    assert len(list((tmp_path / "runs").glob("none-full-seed1-*/run.json"))) == 1  # the rater
    table = out["md"].read_text()
    assert "| Selective |" in table and "| STL |" not in table


def test_results_state_the_baseline_check_and_what_stage2_added(tmp_path):
    dirs = []
    for strategy, (s1, final, kept) in {"none": (0.30, 0.40, "stage2"), "l3": (0.20, 0.20, "stage1")}.items():
        for seed in (1, 2):
            d = RunKey(strategy, "full", seed, f"{strategy}{seed}".ljust(64, "0")).path(tmp_path)
            d.mkdir(parents=True)
            rec = _record(strategy, seed, 0.5, final)
            m1 = {"accuracy": 0.5, "macro_f1": s1, "n": 10}
            rec.stages = {"stage1": {"metrics": {"dev": m1, "test": m1}}, "stage2": {}, "kept": kept}
            rec.save(d / "run.json")
            dirs.append(d)
    base = {"name": "neg", "dev": {"accuracy": 0.5, "macro_f1": 0.25}, "test": {"accuracy": 0.5, "macro_f1": 0.25}}
    md = results.write_results(tmp_path / "exp", dirs, baseline=base)["md"].read_text()
    assert "Dev macro-F1 above the majority baseline (25.00): STL yes, L3 NO." in md
    assert "| STL | full | 2 | 30.00 ± 0.00 | 40.00 ± 0.00 | 30.00 ± 0.00 | 40.00 ± 0.00 | 2/2 |" in md
    assert "| L3 | full | 2 | 20.00 ± 0.00 | 20.00 ± 0.00 | 20.00 ± 0.00 | 20.00 ± 0.00 | 0/2 |" in md
