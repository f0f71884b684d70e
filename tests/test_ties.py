"""The tie rule of checkpoint choice and early stopping (issue 23, item 8), in both stages.

Scripted dev scores (the Trainer's ``compute_metrics`` replaced by a sequence) make the ties
happen where the test says. ``earliest`` is transformers' rule, ``latest`` the L3Masking
authors' (save on >=, stop when the last ``patience`` evaluations are all strictly below the best).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_training import domain, tiny_model  # noqa: F401  (fixtures)

from l3m import run_steps, stage2
from l3m.config import MaskingSpec, RunConfig, TunerSpec, load_config
from l3m.data.loading import load_domain
from l3m.train import TrainInputs, train_one
from l3m.trainer import Patience

ROOT = Path(__file__).resolve().parent.parent


def _scripted(scores: list[float]):
    calls = iter(scores)

    def compute_metrics(pred):
        labels = pred.label_ids
        acc = next(calls, 0.0)
        return {"accuracy": acc, "macro_f1": acc, "n": len(np.asarray(labels))}

    return compute_metrics


def _stop_after(ties: str, scores: list[float], patience: int) -> int | None:
    """The evaluation (1-based) after which Patience stops, or None."""
    cb = Patience(patience, "accuracy", ties)  # type: ignore[arg-type]

    class Control:
        should_training_stop = False

    control = Control()
    for i, s in enumerate(scores, 1):
        cb.on_evaluate(None, None, control, metrics={"eval_accuracy": s})
        if control.should_training_stop:
            return i
    return None


def test_patience_counts_ties_as_the_authors_do():
    scores = [0.5, 0.75, 0.75, 0.75, 0.5, 0.5]
    assert _stop_after("earliest", scores, 2) == 4  # a tie is no improvement (transformers)
    assert _stop_after("latest", scores, 2) == 6  # a tie is a new best: two strictly lower needed
    assert _stop_after("latest", [0.5, 0.5, 0.5, 0.5], 1) is None  # a plateau never stops it
    restored = Patience(**Patience(2, "accuracy", "latest").state()["args"])
    assert restored.state() == Patience(2, "accuracy", "latest").state()


@pytest.mark.parametrize("ties", ["earliest", "latest"])
def test_tie_rule_picks_checkpoint_and_stop_in_both_stages(ties, domain, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    # 48 rows / batch 8 = 6 steps an epoch; stage 1 evaluates every 2 steps, stage 2 every epoch.
    monkeypatch.setattr(run_steps, "compute_metrics", _scripted([0.5, 0.75, 0.75, 0.5, 0.5, 0.5]))
    monkeypatch.setattr(stage2, "compute_metrics", _scripted([0.6, 0.6, 0.5]))
    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_model), "max_length": 32},
                    training={"epochs": 2, "batch_size": 8, "eval_steps": 2, "early_stopping_patience": 2,
                              "ties": ties, "fp16_on_cuda": False, "stage2": {"epochs": 3, "patience": 1}},
                    output_dir=str(tmp_path))
    rec = train_one(cfg, MaskingSpec(kind="none"), TunerSpec(), 1, TrainInputs(load_domain(domain)), tmp_path / "r")
    s1, s2 = rec.stages["stage1"], rec.stages["stage2"]
    if ties == "earliest":
        assert (s1["global_steps"], Path(s1["best_checkpoint"]).name) == (8, "checkpoint-4")
        assert (s2["global_steps"], Path(s2["best_checkpoint"]).name) == (12, "checkpoint-6")
    else:
        assert (s1["global_steps"], Path(s1["best_checkpoint"]).name) == (10, "checkpoint-6")
        assert (s2["global_steps"], Path(s2["best_checkpoint"]).name) == (18, "checkpoint-12")


def test_paper_profiles_use_the_authors_tie_rule_and_the_default_does_not():
    for path in sorted((ROOT / "configs" / "paper").glob("*-*.yaml")):
        assert load_config(path).training.ties == "latest", path.name
    assert load_config(ROOT / "configs" / "demo.yaml").training.ties == "earliest"
