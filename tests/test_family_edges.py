"""Model layouts at the edges of "any masked LM": each one used to crash mid-run or give wrong numbers.

- a head that takes more than the hidden states (DeBERTa-v2, ``legacy: false``) or returns a tuple
  (XLM): the MLM task trains through the masked LM's own forward;
- Funnel: its classifier's encoder is not its masked LM's (refused for the MLM strategies up
  front), and its outputs move with padding (scored in batches of one length);
- a SentencePiece pre-tokenizer that does not split words (``Metaspace(split=False)``);
- a ``pytorch_model.bin`` checkpoint without an MLM head;
- ``model.max_length`` beyond the position table (RoBERTa's starts after the pad id).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from families import EDGE_FAMILIES, build
from test_family_scoring import ITEMS, max_diff, reference
from test_scoring import one_thread  # noqa: F401  (fixture)

from l3m.capabilities import model_capabilities, refusals
from l3m.config import ConfigError, RunConfig
from l3m.modelcheck import check_run_model
from l3m.modeling import build_multitask_model
from l3m.scoring import PLLScorer
from l3m.scoring.plans import _marker_words, encode

DOMAIN = {"name": "toy", "splits": {"train": {"path": "x.jsonl"}}, "metric": "accuracy"}


@pytest.fixture(scope="module")
def edge_models(tmp_path_factory, shared_data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edges")
    return {name: build(name, root / name, shared_data) for name in EDGE_FAMILIES}


def _cfg(model: Path, strategies: list[str], max_length: int = 32) -> RunConfig:
    return RunConfig(domain=DOMAIN, model={"name_or_path": str(model), "max_length": max_length},
                     strategies=[{"kind": k} for k in strategies])  # fmt: skip


def _masked_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([ITEMS[0][0], ITEMS[1][0]], padding=True, return_tensors="pt")
    ids, labels = enc["input_ids"].clone(), torch.full_like(enc["input_ids"], -100)
    for row, pos in ((0, 2), (0, 5), (1, 3)):
        labels[row, pos], ids[row, pos] = ids[row, pos], tok.mask_token_id
    return ids, enc["attention_mask"], labels


@pytest.mark.parametrize("family", ["deberta-v2-lm", "xlm"])
def test_a_head_that_is_not_one_positionwise_module_trains_through_the_own_forward(edge_models, family,
                                                                                   one_thread):  # noqa: F811
    path = edge_models[family]
    model = build_multitask_model(str(path), ["a", "b"], with_mlm=True).eval()
    assert model._mlm_head is None
    ids, attn, labels = _masked_batch(path)
    ours = model.mlm_loss(ids, attn, None, labels)
    # transformers' own loss on the same (shared-encoder) masked LM: mean CE over labelled rows
    assert model.mlm_model is not None
    theirs = model.mlm_model(input_ids=ids, attention_mask=attn, labels=labels).loss
    assert torch.isfinite(ours) and abs(ours.item() - theirs.item()) < 1e-5
    ours.backward()  # the gradient reaches the shared encoder
    grads = [p.grad for p in model.classifier_model.base_model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_the_decoder_is_retied_only_where_it_was_tied(edge_models, family_models):
    # DeBERTa-v2 (legacy: false) names its head's dense as "output embeddings": it keeps its weight.
    deberta = build_multitask_model(str(edge_models["deberta-v2-lm"]), ["a", "b"], with_mlm=True)
    assert deberta.mlm_model is not None
    dense = deberta.mlm_model.lm_predictions.lm_head.dense
    assert dense.weight.shape == (dense.out_features, dense.in_features)
    bert = build_multitask_model(str(family_models["bert"]), ["a", "b"], with_mlm=True)
    assert bert.mlm_model is not None and bert._mlm_head is not None  # the fast path is kept
    assert bert.mlm_model.get_output_embeddings().weight is bert.classifier_model.get_input_embeddings().weight


def test_funnel_is_refused_for_the_mlm_strategies_and_runs_stl(edge_models):
    path = edge_models["funnel"]
    caps = model_capabilities(str(path))
    assert caps.shared_encoder is not None and "FunnelBaseModel" in caps.shared_encoder
    with pytest.raises(ConfigError) as err:
        check_run_model(_cfg(path, ["none", "random"]))
    assert "(funnel family)" in str(err.value) and "MLM strategies ['random']" in str(err.value)
    assert check_run_model(_cfg(path, ["none"])) == str(path)
    with pytest.raises(ValueError, match="cannot share"):
        build_multitask_model(str(path), ["a", "b"], with_mlm=True)


def test_a_model_that_padding_moves_is_scored_in_batches_of_one_length(edge_models, family_models,
                                                                       one_thread):  # noqa: F811
    funnel = PLLScorer(str(edge_models["funnel"]), dtype="float32", device="cpu")
    assert funnel.one_length and "depend on padding" in funnel.path_reason
    kw = {"metric": "within_word_l2r", "max_length": 48, "token_budget": 300}
    encs = funnel.encode(ITEMS, 48)
    assert max_diff(funnel.score(ITEMS, **kw), reference(edge_models["funnel"], encs, "within_word_l2r")) <= 1e-4
    assert not PLLScorer(str(family_models["deberta-v2"]), dtype="float32", device="cpu").one_length


def test_batches_of_one_length_never_mix_lengths(edge_models):
    from l3m.scoring import make_plan

    funnel = PLLScorer(str(edge_models["funnel"]), dtype="float32", device="cpu")
    encs = funnel.encode(ITEMS, 48)
    plans = [make_plan(e, "original") for e in encs]
    mixed = list(funnel._batches(encs, plans, 10_000, None, one_length=False))
    single = list(funnel._batches(encs, plans, 10_000, None, one_length=True))
    assert any(len({u.length for u in b}) > 1 for b in mixed)
    assert all(len({u.length for u in b}) == 1 for b in single)


def test_marker_words_when_pieces_cross_word_boundaries():
    toks = ["<s>", "▁", "an", "other", ",▁", "sh", "orter", "▁", "text", "▁with▁", "w", "ords", "</s>"]
    seq = [None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None]
    assert _marker_words(toks, seq) == [None, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 4, None]


def test_a_pre_tokenizer_that_does_not_split_still_gives_words(edge_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(edge_models["xlm-roberta-nosplit"])
    assert tok("two words").word_ids()[1:-1] == [0] * (len(tok("two words").input_ids) - 2)  # what broke it
    enc = encode(tok, [("another, shorter text with several words", None)], 64)[0]
    starts = int((enc.word_end[1:-1] == np.arange(1, enc.length - 1)).sum())  # pieces that end a word
    assert starts >= 5


def test_a_bin_checkpoint_without_an_mlm_head_is_refused(family_models, tmp_path):
    from transformers import AutoConfig, BertForMaskedLM, BertModel

    src = family_models["bert"]
    for name, cls in (("bare", BertModel), ("full", BertForMaskedLM)):
        out = tmp_path / name
        model = cls(AutoConfig.from_pretrained(src))
        out.mkdir()
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special")):
                shutil.copy(f, out / f.name)
    assert not (tmp_path / "bare" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="no pretrained masked-LM head"):
        check_run_model(_cfg(tmp_path / "bare", ["none", "l3"]))
    assert check_run_model(_cfg(tmp_path / "full", ["none", "l3"])) == str(tmp_path / "full")


def test_max_length_beyond_the_position_table_is_refused(family_models, one_thread):  # noqa: F811
    path = family_models["roberta"]  # 131 rows, positions start after the pad id (1): 129 tokens
    caps = model_capabilities(str(path))
    assert caps.max_positions == 129
    assert refusals(_cfg(path, ["none"], max_length=129), caps) == []
    (why,) = refusals(_cfg(path, ["none"], max_length=130), caps)
    assert "model.max_length 130" in why and "129 positions" in why
    long = " ".join(["word"] * 400)
    scores = PLLScorer(str(path), dtype="float32", device="cpu").score([long], metric="original", max_length=129,
                                                                      mode="strided", stride=16)  # fmt: skip
    assert scores[0].shape == (129,) and np.isfinite(scores[0][1:-1]).all()


def test_transformers_loading_bars_are_off_and_download_bars_on():
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    import l3m.modeling  # noqa: F401  (a module that loads weights installs it)

    assert not hf_logging.is_progress_bar_enabled()
    if not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # the user's own switch wins
        assert not hub.are_progress_bars_disabled()


def test_a_tuner_scope_that_selects_nothing_is_refused(edge_models):
    path = edge_models["xlm"]  # its blocks are attentions.N / ffns.N: nothing has "layer" in its name
    cfg = RunConfig(domain=DOMAIN, model={"name_or_path": str(path), "max_length": 32}, strategies=[{"kind": "l3"}],
                    tuners=[{"kind": "full"}, {"kind": "child_d"}, {"kind": "weight_mask", "scope": "ffns"}])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        check_run_model(cfg)
    msg = str(err.value)
    assert "tuners[1] child_d (scope 'layer')" in msg and "attentions, ffns" in msg and "tuners[2]" not in msg


@pytest.mark.parametrize("family,positions", [("bert", 128), ("electra", 128), ("mpnet", 130), ("modernbert", None)])
def test_position_limits_per_table_kind(family_models, family: str, positions: int | None):
    """No offset (BERT, ELECTRA), RoBERTa-style offset (MPNet: rows - pad - 1), no table (ModernBERT:
    rotary positions, nothing to refuse)."""
    caps = model_capabilities(str(family_models[family]))
    assert caps.max_positions == positions
    if positions is not None:
        assert refusals(_cfg(family_models[family], ["none"], max_length=positions), caps) == []
        assert refusals(_cfg(family_models[family], ["none"], max_length=positions + 1), caps)
    else:
        assert refusals(_cfg(family_models[family], ["none"], max_length=4096), caps) == []


@pytest.mark.parametrize("family", ["bert", "distilbert", "albert", "deberta-v2", "modernbert"])
def test_the_default_tuner_scope_is_accepted_where_the_blocks_are_layers(family_models, family: str):
    path = family_models[family]
    cfg = RunConfig(domain=DOMAIN, model={"name_or_path": str(path), "max_length": 32}, strategies=[{"kind": "l3"}],
                    tuners=[{"kind": "child_d"}, {"kind": "weight_mask"}])  # fmt: skip
    assert refusals(cfg, model_capabilities(str(path))) == []
