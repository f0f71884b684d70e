"""Promotion on a dev snapshot: majority-class baseline, fair re-scoring of production, label sets,
evidence (paired bootstrap intervals over the dev examples).

The models here predict one fixed class for every input (the classifier's weights zeroed, its
bias one-hot), so each model's score on a given dev set is known exactly; ``k_row_model``
predicts a second class on exactly k chosen dev texts.
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


# 40 Background, 10 Uses. Predicting Background for all: F1 80/90 on Background, 0 on the other
# labels, macro over the model's whole label set (K labels) = 80/90/K; predicting Uses: 20/60/K.
# 50 rows: enough that a constant model's clear win has an interval above 0.
K = len(label_names())
GOLD = ["Background"] * 40 + ["Uses"] * 10
ALL_BACKGROUND = 80 / 90 / K
ALL_USES = 20 / 60 / K


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
    gold = ["Uses"] * 15 + ["Background"] * 30 + ["Future"] * 5
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
    # Stored dev confusion: 9 Background, 1 Uses; always-Background scores 18/19 F1 on Background,
    # 0 on every other label: macro-F1 (18/19)/n over the n labels (about 0.158 for 6).
    names = label_names()
    write_meta(weak, dev=0.15)
    meta = json.loads((weak / "l3m.json").read_text())
    matrix = [[0] * len(names) for _ in names]
    matrix[names.index("Background")][0] = 9
    matrix[names.index("Uses")][0] = 1
    meta["metrics"]["dev"]["confusion_matrix"] = matrix
    (weak / "l3m.json").write_text(json.dumps(meta))
    res = registry.register(weak)
    assert not res.promoted and res.warning and res.baseline == pytest.approx(18 / 19 / len(names))


# ---------------------------------------------------------------- evidence, not noise (issue #23)


def k_row_model(src: Path, out: Path, texts: list[str], k: int, majority: str, other: str) -> tuple[Path, list[int]]:
    """A copy of ``src`` predicting ``majority`` for every text but the ``k`` of ``texts`` whose
    pooled output projects furthest on a fixed direction, for which it predicts ``other``.
    Returns the directory and those k indices."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(src)).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    with torch.no_grad():
        # A random tiny model's [CLS] states differ little between texts (std ~1e-3): the pooler
        # is set to spread them (tanh of the standardised state), and the classifier reads them
        # along where the first text departs from the mean, which sets a few texts clearly apart.
        cls = torch.stack([model.bert(**tok(t, return_tensors="pt")).last_hidden_state[0, 0] for t in texts])
        gain = 0.5 / float(cls.std(0).mean())
        model.bert.pooler.dense.weight.copy_(gain * torch.eye(cls.shape[1]))
        model.bert.pooler.dense.bias.copy_(-gain * cls.mean(0))
        pooled = torch.stack([model.bert(**tok(t, return_tensors="pt")).pooler_output[0] for t in texts])
        direction = pooled[0] - pooled.mean(0)
        direction /= direction.norm()
        proj = pooled @ direction
        order = proj.argsort(descending=True)
        top, nxt = proj[order[k - 1]], proj[order[k]]
        assert top - nxt > 1e-4, "no clear cut between the k-th and the next text"
        scale = 100.0 / float(top - nxt)  # logits +-50 around the cut: float noise cannot cross it
        names = label_names()
        weight = torch.zeros_like(model.classifier.weight)
        weight[names.index(other)] = scale * direction
        bias = torch.tensor([0.0 if n == majority else -1e4 for n in names])
        bias[names.index(other)] = -scale * float(top + nxt) / 2
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    copy_with_dev(src, out, 0.5)
    model.save_pretrained(str(out))
    return out, sorted(int(i) for i in order[:k])


def near_majority(src: Path, out: Path, k: int, n: int = 60) -> tuple[Path, EvalSet]:
    """A dev set of n rows (train majority Background; 6 Uses among them) and a model that
    predicts Background everywhere except k rows, all of them gold Uses (so it is right there)."""
    texts = [f"citation text number {i} ( Smith , {1990 + i} )" for i in range(n)]
    path, rows = k_row_model(src, out, texts, k, "Background", "Uses")
    uses = rows + [i for i in range(n) if i not in rows][: 6 - k]
    gold = ["Uses" if i in uses else "Background" for i in range(n)]
    return path, EvalSet(texts=texts, pairs=None, gold=gold, fingerprint="snap-1", majority_label="Background",
                         label_names=label_names())


def test_a_model_differing_from_the_majority_on_one_dev_row_is_a_candidate_with_a_warning(
        home, tiny_dir, tmp_path):  # noqa: F811
    model, dev = near_majority(tiny_dir, tmp_path / "near", k=1)
    res = registry.register(model, dev=dev)
    # A point comparison would promote it: it is right on one more row than the baseline.
    assert res.dev_score > res.baseline
    assert res.stage == "candidate" and not res.promoted and registry.production_tag(DOMAIN) is None
    assert res.warning and "does not beat the majority-class baseline" in res.warning and "CI [" in res.warning
    vs_base = res.evidence["baseline"]
    assert vs_base["level"] == 0.95 and vs_base["n_examples"] == 60 and vs_base["diff"] > 0
    assert vs_base["ci_low"] <= 0 < vs_base["ci_high"]
    entry = json.loads((home / "l3m-registry.json").read_text())["models"][res.tag]
    assert entry["evidence"]["baseline"] == vs_base and entry["warning"] == res.warning
    assert not registry.promote(res.tag).promoted  # the recorded interval decides a manual promotion too
    assert registry.promote(res.tag, force=True).promoted


def test_confidence_is_configurable(home, tiny_dir, tmp_path):  # noqa: F811
    # Right on 2 more rows than the baseline: both are missing from about 13% of resamples
    # ((58/60)^60), where the difference is 0: the 95% interval reaches 0, the 50% one does not.
    model, dev = near_majority(tiny_dir, tmp_path / "near2", k=2)
    strict = registry.register(model, dev=dev)
    assert not strict.promoted and strict.evidence["baseline"]["ci_low"] <= 0
    loose = registry.register(model, dev=dev, confidence=0.5)
    assert loose.promoted and loose.evidence["baseline"]["ci_low"] > 0 and loose.evidence["baseline"]["level"] == 0.5


def test_a_challenger_one_row_better_than_production_does_not_replace_it(home, tiny_dir, tmp_path):  # noqa: F811
    # Train majority Uses: both models clearly beat predicting Uses; the challenger is production
    # plus one more right row, a point win but no evidence.
    texts = [f"citation text number {i} ( Smith , {1990 + i} )" for i in range(60)]
    challenger, rows = k_row_model(tiny_dir, tmp_path / "c", texts, 1, "Background", "Uses")
    gold = ["Uses" if i in rows or i < 3 else "Background" for i in range(60)]
    dev = EvalSet(texts=texts, pairs=None, gold=gold, fingerprint="snap-1", majority_label="Uses",
                  label_names=label_names())
    prod = registry.register(constant_model(tiny_dir, tmp_path / "p", "Background", 0.5), dev=dev)
    assert prod.promoted and prod.evidence["baseline"]["ci_low"] > 0
    res = registry.register(challenger, dev=dev)
    assert res.dev_score > res.production_dev_score and not res.promoted
    assert "below the bar" in res.reason and f"production {prod.tag}" in res.reason
    assert res.evidence["production"]["ci_low"] <= 0 and res.warning is None
    assert registry.production_tag(DOMAIN) == prod.tag
    margin = registry.register(challenger, dev=dev, promote_margin=-0.05)  # a margin below 0 lets it through
    assert margin.promoted and res.evidence["production"]["ci_low"] > -5


# ---------------------------------------------------------------- carved dev splits (issue #23)


def fingerprinted(path: Path, fingerprint: str) -> Path:
    """``path``'s l3m.json saying it was trained on the snapshot ``fingerprint``."""
    meta = json.loads((path / "l3m.json").read_text())
    meta["data_fingerprint"] = fingerprint
    (path / "l3m.json").write_text(json.dumps(meta))
    return path


def carved(gold: list[str], fingerprint: str, offset: int = 0) -> EvalSet:
    """A carved dev split; another ``offset`` holds out other rows (a re-carve)."""
    return EvalSet(texts=[f"citation text {i + offset}" for i in range(len(gold))], pairs=None, gold=gold,
                   fingerprint=fingerprint, majority_label="Future", label_names=label_names(), carved=True)


def test_a_recarved_dev_split_is_not_a_fair_comparison(home, tiny_dir, tmp_path):  # noqa: F811
    prod = registry.register(fingerprinted(constant_model(tiny_dir, tmp_path / "p", "Uses", 0.5), "carve-a"),
                             dev=carved(GOLD, "carve-a"))
    assert prod.promoted
    # A changed split_spec re-carved dev: production may have trained on rows now in dev.
    challenger = fingerprinted(constant_model(tiny_dir, tmp_path / "c", "Background", 0.5), "carve-b")
    res = registry.register(challenger, dev=carved(GOLD, "carve-b", offset=1000))
    assert res.dev_score > res.production_dev_score and not res.promoted and res.stage == "candidate"
    assert res.warning and "not fair" in res.warning and prod.tag in res.warning and "--force" in res.warning
    assert registry.production_tag(DOMAIN) == prod.tag
    assert not registry.promote(res.tag).promoted
    assert registry.promote(res.tag, force=True).promoted


def test_a_carved_dev_split_with_the_same_rows_is_compared(home, tiny_dir, tmp_path):  # noqa: F811
    prod = registry.register(fingerprinted(constant_model(tiny_dir, tmp_path / "p", "Uses", 0.5), "carve-a"),
                             dev=carved(GOLD, "carve-a"))
    # New train rows appended (new fingerprint), the same dev rows held out: a fair comparison.
    challenger = fingerprinted(constant_model(tiny_dir, tmp_path / "c", "Background", 0.5), "carve-a2")
    res = registry.register(challenger, dev=carved(GOLD, "carve-a2"))
    assert res.promoted and res.previous_production == prod.tag and res.warning is None
