"""Stored bytes per domain: a weight_mask / lora domain over the shared base vs a full model copy.

Trains one STL run per tuner on citation_intent with the shared MiniLM (a short budget: the bytes
do not depend on it), registers each into a fresh BentoML store, and reports per store entry its
bytes by file, the shared base's bytes, and the merged classifier's weights for comparison. It
also replays the stored offline test predictions through ``load_classifier`` of each store entry
(rebuilt over the stored base) and counts label disagreements.

    python -m bench.domain_storage [--steps 8] [--out FILE]   # -m: bench/serving.py would shadow the package
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from l3m.config import MaskingSpec, TunerSpec, load_config
from l3m.data.loading import load_domain
from l3m.evaluate import read_predictions
from l3m.train import TrainInputs, train_one

ROOT = Path(__file__).resolve().parent.parent
TUNERS = [TunerSpec(kind="full"), TunerSpec(kind="weight_mask"), TunerSpec(kind="lora")]


def entry_bytes(path: Path) -> dict[str, int]:
    """Bytes of a store entry grouped: the weights part, tokenizer, predictions, the rest."""
    groups = {"weights": 0, "tokenizer": 0, "predictions": 0, "metadata": 0}
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        size = f.stat().st_size
        if f.suffix == ".safetensors":
            groups["weights"] += size
        elif "predictions" in f.parts:
            groups["predictions"] += size
        elif f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            groups["tokenizer"] += size
        else:
            groups["metadata"] += size
    return groups | {"total": sum(groups.values())}


def served_vs_offline(path: Path, loaded: tuple[Any, Any, Any] | None = None) -> dict[str, Any]:
    """The store entry's stored offline test predictions replayed through ``loaded`` (model,
    tokenizer, meta; default: ``load_classifier`` of the entry)."""
    from serving.model_io import load_classifier, predict

    model, tok, meta = loaded or load_classifier(path)
    offline = read_predictions(path / "predictions" / "test.jsonl")
    served = predict(model, tok, meta, [o["text"] for o in offline])
    mismatches = sum(o["label"] != s["label"] for o, s in zip(offline, served, strict=True))
    diff = max(abs(p - s["probabilities"][k]) for o, s in zip(offline, served, strict=True)
               for k, p in o["probabilities"].items())
    return {"n": len(offline), "label_mismatches": mismatches, "max_prob_diff": diff}


def setup(doc: str, prefix: str) -> tuple[argparse.Namespace, Path, Any, TrainInputs]:
    """A bench's arguments, a fresh work dir whose store is ``BENTOML_HOME``, the demo config on
    citation_intent at ``--steps`` and its loaded data."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      [f"training.max_steps={args.steps}", "training.batch_size=8", "model.max_length=64",
                       f"output_dir={work / 'runs'}"])
    return args, work, cfg, TrainInputs(load_domain(cfg.domain))


def write_report(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text)


def main() -> None:
    args, work, cfg, inputs = setup(__doc__ or "", "l3m-domain-storage-")
    from serving import registry
    from serving.bases import BASE_NAME, read_ref

    rows: dict[str, Any] = {}
    for spec in TUNERS:
        rec = train_one(cfg, MaskingSpec(kind="none"), spec, seed=1, inputs=inputs, out_dir=work / "runs" / spec.kind)
        res = registry.register(rec.model_dir)
        stored = registry.model_path(res.tag)
        rows[spec.kind] = {"run_dir": entry_bytes(Path(rec.model_dir)), "store_entry": entry_bytes(stored),
                           "export": json.loads((Path(rec.model_dir) / "l3m.json").read_text())["export"],
                           "served_vs_offline": served_vs_offline(stored), "base": str(read_ref(stored))}
    bases = [m for m in registry._store().list() if m.tag.name == BASE_NAME]
    report = {"bases": {str(m.tag): entry_bytes(Path(m.path)) for m in bases}, "domains": rows}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
