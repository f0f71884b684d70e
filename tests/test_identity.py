"""Run identity: a run is reused or resumed only by a run of identical settings, data and scores."""

from __future__ import annotations

import json

import pytest
from test_training import _fake_logp, domain, tiny_model  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from l3m import experiment
from l3m import inputs as inputs_module
from l3m.config import MaskingSpec, RunConfig, TunerSpec
from l3m.identity import experiment_id, run_identity
from l3m.train import RUN_RECORD, train_one


def _cfg(domain, model, tmp_path, **training):  # noqa: F811
    t = {"epochs": 1, "batch_size": 16, "seeds": [1], "fp16_on_cuda": False, **training}
    return RunConfig(domain=domain, model={"name_or_path": str(model), "max_length": 32},
                     strategies=[{"kind": "none"}, {"kind": "l3"}], training=t, output_dir=str(tmp_path))


def _ids(cfg, fp="data-a"):
    return {(k.strategy, k.seed): k.run_id for k, _ in experiment.plan_runs(cfg, fp)}


def test_every_input_of_a_run_changes_its_identity(domain, tiny_model, tmp_path):  # noqa: F811
    base = _cfg(domain, tiny_model, tmp_path)
    ids = _ids(base)
    assert ids == _ids(_cfg(domain, tiny_model, tmp_path / "elsewhere"))  # the output location is not identity
    changed = {
        "epochs": _cfg(domain, tiny_model, tmp_path, epochs=2),
        "lr": _cfg(domain, tiny_model, tmp_path, lr=1e-4),
        "train_limit": _cfg(domain, tiny_model, tmp_path, train_limit=20),
        "max_steps": _cfg(domain, tiny_model, tmp_path, max_steps=7),
        "head_lr": _cfg(domain, tiny_model, tmp_path, head_lr=1e-3),
        "adam_beta2": _cfg(domain, tiny_model, tmp_path, adam_beta2=0.98),
        "stage2": _cfg(domain, tiny_model, tmp_path, stage2={"epochs": 3}),
        "head": base.model_copy(update={"model": base.model.model_copy(update={"head": "authors"})}),
    }
    for what, cfg in changed.items():
        new = _ids(cfg)
        assert all(new[k] != ids[k] for k in ids), what
    assert all(_ids(base, fp="data-b")[k] != ids[k] for k in ids)  # changed data
    seeds = _ids(_cfg(domain, tiny_model, tmp_path, seeds=[1, 2]))
    assert seeds[("l3", 1)] == ids[("l3", 1)] and seeds[("l3", 2)] != ids[("l3", 1)]
    # Settings only the MLM strategies read retrain those, not the STL baseline.
    mlm = _ids(_cfg(domain, tiny_model, tmp_path, mlm_weight=0.3))
    assert mlm[("l3", 1)] != ids[("l3", 1)] and mlm[("none", 1)] == ids[("none", 1)]
    indep = _ids(_cfg(domain, tiny_model, tmp_path, mlm_batch="independent"))
    assert indep[("l3", 1)] != ids[("l3", 1)] and indep[("none", 1)] == ids[("none", 1)]
    # Another score set (exact -> strided) changes L3 only.
    strided = base.model_copy(update={"scoring": base.scoring.model_copy(update={"mode": "strided"})})
    new = _ids(strided)
    assert new[("l3", 1)] != ids[("l3", 1)] and new[("none", 1)] == ids[("none", 1)]
    # A masking setting of L3 changes L3.
    rate = base.model_copy(update={"strategies": [base.strategies[0], base.strategies[1].model_copy(update={"rate": 0.3})]})
    assert _ids(rate)[("l3", 1)] != ids[("l3", 1)]


def test_another_base_model_file_changes_the_identity(domain, tiny_model, tmp_path):  # noqa: F811
    import shutil

    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model, copy)
    cfg = _cfg(domain, copy, tmp_path)
    before = _ids(cfg)
    config = json.loads((copy / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.2
    (copy / "config.json").write_text(json.dumps(config))
    after = _ids(cfg)
    assert all(after[k] != before[k] for k in before)


def test_runs_whose_tuner_scope_changed_got_a_new_identity(domain, tiny_model, tmp_path):  # noqa: F811
    """Tuner scopes are the encoder's layer stack now: the runs whose parameter set can differ
    from before get a new identity (an MLM head in reach, or a scope other than the default);
    the rest (STL and weight_mask with the default scope, full) keep theirs."""
    cfg = _cfg(domain, tiny_model, tmp_path)
    for strategy, tuner, scope, marked in [
        ("l3", "child_d", "layer", True), ("random", "child_f", "layer", True), ("none", "child_d", "bias", True),
        ("none", "weight_mask", "dense", True), ("none", "child_d", "layer", False), ("none", "child_f", "layer", False),
        ("l3", "weight_mask", "layer", False), ("l3", "full", "layer", False),
    ]:  # fmt: skip
        ident = run_identity(cfg, MaskingSpec(kind=strategy), TunerSpec(kind=tuner, scope=scope), 1, "data-a", "s")
        assert ("tuner_scope" in ident) == marked, (strategy, tuner, scope)


def test_experiment_id_is_the_set_of_its_runs(domain, tiny_model, tmp_path):  # noqa: F811
    keys = [k for k, _ in experiment.plan_runs(_cfg(domain, tiny_model, tmp_path), "d")]
    assert experiment_id(keys) == experiment_id(list(reversed(keys)))
    assert experiment_id(keys) != experiment_id(keys[:1])


@pytest.mark.slow
def test_changed_config_trains_anew_unchanged_reuses_and_no_foreign_resume(domain, tiny_model, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    monkeypatch.setattr(inputs_module, "score_train", lambda cfg, loaded: (_fake_logp(loaded, tok), "fake-key"))
    quiet = lambda s: None  # noqa: E731
    cfg = _cfg(domain, tiny_model, tmp_path)
    first = experiment.run_experiment(cfg, log=quiet)
    runs = sorted((tmp_path / "runs").glob(f"*/{RUN_RECORD}"))
    assert len(runs) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in runs}

    again = experiment.run_experiment(cfg, log=quiet)  # unchanged: both reused, same table
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "runs").glob(f"*/{RUN_RECORD}"))} == mtimes
    assert again["md"] == first["md"]

    # Interrupt the first config's L3 run (checkpoints kept, no run.json) ...
    loaded = experiment.load_domain(domain)
    l3_key = next(k for k, _ in experiment.plan_runs(cfg, loaded.fingerprint) if k.strategy == "l3")
    l3_dir = l3_key.path(tmp_path)
    inputs = experiment.prepare_inputs(cfg, loaded, log=quiet)
    train_one(cfg, cfg.strategies[1], cfg.tuners[0], 1, inputs, l3_dir, resume=False, keep_checkpoints=True,
              run_id=l3_key.run_id)
    (l3_dir / RUN_RECORD).unlink()
    checkpoints = sorted(p.name for p in (l3_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints

    # ... a changed config trains from scratch in its own directory, never from those checkpoints.
    changed = _cfg(domain, tiny_model, tmp_path, epochs=2)
    out = experiment.run_experiment(changed, log=quiet)
    new_runs = [p for p in (tmp_path / "runs").glob(f"*/{RUN_RECORD}") if p.parent != l3_dir and p not in mtimes]
    assert len(new_runs) == 2 and out["md"] != first["md"]
    for p in new_runs:
        rec = json.loads(p.read_text())
        assert rec["global_steps"] == 6 and rec["median_step_seconds"] > 0  # 48 rows / 16 x 2 epochs, all trained
        assert json.loads((p.parent / "identity.json").read_text())["training"]["epochs"] == 2
    assert sorted(p.name for p in (l3_dir / "checkpoints").glob("checkpoint-*")) == checkpoints
    table = out["md"].read_text()
    assert "epochs 2" in table and "| majority class" in table and "train rows used per run: 48" in table

    # The interrupted run itself resumes from its own checkpoint: no step is trained again.
    resumed = experiment.run_planned(cfg, l3_key, inputs, tmp_path, log=quiet)
    assert resumed.global_steps == 3 and resumed.median_step_seconds == 0.0


def test_training_code_is_pinned_with_the_identity_version():
    """Changing the training modules fails here until IDENTITY_VERSION is bumped (or the change is
    declared result-neutral) and the digest re-pinned: the message says how."""
    from l3m.identity import training_code_drift

    drift = training_code_drift()
    assert drift is None, drift


def test_training_code_digest_sees_code_not_comments_or_docstrings(tmp_path):
    import shutil
    from pathlib import Path

    from l3m.identity import training_code_digest

    root = tmp_path / "l3m"
    shutil.copytree(Path(experiment.__file__).parent, root)
    before = training_code_digest(root)
    module = root / "trainer.py"
    text = module.read_text()
    module.write_text(text.replace('"""The Trainer subclass', '"""Reworded: the Trainer subclass', 1) + "\n# a comment\n")
    assert training_code_digest(root) == before
    module.write_text(text.replace("self.warmup_steps = int(num_training_steps * self.warmup_ratio)",
                                   "self.warmup_steps = round(num_training_steps * self.warmup_ratio)"))
    assert training_code_digest(root) != before
    (root / "masking" / "new_strategy.py").write_text("X = 1\n")  # a new training module counts too
    module.write_text(text)
    assert training_code_digest(root) != before


def test_pin_refuses_an_unchanged_version_unless_the_results_are_the_same(tmp_path, monkeypatch):
    from l3m import identity

    copy = tmp_path / "identity.py"
    copy.write_text(open(identity.__file__).read())
    monkeypatch.setattr(identity, "TRAINING_CODE", {"version": identity.IDENTITY_VERSION, "digest": "old"})
    with pytest.raises(SystemExit, match="bump it"):
        identity.pin(same_results=False, path=copy)
    line = identity.pin(same_results=True, path=copy)
    assert line in copy.read_text() and identity.training_code_digest() in line
    monkeypatch.setattr(identity, "TRAINING_CODE", {"version": identity.IDENTITY_VERSION - 1, "digest": "old"})
    assert identity.pin(same_results=False, path=copy) == line  # a bumped version pins without the flag


def _fake_train(calls):
    from l3m.train import RunRecord

    def train_one(cfg, masking, tuner, seed, inputs, run_dir, run_id=""):
        calls.append(run_dir)
        rec = RunRecord(domain="toy", strategy=masking.kind, tuner=tuner.kind, seed=seed, metrics={}, run_id=run_id)
        rec.save(run_dir / RUN_RECORD)
        return rec

    return train_one


def test_reuse_reads_identity_json_not_the_folder_name(domain, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    from l3m.train import TrainInputs

    calls: list = []
    monkeypatch.setattr(experiment, "train_one", _fake_train(calls))
    cfg = _cfg(domain, tiny_model, tmp_path)
    cfg.strategies = [MaskingSpec(kind="none")]
    key = experiment.plan_runs(cfg, "data-a")[0][0]
    inputs = TrainInputs(experiment.load_domain(domain), data_fingerprint="data-a")
    quiet = lambda s: None  # noqa: E731
    experiment.run_planned(cfg, key, inputs, tmp_path, log=quiet)
    experiment.run_planned(cfg, key, inputs, tmp_path, log=quiet)
    assert len(calls) == 1  # the finished run is reused
    ident = key.path(tmp_path) / "identity.json"
    ident.write_text(ident.read_text().replace('"seed": 1', '"seed": 7'))  # another run's files under this name
    experiment.run_planned(cfg, key, inputs, tmp_path, log=quiet)
    assert len(calls) == 2  # not reused: trained anew, the foreign files moved aside
    assert json.loads(ident.read_text())["seed"] == 1
    assert len(list(tmp_path.glob(f"runs/{key.name}.foreign-*"))) == 1


def test_run_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import os

    from l3m.train import RunRecord

    path = tmp_path / RUN_RECORD
    old = RunRecord(domain="toy", strategy="none", tuner="full", seed=1, metrics={"dev": {"accuracy": 0.5}})
    old.save(path)
    before = path.read_text()

    def crash(src, dst):
        raise OSError("killed while writing")

    monkeypatch.setattr(os, "replace", crash)
    new = RunRecord(domain="toy", strategy="none", tuner="full", seed=1, metrics={"dev": {"accuracy": 0.9}})
    with pytest.raises(OSError):
        new.save(path)
    assert path.read_text() == before  # the reader sees the old record whole, never a torn one
