"""How much of L3's expected masking lands on ChemProt's entity markers, with and without the
authors' MLM text transform (``domain.mlm_text: authors``, l3m/data/transforms.py).

    .venv/bin/python bench/mlm_text_markers.py [--mode strided|exact] [--limit N] [--store DIR]

Scores the ChemProt train texts (the raw standard split, configs/paper/chemprot.raw.yaml) with
the shared MiniLM as shipped and as transformed, maps the scores to L3's selection probabilities
(``paper`` and ``calibrated`` modes, rate 0.15) and reports, per variant: the share of content
tokens that are marker tokens (a token overlapping ``<<``, ``>>``, ``[[`` or ``]]``) and the
share of the expected number of masked tokens that falls on them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from l3m.config import load_config  # noqa: E402
from l3m.data.loading import encode_kwargs, load_domain  # noqa: E402
from l3m.data.transforms import MARKERS, transform_items  # noqa: E402
from l3m.masking.l3 import calibrated_probs, paper_probs, surprisal  # noqa: E402
from l3m.scoring import ScoreStore, score_texts  # noqa: E402

MARKER = re.compile("|".join(map(re.escape, MARKERS)))


def marker_tokens(tokenizer: object, text: str, max_length: int) -> np.ndarray:
    """True for each token (of the scorer's encoding) that overlaps a marker's characters."""
    enc = tokenizer(text, return_offsets_mapping=True, **encode_kwargs(max_length))  # type: ignore[operator]
    spans = [m.span() for m in MARKER.finditer(text)]
    return np.array([e > s and any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]])


def shares(logps: list[np.ndarray], markers: list[np.ndarray], rate: float) -> dict[str, float]:
    tot = {"tokens": 0.0, "marker_tokens": 0.0, "paper": 0.0, "paper_markers": 0.0, "calibrated": 0.0,
           "calibrated_markers": 0.0}
    for lp, mk in zip(logps, markers, strict=True):
        x = torch.from_numpy(np.asarray(lp, dtype=np.float32))[None, :]
        content = torch.isfinite(x)
        s = surprisal(x, content)
        on = torch.from_numpy(mk)[None, :] & content
        tot["tokens"] += float(content.sum())
        tot["marker_tokens"] += float(on.sum())
        for mode, fn in (("paper", paper_probs), ("calibrated", calibrated_probs)):
            p = fn(s, content, rate)
            tot[mode] += float(p.sum())
            tot[f"{mode}_markers"] += float(p[on].sum())
    return {"content_tokens": int(tot["tokens"]), "marker_token_share": tot["marker_tokens"] / tot["tokens"],
            "paper_expected_masked": tot["paper"], "paper_share_on_markers": tot["paper_markers"] / tot["paper"],
            "calibrated_expected_masked": tot["calibrated"],
            "calibrated_share_on_markers": tot["calibrated_markers"] / tot["calibrated"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("exact", "strided"), default="strided")
    ap.add_argument("--limit", type=int, default=None, help="first N train texts only")
    ap.add_argument("--store", default=str(ROOT / ".bench" / "scores"))
    ap.add_argument("--rate", type=float, default=0.15)
    a = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "paper" / "chemprot-minilm.yaml")
    from transformers import AutoTokenizer

    model, max_length = cfg.model.resolved(), cfg.model.max_length
    tok = AutoTokenizer.from_pretrained(model)
    texts = list(load_domain(cfg.domain).dataset["train"]["text"])[: a.limit]
    out: dict[str, object] = {"texts": len(texts), "model": cfg.model.name_or_path, "mode": a.mode, "rate": a.rate}
    store = ScoreStore(Path(a.store))
    for name in ("raw", "authors"):
        items = transform_items(name, [(t, None) for t in texts])
        logps = score_texts(items, model=model, max_length=max_length, mode=a.mode, store=store, dtype="float32")
        markers = [marker_tokens(tok, t, max_length) for t, _ in items]
        out[name] = shares(list(logps), markers, a.rate)
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
