"""Resident memory and store bytes for 1, 4 and 16 domains in one process, against one full model
per domain (issue #25).

``--prepare DIR``: trains one short weight_mask and one lora STL run on citation_intent with the
shared MiniLM and registers, per tuner, 16 domains into the store ``DIR``: the real one and 15
synthetic ones (a weight_mask domain's masks redrawn with another seed at each layer's density;
a lora domain's adapters with seeded noise added), all over the one stored base. Each row is then
its own process, so the allocator's history of one row does not reach the next:

    python -m bench.domain_scaling --prepare /tmp/scale --steps 8
    python -m bench.domain_scaling --store /tmp/scale --tuner weight_mask --n 16   # one row
    python -m bench.domain_scaling --store /tmp/scale --tuner weight_mask --n 4 --full  # merged copies
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import psutil
import torch

N_DOMAINS = 16


def _redraw(path: Path, seed: int) -> None:
    """Rewrite a domain file's masks (another seed, same density) or its adapters (seeded noise)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from l3m.tuning.packing import pack_mask, unpack_mask

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    shapes = json.loads(metadata.get("l3m", "{}")).get("shapes", {})
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(path))
    for key, value in tensors.items():
        if key.startswith("mask/"):
            shape = shapes[key.removeprefix("mask/")]
            density = unpack_mask(value, shape).float().mean()
            tensors[key] = pack_mask(torch.rand(shape, generator=g) < density)
        elif key.startswith("adapter/"):
            tensors[key] = value + 0.01 * torch.randn(value.shape, generator=g)
    save_file(tensors, str(path), metadata=metadata)


def _as_domain(src: Path, out: Path, domain: str) -> Path:
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("model*.safetensors"))  # no merged copy
    meta = json.loads((out / "l3m.json").read_text())
    meta["domain"] = domain
    (out / "l3m.json").write_text(json.dumps(meta))
    return out


def prepare(store: Path, steps: int) -> None:
    from bench.domain_storage import ROOT
    from l3m.config import MaskingSpec, TunerSpec, load_config
    from l3m.data.loading import load_domain
    from l3m.train import TrainInputs, train_one
    from l3m.tuning.trained import tuner_of

    os.environ["BENTOML_HOME"] = str(store / "bentoml")
    from serving import registry

    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      [f"training.max_steps={steps}", "training.batch_size=8", "model.max_length=64",
                       f"output_dir={store / 'runs'}"])
    inputs = TrainInputs(load_domain(cfg.domain))
    for kind in ("weight_mask", "lora"):
        rec = train_one(cfg, MaskingSpec(kind="none"), TunerSpec(kind=kind), seed=1, inputs=inputs,
                        out_dir=store / "runs" / kind)
        for i in range(N_DOMAINS):
            d = _as_domain(Path(rec.model_dir), store / "domains" / f"{kind}_{i}", f"{kind}_{i:02d}")
            if i:
                _redraw(d / str(tuner_of(json.loads((d / "l3m.json").read_text())).domain_file), seed=i)
            res = registry.register(d)
            if not res.promoted:
                registry.promote(res.tag, force=True)


def row(store: Path, tuner: str, n: int, full: bool) -> dict[str, Any]:
    os.environ["BENTOML_HOME"] = str(store / "bentoml")
    from serving import registry
    from serving.bases import read_ref, stored_bytes
    from serving.domains import DomainSet
    from serving.model_io import load_classifier, predict

    torch.set_num_threads(1)
    names = [f"{tuner}_{i:02d}" for i in range(n)]
    proc = psutil.Process()
    before = proc.memory_info().rss
    tags = [registry.production_tag(d) or "" for d in names]
    paths = [registry.model_path(t) for t in tags]
    if full:  # one merged classifier per domain: what serving N domains cost before
        loaded = [load_classifier(p) for p in paths]
        own = sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m, _, _ in loaded)
    else:
        domains = DomainSet(names, registry.model_path, registry.model_path)
        domains.refresh(force=True)
        loaded = [(s.model, s.tokenizer, s.meta) for s in domains.served.values()]
        own = domains.pool.bytes() + sum(s.owned_bytes for s in domains.served.values())
    for model, tok, meta in loaded:  # a request per domain: every weight page touched, as when serving
        predict(model, tok, meta, ["We build on the method of Smith et al."])
    rss = proc.memory_info().rss - before
    ref = read_ref(paths[0])
    base = stored_bytes(registry.model_path(ref.tag)) if ref else 0
    # Full rows load merged copies of compact entries: their store bytes are bench.domain_storage's full entry.
    store = None if full else base + sum(stored_bytes(p) for p in paths)
    return {"tuner": tuner, "domains": n, "full_copies": full, "rss_growth": rss, "tensor_bytes": own,
            "store_bytes": store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepare", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--tuner", choices=["weight_mask", "lora"], default="weight_mask")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.steps)
    elif args.store:
        print(json.dumps(row(args.store, args.tuner, args.n, args.full)))
    else:
        parser.error("--prepare DIR or --store DIR")


if __name__ == "__main__":
    main()
