"""Experiment runner: the results table from run records, and a tiny strategies x seeds run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from test_training import _fake_logp, domain, tiny_model  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from l3m import experiment
from l3m.config import RunConfig
from l3m.tokenview import render_token_view
from l3m.train import RunRecord


def _record(strategy, seed, acc, f1):
    m = {"accuracy": acc, "macro_f1": f1, "n": 10}
    return RunRecord(domain="toy", strategy=strategy, tuner="full", seed=seed, metrics={"dev": m, "test": m},
                     masking={"realised_rate": 0.15 if strategy != "none" else 0.0}, median_step_seconds=0.01)


def test_results_table_mean_and_std(tmp_path):
    for strategy, vals in {"l3": [(0.7, 0.6), (0.8, 0.7), (0.9, 0.8)], "none": [(0.5, 0.4), (0.5, 0.4)]}.items():
        for seed, (acc, f1) in enumerate(vals):
            d = experiment.RunKey(strategy, "full", seed).path(tmp_path)
            d.mkdir(parents=True)
            _record(strategy, seed, acc, f1).save(d / "run.json")
    rows = experiment.summarize(tmp_path)
    assert [r["strategy"] for r in rows] == ["none", "l3"]  # paper order: STL, RTM, ..., L3
    l3 = rows[1]
    assert l3["seeds"] == 3 and l3["test_accuracy_mean"] == pytest.approx(80.0)
    assert l3["test_macro_f1_std"] == pytest.approx(10.0)  # sample std of 60, 70, 80
    paths = experiment.write_results(tmp_path, title="toy")
    md = paths["md"].read_text()
    assert "| L3 | full | 3 | 80.00 ± 10.00 | 70.00 ± 10.00 |" in md and "| STL |" in md
    assert list(csv.DictReader(paths["csv"].open()))[1]["strategy"] == "l3"
    assert paths["png"].stat().st_size > 1000


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
    monkeypatch.setattr(experiment, "score_train", lambda cfg, loaded: (_fake_logp(loaded, tok), "fake-key"))
    out = experiment.run_experiment(cfg, log=lambda s: None)
    rows = {r["strategy"]: r for r in experiment.summarize(tmp_path)}
    assert set(rows) == {"none", "random", "l3", "selective"} and all(r["seeds"] == 2 for r in rows.values())
    assert abs(rows["l3"]["realised_rate"] - 0.15) < 0.05
    assert out["tokenview"].exists() and out["md"].exists()
    assert list((tmp_path / "selective").glob("selective-*.npz"))
    assert not (tmp_path / "selective" / "classifier").exists()  # the STL run of seed 1 rated the tokens


@pytest.mark.slow
def test_selective_alone_trains_its_rater_outside_the_table(domain, tiny_model, tmp_path):  # noqa: F811
    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                    strategies=[{"kind": "selective", "delta": 0.0}],
                    training={"epochs": 1, "batch_size": 16, "seeds": [1], "fp16_on_cuda": False},
                    output_dir=str(tmp_path))
    experiment.run_experiment(cfg, log=lambda s: None)
    assert (tmp_path / "selective" / "classifier" / "run.json").exists()
    assert [r["strategy"] for r in experiment.summarize(tmp_path)] == ["selective"]
