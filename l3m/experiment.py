"""Strategies x tuners x seeds on one domain, and the paper-style results table.

Layout under the output directory (``cfg.resolved_output_dir()``):
    runs/<strategy>-<tuner>-seed<k>-<run id>/{identity.json, run.json, report.md, model/}
    experiments/<domain>-<experiment id>/{results.md, results.csv, results.png, experiment.json,
                                          tokenview.html}
    selective/                                              stored Selective Masking picks

A run's directory is named by the hash of everything that determines it (``l3m.identity``):
a finished run is reused and an interrupted one resumed only by a run of identical settings,
data and scores. An experiment is its set of runs; its table aggregates exactly those. Vanilla
scores are read from (or written once to) the score store before any training, and only for
the train rows some run trains on.

CLI (also what the Prefect flow ``train`` calls piecewise):
    python -m l3m.experiment domains/citation_intent.yaml strategies='[{kind: none}, {kind: l3}]'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from l3m.comparisons import compare_all
from l3m.config import MaskingSpec, RunConfig, TunerSpec, load_config
from l3m.data.loading import LoadedDomain, encode_kwargs, load_domain
from l3m.data.snapshot import load_snapshot
from l3m.distributed import barrier, from_rank_zero, process_group, rank, world_size
from l3m.evaluate import majority_baseline
from l3m.identity import RunKey, digest, experiment_dir, experiment_id, run_dir_state, run_key, write_identity
from l3m.inputs import (
    current_score_key,
    l3_rates,
    needed_train_rows,
    needs_scores,
    prepare_inputs,
    train_items,
    write_token_view,
)
from l3m.locking import exclusive
from l3m.results import write_results
from l3m.train import RUN_RECORD, RunRecord, TrainInputs, train_one

# Re-exported: the flows and benches use them through this module.
__all__ = ["RunKey", "TrainInputs", "load_domain", "needed_train_rows", "needs_scores", "plan_runs",
           "prepare_inputs", "run_experiment", "run_planned", "tabulate", "train_items", "write_token_view"]

Log = Callable[[str], None]


def _spec(cfg: RunConfig, kind: str) -> MaskingSpec:
    return next(s for s in cfg.strategies if s.kind == kind)


def _tuner(cfg: RunConfig, kind: str) -> TunerSpec:
    return next(t for t in cfg.tuners if t.kind == kind)


def plan_runs(cfg: RunConfig, data_fingerprint: str) -> list[tuple[RunKey, dict[str, Any]]]:
    """Every planned run with its identity, in table order (strategy, tuner, seed)."""
    score_key = current_score_key(cfg)
    return [run_key(cfg, s, t, seed, data_fingerprint, score_key)
            for s in cfg.strategies for t in cfg.tuners for seed in cfg.training.seeds]


def _rater_key(cfg: RunConfig, data_fingerprint: str) -> RunKey:
    """Selective Masking's rater: the STL run of the first tuner and seed (the same identity)."""
    return run_key(cfg, MaskingSpec(kind="none"), cfg.tuners[0], cfg.training.seeds[0], data_fingerprint, None)[0]


def selective_masks(cfg: RunConfig, inputs: TrainInputs, out_dir: Path, log: Log = print) -> list[np.ndarray]:
    """Gu et al.'s selection over the train rows runs use, rated by this config's STL classifier."""
    import torch
    from transformers import AutoTokenizer

    from l3m.masking.selective import SelectiveStore, compute_selective_masks
    from l3m.tuning import load_trained

    spec = _spec(cfg, "selective")
    rater = _rater_key(cfg, inputs.data_fingerprint)
    rec = run_planned(cfg, rater, TrainInputs(inputs.loaded, data_fingerprint=inputs.data_fingerprint), out_dir, log)
    items = train_items(inputs.loaded)
    rows = needed_train_rows(cfg, len(items))
    store = SelectiveStore(out_dir / "selective")
    key = store.key(f"{rater.run_id}:{digest(rows)}", inputs.loaded.fingerprint, spec.rate, spec.delta,
                    cfg.model.max_length)

    def compute() -> list[np.ndarray]:
        tok = AutoTokenizer.from_pretrained(rec.model_dir)
        model = load_trained(rec.model_dir)  # a lora rater has no full weights: rebuilt over its base
        encs = [dict(tok(*items[i], **encode_kwargs(cfg.model.max_length))) for i in rows]
        labels = list(inputs.loaded.dataset["train"]["label"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log(f"selective: {len(encs)} texts, prefix evaluations batched on {device}")
        return compute_selective_masks(model, tok, encs, [labels[i] for i in rows], rate=spec.rate,
                                       delta=spec.delta, device=device)

    picked = store.get_or_compute(key, compute, expected=len(rows))
    masks: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(items)  # never read: not trained on
    for i, m in zip(rows, picked, strict=True):
        masks[i] = m
    return masks


def run_planned(cfg: RunConfig, key: RunKey, inputs: TrainInputs, out_dir: Path, log: Log = print) -> RunRecord:
    """Train (or reuse, or resume) one planned run in its identity-named directory.

    Two processes sharing the output root (two workers running the same config) take turns: the
    run's lock file makes the second wait and then reuse what the first trained. Under torchrun
    the ranks train one run together: rank 0 takes the lock and decides for all of them (a lock per
    rank would deadlock them), the others follow its decision (``l3m.distributed``).
    """
    run_dir = key.path(out_dir)
    lock = run_dir.with_name(run_dir.name + ".lock")
    if world_size() > 1:
        process_group()
        with exclusive(lock) if rank() == 0 else contextlib.nullcontext():
            return _run_unlocked(cfg, key, inputs, out_dir, log)
    with exclusive(lock):
        return _run_unlocked(cfg, key, inputs, out_dir, log)


def _run_unlocked(cfg: RunConfig, key: RunKey, inputs: TrainInputs, out_dir: Path, log: Log) -> RunRecord:
    run_dir = key.path(out_dir)
    state = from_rank_zero(run_dir_state(run_dir, key.run_id))  # what identity.json says, not the name
    if state == "finished":
        log(f"run {key.name}: finished before with identical settings, data and scores: reused")
        return RunRecord.load(run_dir / RUN_RECORD)
    if state == "foreign" and rank() == 0:
        aside = run_dir.with_name(f"{run_dir.name}.foreign-{int(time.time())}")
        log(f"run {key.name}: its directory holds another run's files (identity.json differs or is missing): "
            f"moved to {aside.name}, training anew")
        run_dir.rename(aside)
    if key.strategy == "selective" and inputs.selective_mask is None:
        inputs.selective_mask = selective_masks(cfg, inputs, out_dir, log)
    ident = run_identity_of(cfg, key, inputs)
    if rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_identity(run_dir, ident)
    barrier()
    log(f"run {key.name}")
    return train_one(cfg, _masking(cfg, key.strategy), _tuner(cfg, key.tuner), key.seed, inputs, run_dir,
                     run_id=key.run_id)


def _masking(cfg: RunConfig, kind: str) -> MaskingSpec:
    # STL has no masking: its spec's other fields mean nothing (and must not split identities).
    return MaskingSpec(kind="none") if kind == "none" else _spec(cfg, kind)


def run_identity_of(cfg: RunConfig, key: RunKey, inputs: TrainInputs) -> dict[str, Any]:
    from l3m.identity import run_identity

    ident = run_identity(cfg, _masking(cfg, key.strategy), _tuner(cfg, key.tuner), key.seed,
                         inputs.data_fingerprint, current_score_key(cfg))
    if digest(ident) != key.run_id:  # the plan and the inputs disagree: refuse rather than mislabel
        raise RuntimeError(f"run {key.name}: identity changed between planning and training")
    return ident


def experiment_settings(cfg: RunConfig, loaded: LoadedDomain, train_rows_used: int) -> list[str]:
    """The lines the results table opens with: what its numbers belong to."""
    t, m = cfg.training, cfg.model
    sizes = ", ".join(f"{k} {v.num_rows}" for k, v in loaded.dataset.items())
    budget = f"max_steps {t.max_steps}" if t.max_steps > 0 else f"epochs {t.epochs:g}"
    head_lr = f"head lr {t.head_lr:g}" if t.head_lr is not None else "head lr = lr"
    evals = f"dev every {t.eval_steps} steps" if t.eval_steps else "dev every epoch"
    weighting = (f"weighting fixed (mlm_weight {t.mlm_weight:g})" if cfg.weighting.kind == "fixed"
                 else f"weighting {cfg.weighting.kind} (meta_lr {cfg.weighting.meta_lr:g})")
    stage2 = (f"stage 2: {t.stage2.epochs} epochs at lr {t.stage2.lr:g}, patience {t.stage2.patience}"
              if t.stage2 else "stage 2: off")
    lines = [f"model `{m.name_or_path}`, max_length {m.max_length}, head {m.head}",
             f"splits: {sizes} rows (train rows used per run: {train_rows_used})",
             f"training: {budget}, batch {t.batch_size} x accumulation {t.grad_accum}, lr {t.lr:g}, {head_lr}, "
             f"{evals}, patience {t.early_stopping_patience}, seeds {t.seeds}",
             f"{weighting}; MLM batch {t.mlm_batch}; {stage2}",
             f"scores: {cfg.scoring.metric}, {cfg.scoring.mode}" + (f" k={cfg.scoring.stride}" if cfg.scoring.mode == "strided" else ""),
             f"data snapshot {loaded.fingerprint}"]
    lines += [f"data note: {n}" for n in loaded.notes]
    return lines


def baseline_of(loaded: LoadedDomain) -> dict[str, Any]:
    ds = loaded.dataset
    base = majority_baseline(ds["train"]["label"], {s: ds[s]["label"] for s in ("dev", "test")},
                             len(loaded.label_names))
    base["name"] = loaded.label_names[base["label"]]
    return base


def tabulate(cfg: RunConfig, inputs: TrainInputs, keys: list[RunKey]) -> dict[str, Path]:
    """The experiment's results table and ``experiment.json`` (its runs, settings, baseline and the
    pairwise comparisons of its strategies and of its tuners on the domain metric)."""
    out_dir = cfg.resolved_output_dir()
    exp_dir = experiment_dir(cfg, keys)
    loaded = inputs.loaded
    n_train = loaded.dataset["train"].num_rows
    used = min(n_train, cfg.training.train_limit or n_train)
    header = experiment_settings(cfg, loaded, used)
    baseline = baseline_of(loaded)
    run_dirs = [k.path(out_dir) for k in keys]
    comparisons = compare_all(run_dirs, cfg.domain.metric, loaded.label_names)
    paths = write_results(exp_dir, run_dirs, title=f"{cfg.domain.name} ({cfg.model.name_or_path})",
                          header=header, baseline=baseline, metric=cfg.domain.metric,
                          label_names=loaded.label_names, comparisons=comparisons)
    record = {"experiment_id": experiment_id(keys), "domain": cfg.domain.name, "settings": header,
              "runs": [k.name for k in keys], "baseline": baseline, "comparisons": comparisons,
              "splits": {k: v.num_rows for k, v in loaded.dataset.items()}, "train_rows_used": used,
              "config": cfg.model_dump(mode="json")}
    paths["json"] = exp_dir / "experiment.json"
    paths["json"].write_text(json.dumps(record, indent=2, default=str))
    return paths


def run_experiment(cfg: RunConfig, log: Log = print, loaded: LoadedDomain | None = None) -> dict[str, Path]:
    """Everything in one process: score once, train every planned run, write the table.

    Under ``torchrun`` every rank runs this; only rank 0 writes the token view and the table (the
    runs' files are rank 0's too, see ``l3m.train``), the other ranks return nothing.
    """
    lead = int(os.environ.get("RANK", "0")) == 0
    inputs = prepare_inputs(cfg, loaded, log=log)
    keys = [k for k, _ in plan_runs(cfg, inputs.data_fingerprint)]
    outputs = {}
    if lead and (view := write_token_view(cfg, inputs, experiment_dir(cfg, keys))) is not None:
        outputs["tokenview"] = view
    for key in keys:
        rec = run_planned(cfg, key, inputs, cfg.resolved_output_dir(), log)
        log(f"  test acc {100 * rec.metrics['test']['accuracy']:.2f} macro-F1 {100 * rec.metrics['test']['macro_f1']:.2f}")
    if lead:
        outputs.update(tabulate(cfg, inputs, keys))
    return outputs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m l3m.experiment", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value (YAML values)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="score the train texts into the store and write the token view, train nothing")
    ap.add_argument("--snapshot", help="a validated data snapshot directory to read instead of the raw files")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    loaded = load_snapshot(a.snapshot) if a.snapshot else None
    if a.prepare_only:
        inputs = prepare_inputs(cfg, loaded)
        exp_dir = experiment_dir(cfg, [k for k, _ in plan_runs(cfg, inputs.data_fingerprint)])
        print(f"tokenview: {write_token_view(cfg, inputs, exp_dir)}")
        if inputs.token_logp is not None:
            rates = l3_rates([a for a in inputs.token_logp if a is not None], _spec(cfg, "l3").rate)
            (exp_dir / "l3_rates.json").write_text(json.dumps(rates, indent=2))
            print(f"l3 rates: {rates}")
        return
    paths = run_experiment(cfg, loaded=loaded)
    if "md" not in paths:  # a torchrun rank other than 0: rank 0 prints the table
        return
    print(Path(paths["md"]).read_text())
    for k, p in paths.items():
        print(f"{k}: {p}")


if __name__ == "__main__":
    main()
