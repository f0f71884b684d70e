"""A weight_mask model, trained through l3m.train and registered, serves through the same HTTP
service as a fully fine-tuned one (real `bentoml serve`), with the offline predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from conftest_serving import offline_predictions
from test_serving import client, env, server, server_log  # noqa: F401  (fixtures reused with this module's `home`)

from l3m.config import DomainConfig, MaskingSpec, RunConfig, TunerSpec
from l3m.data.loading import load_domain
from l3m.train import TrainInputs, train_one

WORDS = {"pos": "good great fine lovely".split(), "neg": "bad awful poor dreadful".split()}


@pytest.fixture(scope="module")
def wm_model_dir(tmp_path_factory, tiny_mlm_dir) -> Path:
    root = tmp_path_factory.mktemp("wm-data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("dev", 12), ("test", 12)):
        write_jsonl(root / "d" / f"{split}.jsonl",
                    [{"text": " ".join(rng.choice(WORDS[lab], 5)) + f" item {split} {i}", "label": lab}
                     for i, lab in enumerate(["pos", "neg"] * (n // 2))])
    domain = DomainConfig(name="wmtoy", data_root=str(root), splits={s: {"path": f"d/{s}.jsonl"} for s in ("train", "dev", "test")})
    cfg = RunConfig(domain=domain, model={"name_or_path": str(tiny_mlm_dir), "max_length": 32},
                    training={"epochs": 1, "batch_size": 8, "lr": 1e-3}, output_dir=str(root / "out"))
    rec = train_one(cfg, MaskingSpec(kind="none"), TunerSpec(kind="weight_mask", mask_lr=1e-2), seed=1,
                    inputs=TrainInputs(load_domain(domain)), out_dir=root / "out" / "wm")
    assert rec.tuner == "weight_mask"
    return Path(rec.model_dir)


@pytest.fixture(scope="module")
def home(tmp_path_factory, wm_model_dir) -> Path:
    from serving import registry

    h = tmp_path_factory.mktemp("wm-bentoml")
    with env(BENTOML_HOME=str(h), L3M_DOMAIN="wmtoy"):
        res = registry.register(wm_model_dir)
        # One epoch of a tiny random model need not beat the majority-class baseline (then it
        # stays a candidate); what is tested here is serving a weight_mask model, so force it.
        if not res.promoted:
            res = registry.promote(res.tag, force=True)
    assert res.promoted and res.tag.startswith("l3m-wmtoy:")
    return h


@pytest.fixture(scope="module", autouse=True)
def _serve_wmtoy():
    with env(L3M_DOMAIN="wmtoy"):  # the server resolves the production model of this domain
        yield


def test_weight_mask_model_serves_like_a_full_model(client, wm_model_dir):  # noqa: F811
    meta = client.get("/metadata").json()
    assert meta["domain"] == "wmtoy"
    assert "weight_mask" in str(meta.get("tuner"))
    texts = ["good great fine item x", "awful poor bad item y", "lovely dreadful item z"]
    got = client.post("/classify", json={"texts": texts}).json()
    want = offline_predictions(wm_model_dir, texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["probabilities"][g["label"]], abs=1e-4)
