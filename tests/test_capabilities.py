"""Say no up front: what a model family cannot do is refused before any work, naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from families import FAMILIES

from l3m.capabilities import model_capabilities, refusals
from l3m.config import ConfigError, RunConfig
from l3m.modelcheck import check_run_model

DOMAIN = {"name": "toy", "splits": {"train": {"path": "x.jsonl"}}, "metric": "accuracy"}


def _cfg(model: Path, strategies: list[str], **extra: object) -> RunConfig:
    return RunConfig(domain=DOMAIN, model={"name_or_path": str(model), "max_length": 32, **extra},
                     strategies=[{"kind": k} for k in strategies])  # fmt: skip


def _without_mlm_head(src: Path, out: Path, cls_name: str) -> Path:
    """The same family saved from a class with no MLM head (ELECTRA's discriminator, a bare encoder)."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    getattr(transformers, cls_name)(cfg).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_can_do_every_step(family_models, family: str):
    caps = model_capabilities(str(family_models[family]))
    assert (caps.classifier, caps.mlm_head, caps.masking, caps.word_boundaries) == (None, None, None, None)
    assert refusals(_cfg(family_models[family], ["none", "random", "l3", "selective"]), caps) == []


@pytest.mark.parametrize("family,cls_name", [("electra", "ElectraForPreTraining"), ("bert", "BertModel"),
                                             ("roberta", "RobertaForSequenceClassification")])  # fmt: skip
def test_a_checkpoint_without_an_mlm_head_is_refused_for_mlm_features_only(family_models, tmp_path, family,
                                                                          cls_name):
    model = _without_mlm_head(family_models[family], tmp_path / cls_name, cls_name)
    with pytest.raises(ConfigError) as err:
        check_run_model(_cfg(model, ["none", "l3"]))
    msg = str(err.value)
    fam = FAMILIES[family].name.split("-")[0]
    assert f"({fam} family)" in msg and "no pretrained masked-LM head" in msg and cls_name in msg
    assert "MLM strategies ['l3']" in msg and "PLL scoring (for L3)" in msg
    assert check_run_model(_cfg(model, ["none"])) == str(model)  # STL alone needs no MLM head


def test_a_tokenizer_without_a_mask_token_cannot_mask(family_models, tmp_path):
    import json

    model = tmp_path / "nomask"
    shutil.copytree(family_models["bert"], model)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    conf["mask_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="tokenizer has no mask token"):
        check_run_model(_cfg(model, ["random"]))
    check_run_model(_cfg(model, ["none"]))


@pytest.mark.parametrize("family,works", [("modernbert", False), ("electra", False), ("roberta", True), ("bert", True)])
def test_the_authors_head_is_refused_up_front_where_it_cannot_be_built(family_models, family, works):
    cfg = _cfg(family_models[family], ["none"], head="authors")
    if works:
        check_run_model(cfg)
        return
    with pytest.raises(ConfigError, match=f"model.head: authors is not available for {family}"):
        check_run_model(cfg)
