"""Tiny random-weight masked LMs of every encoder family, built offline inside the tests.

Each family gets what a user's hub model would bring: a tokenizer of the family's kind trained on
the shipped domain texts with ``tokenizers`` (WordPiece ``##``, byte-level BPE ``Ġ``, SentencePiece
Unigram ``▁``), and a model made from the family's ``transformers`` config, both saved with
``save_pretrained``. Sizes are tiny (2 layers, width 32), as transformers and peft test themselves:
the same code paths, negligible compute. Nothing here is loaded from a hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAX_POS = 128
WIDTH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: str  # wordpiece | wordpiece_cased | bytelevel | unigram
    specials: str  # bert: [CLS] [SEP] [PAD] [MASK] [UNK]; roberta: <s> </s> <pad> <mask> <unk>
    token_types: bool  # whether the tokenizer hands the model token_type_ids
    config: Callable[[int, dict[str, int]], Any]  # (vocab_size, special ids) -> PretrainedConfig


def _cfg(name: str, **kw: Any) -> Callable[[int, dict[str, int]], Any]:
    def make(vocab: int, ids: dict[str, int]) -> Any:
        import transformers

        cls = getattr(transformers, name)
        return cls(vocab_size=vocab, pad_token_id=ids["pad"], **kw)

    return make


def _roberta_like(name: str) -> Callable[[int, dict[str, int]], Any]:
    # RoBERTa positions start at pad_token_id + 1: room for MAX_POS tokens after them.
    def make(vocab: int, ids: dict[str, int]) -> Any:
        import transformers

        cls = getattr(transformers, name)
        return cls(vocab_size=vocab, pad_token_id=ids["pad"], bos_token_id=ids["cls"], eos_token_id=ids["sep"],
                   max_position_embeddings=MAX_POS + ids["pad"] + 2, type_vocab_size=1, **WIDTH)  # fmt: skip

    return make


def _albert(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import AlbertConfig

    return AlbertConfig(vocab_size=vocab, pad_token_id=ids["pad"], embedding_size=16, max_position_embeddings=MAX_POS,
                        **WIDTH)  # fmt: skip


def _distilbert(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import DistilBertConfig

    return DistilBertConfig(vocab_size=vocab, pad_token_id=ids["pad"], dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                            max_position_embeddings=MAX_POS)  # fmt: skip


def _electra(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import ElectraConfig

    # ELECTRA's generator is the masked LM (ElectraForMaskedLM): embedding_size != hidden_size
    # gives it the embeddings_project layer a real generator has.
    return ElectraConfig(vocab_size=vocab, pad_token_id=ids["pad"], embedding_size=16, max_position_embeddings=MAX_POS,
                         **WIDTH)  # fmt: skip


def _modernbert(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import ModernBertConfig

    return ModernBertConfig(vocab_size=vocab, pad_token_id=ids["pad"], cls_token_id=ids["cls"], sep_token_id=ids["sep"],
                            bos_token_id=ids["cls"], eos_token_id=ids["sep"], max_position_embeddings=MAX_POS,
                            global_attn_every_n_layers=2, local_attention=16, **WIDTH)  # fmt: skip


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("bert", "wordpiece", "bert", True, _cfg("BertConfig", max_position_embeddings=MAX_POS, **WIDTH)),
    Family("bert-cased", "wordpiece_cased", "bert", True,
           _cfg("BertConfig", max_position_embeddings=MAX_POS, **WIDTH)),
    Family("roberta", "bytelevel", "roberta", False, _roberta_like("RobertaConfig")),
    Family("xlm-roberta", "unigram", "roberta", False, _roberta_like("XLMRobertaConfig")),
    Family("deberta-v2", "unigram", "bert", True,
           _cfg("DebertaV2Config", max_position_embeddings=MAX_POS, relative_attention=True,
                position_buckets=32, pos_att_type=["p2c", "c2p"], type_vocab_size=0, **WIDTH)),
    Family("electra", "wordpiece", "bert", True, _electra),
    Family("distilbert", "wordpiece", "bert", False, _distilbert),
    Family("albert", "unigram", "bert", True, _albert),
    Family("mpnet", "wordpiece", "roberta", False, _cfg("MPNetConfig", max_position_embeddings=MAX_POS + 4, **WIDTH)),
    Family("modernbert", "bytelevel", "bert", False, _modernbert),
]}  # fmt: skip



def _xlm(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import XLMConfig

    return XLMConfig(vocab_size=vocab, emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=MAX_POS,
                     pad_token_id=ids["pad"], bos_token_id=ids["cls"], eos_token_id=ids["sep"],
                     unk_index=ids["unk"], mask_token_id=ids["mask"], mask_index=ids["mask"])  # fmt: skip


def _funnel(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import FunnelConfig

    return FunnelConfig(vocab_size=vocab, pad_token_id=ids["pad"], block_sizes=[1, 1], block_repeats=[1, 1],
                        num_decoder_layers=1, d_model=32, n_head=2, d_head=16, d_inner=64)  # fmt: skip


# Layouts the whole-pipeline matrix does not carry, each built to exercise one edge a user's model
# can have: a DeBERTa-v2 whose head takes the embeddings as a second argument (legacy: false), XLM
# (a head that returns a tuple), Funnel (the classifier's encoder is not the masked LM's, and
# its outputs depend on padding), a SentencePiece pre-tokenizer that does not split words.
EDGE_FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("deberta-v2-lm", "unigram", "bert", True,
           _cfg("DebertaV2Config", max_position_embeddings=MAX_POS, relative_attention=True, legacy=False,
                position_buckets=32, pos_att_type=["p2c", "c2p"], type_vocab_size=0, **WIDTH)),
    Family("xlm", "bytelevel", "roberta", False, _xlm),
    Family("funnel", "wordpiece", "bert", True, _funnel),
    Family("xlm-roberta-nosplit", "unigram_nosplit", "roberta", False, _roberta_like("XLMRobertaConfig")),
]}  # fmt: skip

SPECIALS = {
    "bert": {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"},
    "roberta": {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"},
}


def corpus(data_root: Path, limit: int = 3000) -> Iterator[str]:
    """Texts of the shipped domains (both sides of a pair): what a domain tokenizer is trained on."""
    for domain in ("citation_intent", "chemprot"):
        path = data_root / domain / "train.jsonl"
        with path.open() as fh:
            for i, line in enumerate(fh):
                if i >= limit:
                    break
                row = json.loads(line)
                yield str(row.get("text", ""))
                if row.get("text_pair"):
                    yield str(row["text_pair"])


def train_tokenizer(kind: str, specials: dict[str, str], texts: list[str], vocab: int = 800) -> Any:
    """A ``tokenizers.Tokenizer`` of one kind, specials first (ids 0..4 in SPECIALS order)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    order = [specials[k] for k in ("cls", "pad", "sep", "unk", "mask")]
    if kind.startswith("wordpiece"):
        tok = Tokenizer(models.WordPiece(unk_token=specials["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=kind == "wordpiece", strip_accents=None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=order)
    elif kind == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=order,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    elif kind.startswith("unigram"):
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        # split=False: one pre-token per text (word_ids() then says one word per sequence).
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                     split=kind != "unigram_nosplit")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=order, unk_token=specials["unk"])
    else:
        raise ValueError(kind)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _post_processor(tok: Any, specials: dict[str, str], token_types: bool, roberta_pairs: bool) -> Any:
    from tokenizers import processors

    cls, sep = specials["cls"], specials["sep"]
    ids = [(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    if roberta_pairs:  # <s> A </s></s> B </s>
        return processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
                                             special_tokens=ids)  # fmt: skip
    second = ":1" if token_types else ""
    return processors.TemplateProcessing(single=f"{cls}:0 $A:0 {sep}:0",
                                         pair=f"{cls}:0 $A:0 {sep}:0 $B{second} {sep}{second}",
                                         special_tokens=ids)  # fmt: skip


def build(family: str, out: Path, data_root: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` masked LM and its trained tokenizer to ``out``."""
    from transformers import AutoModelForMaskedLM, PreTrainedTokenizerFast

    fam = FAMILIES.get(family) or EDGE_FAMILIES[family]
    specials = SPECIALS[fam.specials]
    tok = train_tokenizer(fam.tokenizer, specials, list(corpus(data_root)))
    tok.post_processor = _post_processor(tok, specials, fam.token_types, fam.specials == "roberta")
    names = ["input_ids", "token_type_ids", "attention_mask"] if fam.token_types else ["input_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_POS, model_input_names=names,
        cls_token=specials["cls"], sep_token=specials["sep"], pad_token=specials["pad"],
        mask_token=specials["mask"], unk_token=specials["unk"],
        bos_token=specials["cls"], eos_token=specials["sep"],
    )  # fmt: skip
    ids = {k: tok.token_to_id(v) for k, v in specials.items()}
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(fam.config(tok.get_vocab_size(), ids))
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":  # python tests/families.py FAMILY OUT_DIR [DATA_ROOT]: one tiny model, for trying
    import sys

    root = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).resolve().parents[2] / "shared" / "data"
    print(build(sys.argv[1], Path(sys.argv[2]), root))
