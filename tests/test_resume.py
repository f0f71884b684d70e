"""A run killed at any point and resumed is the run never killed (issue 23, item 1).

The kill is an exception raised from inside the run (a ``BaseException``, as a signal's
``KeyboardInterrupt`` is, so nothing catches it), at three points: mid-epoch in stage 1, after
both stages finished but before ``run.json`` (in the export), and mid-epoch in stage 2. The
resumed run must report the same steps, scores, masking counts and examples trained on, and write
the same predictions, as the uninterrupted run (CPU, deterministic).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_training import _fake_logp, domain, tiny_model  # noqa: F401  (fixtures)
from transformers import AutoTokenizer

from l3m import train as train_module
from l3m.config import MaskingSpec, RunConfig, TunerSpec
from l3m.data.loading import load_domain
from l3m.evaluate import read_predictions
from l3m.train import RUN_RECORD, TrainInputs, train_one
from l3m.trainer import MultiTaskTrainer


class Killed(BaseException):
    """The process dies here: nothing below this point runs."""


def _cfg(domain, model, tmp_path):  # noqa: F811
    # 48 train rows in batches of 8: 6 steps an epoch, dev every 3 steps (checkpoints mid-epoch),
    # patience 2 so stage 1 stops early; L3 with an independent MLM batch (keyed pool draws).
    return RunConfig(domain=domain, model={"name_or_path": str(model), "max_length": 32},
                     strategies=[{"kind": "l3"}],
                     training={"epochs": 4, "batch_size": 8, "lr": 2e-3, "seeds": [4], "eval_steps": 3,
                               "early_stopping_patience": 2, "mlm_batch": "independent", "warmup_ratio": 0.1,
                               "fp16_on_cuda": False, "stage2": {"epochs": 2, "lr": 1e-3, "patience": 1}},
                     output_dir=str(tmp_path))


def _kill_step(monkeypatch, stage_dir: str, step: int) -> None:
    real = MultiTaskTrainer.training_step

    def step_or_die(self, model, inputs, num_items_in_batch=None):
        if Path(self.args.output_dir).parent.name == stage_dir and self.state.global_step == step:
            raise Killed(f"{stage_dir} step {step}")
        return real(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(MultiTaskTrainer, "training_step", step_or_die)


def _kill_export(monkeypatch) -> None:
    def die(*args, **kwargs):
        raise Killed("export")

    monkeypatch.setattr(train_module, "write_predictions", die)  # the export's first write


def _comparable(rec, run_dir: Path) -> dict:
    out = {k: v for k, v in vars(rec).items() if k not in ("train_seconds", "median_step_seconds", "model_dir")}
    # Checkpoint paths name the run directory: compare their names.
    out["best_checkpoint"] = Path(rec.best_checkpoint).name
    for stage in ("stage1", "stage2"):
        out["stages"][stage]["best_checkpoint"] = Path(out["stages"][stage]["best_checkpoint"]).name
    return out


@pytest.fixture(scope="module")
def setup(domain, tiny_model):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_model)
    loaded = load_domain(domain)
    return TrainInputs(loaded, token_logp=_fake_logp(loaded, tok), score_key="fake")


@pytest.fixture(scope="module")
def uninterrupted(domain, tiny_model, setup, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("never-killed")
    rec = train_one(_cfg(domain, tiny_model, out), MaskingSpec(kind="l3"), TunerSpec(), 4, setup, out / "run")
    return rec, out / "run"


@pytest.mark.parametrize("point", ["stage1-mid-epoch", "after-early-stop-before-run-json", "stage2-mid-epoch"])
def test_killed_and_resumed_run_equals_the_uninterrupted_run(point, domain, tiny_model, setup, uninterrupted,  # noqa: F811
                                                             tmp_path, monkeypatch):
    ref, ref_dir = uninterrupted
    s1 = ref.stages["stage1"]["global_steps"]
    assert s1 < 24, "stage 1 must stop early for the kill points to mean what they say"
    assert ref.stages["stage2"]["global_steps"] > 6  # stage 2 passed its first epoch's checkpoint
    cfg = _cfg(domain, tiny_model, tmp_path)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        if point == "stage1-mid-epoch":
            _kill_step(m, "run", 4)  # after the checkpoint at step 3, inside epoch 1
        elif point == "stage2-mid-epoch":
            _kill_step(m, "stage2", 7)  # after stage 2's first-epoch checkpoint
        else:
            _kill_export(m)
        with pytest.raises(Killed):
            train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), 4, setup, run)
    assert not (run / RUN_RECORD).exists()
    resumed = train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), 4, setup, run)

    assert resumed.global_steps == ref.global_steps
    assert _comparable(resumed, run) == _comparable(ref, ref_dir)
    for split in ("dev", "test"):
        ours = read_predictions(run / "model" / "predictions" / f"{split}.jsonl")
        theirs = read_predictions(ref_dir / "model" / "predictions" / f"{split}.jsonl")
        assert [r["label"] for r in ours] == [r["label"] for r in theirs]
        assert ours == theirs  # probabilities too: the same weights


def test_a_meta_tartan_run_killed_in_the_export_keeps_its_task_weights(domain, tiny_model, setup,  # noqa: F811
                                                                       tmp_path, monkeypatch):
    """The loss weighting's state is the weighting's own (not a transformers callback state): a
    replayed stage restores it, so the resumed run writes the same task-weight log."""
    from l3m.weighting.report import WEIGHTS_LOG

    def run(out: Path, kill: bool) -> Path:
        cfg = _cfg(domain, tiny_model, out).model_copy(
            update={"weighting": RunConfig.model_validate({"domain": domain, "weighting": {"kind": "meta_tartan"}}).weighting})
        if kill:
            with monkeypatch.context() as m, pytest.raises(Killed):
                _kill_export(m)
                train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), 4, setup, out / "run")
        train_one(cfg, MaskingSpec(kind="l3"), TunerSpec(), 4, setup, out / "run")
        return out / "run" / WEIGHTS_LOG

    never, resumed = run(tmp_path / "never", kill=False), run(tmp_path / "killed", kill=True)
    assert never.read_text().strip() and resumed.read_text() == never.read_text()
