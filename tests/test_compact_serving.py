"""weight_mask and lora models, trained through l3m.train and registered in their compact form
(domain file + a reference to the shared base), serve through the same HTTP service as a fully
fine-tuned one (real `bentoml serve`), with the offline predictions."""

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
TUNERS = {"weight_mask": TunerSpec(kind="weight_mask", mask_lr=1e-2), "lora": TunerSpec(kind="lora", lora_lr=1e-2)}


def train_compact(root: Path, base: Path, kind: str) -> Path:
    """A ``kind`` model of the two-label toy domain ``wmtoy`` trained on ``base``; its model dir."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("dev", 12), ("test", 12)):
        write_jsonl(root / "d" / f"{split}.jsonl",
                    [{"text": " ".join(rng.choice(WORDS[lab], 5)) + f" item {split} {i}", "label": lab}
                     for i, lab in enumerate(["pos", "neg"] * (n // 2))])
    domain = DomainConfig(name="wmtoy", data_root=str(root), splits={s: {"path": f"d/{s}.jsonl"} for s in ("train", "dev", "test")})
    cfg = RunConfig(domain=domain, model={"name_or_path": str(base), "max_length": 32},
                    training={"epochs": 1, "batch_size": 8, "lr": 1e-3}, output_dir=str(root / "out"))
    rec = train_one(cfg, MaskingSpec(kind="none"), TUNERS[kind], seed=1, inputs=TrainInputs(load_domain(domain)),
                    out_dir=root / "out" / kind)
    assert rec.tuner == kind
    return Path(rec.model_dir)


@pytest.fixture(scope="module", params=sorted(TUNERS))
def compact_model_dir(request, tmp_path_factory, tiny_mlm_dir) -> Path:
    return train_compact(tmp_path_factory.mktemp(f"{request.param}-data"), tiny_mlm_dir, request.param)


@pytest.fixture(scope="module")
def home(tmp_path_factory, compact_model_dir) -> Path:
    from serving import registry

    h = tmp_path_factory.mktemp("compact-bentoml")
    with env(BENTOML_HOME=str(h), L3M_DOMAIN="wmtoy"):
        res = registry.register(compact_model_dir)
        # One epoch of a tiny random model need not beat the majority-class baseline (then it
        # stays a candidate); what is tested here is serving a compact model, so force it.
        if not res.promoted:
            res = registry.promote(res.tag, force=True)
    assert res.promoted and res.tag.startswith("l3m-wmtoy:")
    return h


@pytest.fixture(scope="module", autouse=True)
def _serve_wmtoy():
    with env(L3M_DOMAIN="wmtoy"):  # the server resolves the production model of this domain
        yield


def test_compact_model_serves_like_a_full_model(client, compact_model_dir):  # noqa: F811
    meta = client.get("/metadata").json()
    assert meta["domain"] == "wmtoy"
    assert meta["tuner"] == compact_model_dir.parent.name
    texts = ["good great fine item x", "awful poor bad item y", "lovely dreadful item z"]
    got = client.post("/classify", json={"texts": texts}).json()
    want = offline_predictions(compact_model_dir, texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["probabilities"][g["label"]], abs=1e-4)


def test_served_compact_model_equals_the_offline_evaluation(server, home):  # noqa: F811
    """`l3m models verify`'s check: the stored offline test predictions replayed against the
    service, which rebuilt the domain from the store's base + the domain file."""
    from serving import registry
    from serving.verify import verify

    with env(BENTOML_HOME=str(home)):
        path = Path(registry.show(registry.production_tag("wmtoy") or "")["path"])
    assert (path / "base.json").is_file() and not list(path.glob("model*.safetensors"))
    report = verify(server, path, "test", texts_per_request=4, concurrency=8)
    assert report.ok and report.n == 12 and report.max_prob_diff < 1e-4
    assert report.served_accuracy == report.offline_accuracy
