"""Promotion on a dev snapshot: majority-class baseline, fair re-scoring of production, label sets.

The models here predict one fixed class for every input (the classifier's weights zeroed, its
bias one-hot), so each model's score on a given dev set is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest_serving import copy_with_dev, label_names, write_meta
from test_registry import home, tiny_dir  # noqa: F401  (fixtures)

from serving import registry
from serving.registry import EvalSet

DOMAIN = "citation_intent"


def constant_model(src: Path, out: Path, label: str, stored_dev: float) -> Path:
    """A copy of ``src`` that predicts ``label`` for every text, recording ``stored_dev`` in l3m.json."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(src))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0 if n == label else 0.0 for n in label_names()]))
    copy_with_dev(src, out, stored_dev)
    model.save_pretrained(str(out))
    return out


def dev_set(gold: list[str], majority: str, fingerprint: str = "snap-1") -> EvalSet:
    return EvalSet(texts=[f"citation text {i}" for i in range(len(gold))], pairs=None, gold=gold,
                   fingerprint=fingerprint, majority_label=majority, label_names=label_names())


# 8 Background, 2 Uses. Predicting Background for all: F1 16/18 on Background, 0 on Uses,
# macro over the 2 labels present = 0.4444; predicting Uses: F1 4/12 / 2 = 0.1667.
GOLD = ["Background"] * 8 + ["Uses"] * 2
ALL_BACKGROUND = 8 / 18
ALL_USES = 1 / 6


def test_model_predicting_one_class_is_held_back_with_a_warning(home, tiny_dir, tmp_path):  # noqa: F811
    degenerate = constant_model(tiny_dir, tmp_path / "deg", "Background", stored_dev=0.9)
    res = registry.register(degenerate, dev=dev_set(GOLD, majority="Background"))
    assert res.stage == "candidate" and not res.promoted
    assert res.dev_score == pytest.approx(ALL_BACKGROUND) and res.baseline == pytest.approx(ALL_BACKGROUND)
    assert res.warning and "does not beat the majority-class baseline" in res.warning
    assert res.warning in res.reason and res.evaluated_on == "dev snapshot"
    assert registry.production_tag(DOMAIN) is None  # first model of the domain, still not promoted
    entry = json.loads((home / "l3m-registry.json").read_text())["models"][res.tag]
    assert entry["warning"] == res.warning and entry["baseline"] == pytest.approx(ALL_BACKGROUND)

    refused = registry.promote(res.tag)
    assert not refused.promoted and "majority-class baseline" in refused.reason
    assert registry.production_tag(DOMAIN) is None


def test_force_promote_from_the_cli_overrides_the_baseline(home, tiny_dir, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from flows.cli import app

    res = registry.register(constant_model(tiny_dir, tmp_path / "deg", "Background", 0.9),
                            dev=dev_set(GOLD, majority="Background"))
    plain = CliRunner().invoke(app, ["models", "promote", res.tag])
    assert plain.exit_code == 0 and json.loads(plain.output)["promoted"] is False
    forced = CliRunner().invoke(app, ["models", "promote", res.tag, "--force"])
    assert forced.exit_code == 0, forced.output
    out = json.loads(forced.output)
    assert out["promoted"] and out["reason"].startswith("forced: ") and "baseline" in out["reason"]
    assert registry.production_tag(DOMAIN) == res.tag


def test_production_is_rescored_on_the_new_dev_set(home, tiny_dir, tmp_path):  # noqa: F811
    # Production's stored number (0.9, from its own run's dev data) would beat the challenger's
    # stored 0.3; on the current snapshot the challenger wins, and that is what counts.
    prod = registry.register(constant_model(tiny_dir, tmp_path / "p", "Uses", stored_dev=0.9))
    assert prod.promoted and prod.evaluated_on == "stored"
    challenger = constant_model(tiny_dir, tmp_path / "c", "Background", stored_dev=0.3)
    res = registry.register(challenger, dev=dev_set(GOLD, majority="Uses", fingerprint="snap-2"))
    assert res.promoted and res.stage == "production" and res.previous_production == prod.tag
    assert res.dev_score == pytest.approx(ALL_BACKGROUND)
    assert res.production_dev_score == pytest.approx(ALL_USES) and res.compared_with == prod.tag
    assert res.baseline == pytest.approx(ALL_USES) and res.data_fingerprint == "snap-2"
    assert "snap-2" in res.reason and f"{ALL_USES:.4f}" in res.reason
    entry = json.loads((home / "l3m-registry.json").read_text())["models"][res.tag]
    assert entry["data_fingerprint"] == "snap-2" and entry["production_dev_score"] == pytest.approx(ALL_USES)


def test_rescored_production_can_win_where_stored_numbers_would_not(home, tiny_dir, tmp_path):  # noqa: F811
    prod = registry.register(constant_model(tiny_dir, tmp_path / "p", "Background", stored_dev=0.2))
    challenger = constant_model(tiny_dir, tmp_path / "c", "Uses", stored_dev=0.8)
    # The train majority is Future, which neither model predicts.
    gold = ["Uses"] * 3 + ["Background"] * 6 + ["Future"] * 1
    res = registry.register(challenger, dev=dev_set(gold, majority="Future"))
    assert not res.promoted and "below the bar" in res.reason
    assert res.production_dev_score > res.dev_score > res.baseline
    assert registry.production_tag(DOMAIN) == prod.tag


def test_different_label_sets_refuse_with_a_clear_message(home, tiny_dir, tmp_path):  # noqa: F811
    registry.register(copy_with_dev(tiny_dir, tmp_path / "p", 0.5))
    renamed = [f"{n}_v2" for n in label_names()]
    other = copy_with_dev(tiny_dir, tmp_path / "o", 0.6, labels=renamed)
    with pytest.raises(registry.RegistryError, match="differ from production .* cannot be compared"):
        registry.register(other, dev=dev_set(GOLD, majority="Background"))
    snapshot = EvalSet(texts=["a", "b"], pairs=None, gold=["yes", "no"], fingerprint="snap-x",
                       majority_label="yes", label_names=["no", "yes"])
    with pytest.raises(registry.RegistryError, match="differ from the dev snapshot's .*snap-x"):
        registry.register(copy_with_dev(tiny_dir, tmp_path / "c", 0.6), dev=snapshot)
    assert len(registry.list_models()) == 1  # nothing registered by the refused calls


def test_stored_scores_from_different_data_are_not_compared(home, tiny_dir, tmp_path):  # noqa: F811
    prod = registry.register(copy_with_dev(tiny_dir, tmp_path / "p", 0.5))
    other_data = copy_with_dev(tiny_dir, tmp_path / "c", 0.7)
    meta = json.loads((other_data / "l3m.json").read_text())
    meta["data_fingerprint"] = "re-carved-dev"
    (other_data / "l3m.json").write_text(json.dumps(meta))
    res = registry.register(other_data)
    assert not res.promoted and "different dev data" in res.reason and "re-carved-dev" in res.reason
    assert "no dev snapshot given" in res.reason
    assert registry.production_tag(DOMAIN) == prod.tag


def test_without_snapshot_a_score_at_the_single_class_bar_is_held_back(home, tiny_dir, tmp_path):  # noqa: F811
    weak = tmp_path / "weak"
    copy_with_dev(tiny_dir, weak, 0.5)
    # Stored dev confusion: 9 Background, 1 Uses; always-Background scores 18/19/2 macro-F1.
    names = label_names()
    write_meta(weak, dev=0.3)
    meta = json.loads((weak / "l3m.json").read_text())
    matrix = [[0] * len(names) for _ in names]
    matrix[names.index("Background")][0] = 9
    matrix[names.index("Uses")][0] = 1
    meta["metrics"]["dev"]["confusion_matrix"] = matrix
    (weak / "l3m.json").write_text(json.dumps(meta))
    res = registry.register(weak)
    assert not res.promoted and res.warning and res.baseline == pytest.approx(18 / 19 / 2)
