"""Resident bytes of many domains in one process: each domain's own tensors over one base.

Trains one short STL run per compact tuner (weight_mask, lora) on citation_intent with the shared
MiniLM, registers both into a fresh store, loads them the way the multi-domain service does
(``serving.domains.DomainSet``) and reports the base's resident bytes once, each domain's own
resident bytes, the merged classifier's bytes for comparison, the process RSS before and after
loading, and the stored offline test predictions replayed through each shared-base domain.

    python -m bench.domain_memory [--steps 8] [--out FILE]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil

from bench.domain_storage import served_vs_offline, setup, write_report
from l3m.config import MaskingSpec, TunerSpec
from l3m.train import train_one

TUNERS = [TunerSpec(kind="weight_mask"), TunerSpec(kind="lora")]


def main() -> None:
    args, work, cfg, inputs = setup(__doc__ or "", "l3m-domain-memory-")
    from serving import registry
    from serving.domains import DomainSet
    from serving.model_io import load_classifier

    for spec in TUNERS:
        rec = train_one(cfg, MaskingSpec(kind="none"), spec, seed=1, inputs=inputs, out_dir=work / "runs" / spec.kind)
        data = json.loads((Path(rec.model_dir) / "l3m.json").read_text())
        data["domain"] = f"{cfg.domain.name}_{spec.kind}"  # two domains of the registry, one per tuner
        (Path(rec.model_dir) / "l3m.json").write_text(json.dumps(data))
        res = registry.register(rec.model_dir)
        if not res.promoted:
            registry.promote(res.tag, force=True)
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    domains = DomainSet(None, registry.model_path, registry.model_path)
    domains.refresh(force=True)
    rss_after = proc.memory_info().rss
    merged = load_classifier(next(iter(domains.served.values())).path)[0]
    merged_bytes = sum(t.numel() * t.element_size() for t in [*merged.parameters(), *merged.buffers()])
    report: dict[str, Any] = {
        "base_resident_bytes": domains.pool.bytes(), "merged_classifier_bytes": merged_bytes,
        "rss_before_load": rss_before, "rss_after_load": rss_after,
        "domains": {d: {"tag": s.tag, "tuner": s.meta.tuner, "own_resident_bytes": s.owned_bytes,
                        "served_vs_offline": served_vs_offline(s.path, (s.model, s.tokenizer, s.meta))}
                    for d, s in domains.served.items()},
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
