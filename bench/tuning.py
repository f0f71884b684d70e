"""Training memory and step time per tuner (full / child_f / child_d / weight_mask).

Each tuner runs in its own process (so peak RSS is its own) on the real shared model: the
multi-task model (classifier + MLM head, random 15% MLM masking: the same cost as L3), real
citation_intent texts, a transformers Trainer wired as l3m.train wires it (prepare, callbacks,
optimizer groups). Reported per tuner: median optimizer-step time, peak RSS and its growth over
the loaded model, trainable parameters, optimizer-state bytes, the one-off preparation time
(child_d's Fisher pass, extrapolated to the whole train split) and the exported sizes.

    python bench/tuning.py [--steps 10] [--batch-size 16] [--fisher-examples 128] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from l3m.config import DEFAULT_SHARED, MaskingSpec, TunerSpec
from l3m.masking import MaskingCollator, build_masking
from l3m.modeling import build_multitask_model
from l3m.train import StepTimer
from l3m.tuning import build_tuner, registered_tuners

MB = 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup(a: argparse.Namespace) -> tuple[list[str], list[dict], MaskingCollator, int]:
    """Labels, encoded training rows (enough for warmup + steps), the MLM collator, train size."""
    # On a shared, oversubscribed CPU, intra-op threads spin-wait on descheduled siblings: a
    # 2-thread matmul measured 12x *slower* than 1 thread here. One thread gives stable numbers.
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    labels = sorted({r["label"] for r in rows})
    feats = [{**tok(r["text"], truncation=True, max_length=a.max_length), "label": labels.index(r["label"])}
             for r in rows[: a.batch_size * (a.steps + a.warmup)]]
    collator = MaskingCollator(tok, build_masking(MaskingSpec(kind="random", rate=0.15)), seed=0)
    return labels, feats, collator, len(rows)


def one(kind: str, a: argparse.Namespace) -> dict:
    labels, feats, collator, n_train = setup(a)
    model = build_multitask_model(a.model, labels, with_mlm=True)
    rss_model = rss_mb()

    fisher_rows = feats[: a.fisher_examples]

    def fisher_batches():
        return (collator([dict(f) for f in fisher_rows[i : i + a.batch_size]])
                for i in range(0, len(fisher_rows), a.batch_size))

    tuner = build_tuner(TunerSpec(kind=kind))
    t0 = time.perf_counter()
    model = tuner.prepare(model, fisher_batches)
    prepare_s = time.perf_counter() - t0
    peak_prepare = peak_mb()

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=a.steps + a.warmup,
                             per_device_train_batch_size=a.batch_size, learning_rate=5e-5, weight_decay=0.01,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=True, seed=0, remove_unused_columns=False, dataloader_num_workers=0)
    groups = tuner.optimizer_param_groups(model, 5e-5, 0.01)
    optimizer = torch.optim.AdamW(groups, lr=5e-5) if groups else None
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=collator,
                      optimizers=(optimizer, None), callbacks=[timer, *tuner.callbacks()])
    trainer.train()
    peak_train = peak_mb()
    opt_state = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
    with tempfile.TemporaryDirectory() as out:
        sizes = tuner.export(model, Path(out))
    result = {
        "tuner": kind,
        "median_step_s": round(statistics.median(timer.times[a.warmup:]), 3),
        "rss_model_mb": round(rss_model), "peak_rss_mb": round(peak_train),
        "peak_over_model_mb": round(peak_train - rss_model), "peak_after_prepare_mb": round(peak_prepare),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_mb": round(opt_state / MB, 1), "prepare_s": round(prepare_s, 2), "sizes": sizes,
    }
    if kind == "child_d":
        result["fisher_s_per_example"] = round(prepare_s / len(fisher_rows), 4)
        result["fisher_s_full_train_est"] = round(prepare_s / len(fisher_rows) * n_train, 1)
        result["child_fraction"] = round(tuner.child_fraction, 4)
        from l3m.tuning.child_d import estimate_fisher

        child = tuner.child_masks()
        params = [p for n, p in model.named_parameters() if n in child]
        t0 = time.perf_counter()
        estimate_fisher(model, params, fisher_batches(), per_example=False)
        result["fisher_batch_mode_s_per_example"] = round((time.perf_counter() - t0) / len(fisher_rows), 4)
    return result


def interleaved(a: argparse.Namespace, kinds: list[str]) -> dict[str, dict[str, float]]:
    """Step time of all tuners in one process, steps interleaved so machine load hits each alike.

    A step here is what the Trainer does per optimizer step: forward + backward, clipping, the
    tuner's callbacks around AdamW. ``hooks`` is the time inside the callbacks alone.
    """
    labels, feats, collator, _ = setup(a)
    batches = [collator([dict(f) for f in feats[i : i + a.batch_size]]) for i in range(0, len(feats), a.batch_size)]
    runs = {}
    for kind in kinds:
        model = build_multitask_model(a.model, labels, with_mlm=True).train()
        tuner = build_tuner(TunerSpec(kind=kind))
        model = tuner.prepare(model, lambda: iter(batches[:1]))
        groups = tuner.optimizer_param_groups(model, 5e-5, 0.01)
        opt = torch.optim.AdamW(groups or [p for p in model.parameters() if p.requires_grad], lr=5e-5)
        runs[kind] = (model, opt, tuner.callbacks())
    steps: dict[str, list[float]] = {k: [] for k in kinds}
    hooks: dict[str, list[float]] = {k: [] for k in kinds}
    for i, batch in enumerate(batches):
        for kind, (model, opt, callbacks) in runs.items():
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            h0 = time.perf_counter()
            for cb in callbacks:
                cb.on_pre_optimizer_step(None, None, None, model=model)
            h = time.perf_counter() - h0
            opt.step()
            h0 = time.perf_counter()
            for cb in callbacks:
                cb.on_optimizer_step(None, None, None, model=model)
            h += time.perf_counter() - h0
            opt.zero_grad(set_to_none=True)
            if i >= a.warmup:
                steps[kind].append(time.perf_counter() - t0)
                hooks[kind].append(h)
    return {k: {"median_step_s": round(statistics.median(steps[k]), 3),
                "median_hooks_ms": round(1000 * statistics.median(hooks[k]), 1)} for k in kinds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_SHARED / "models" / "minilm-l6-mlm"))
    ap.add_argument("--data", default=str(DEFAULT_SHARED / "data" / "citation_intent" / "train.jsonl"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--fisher-examples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tuners", default=",".join(registered_tuners()))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-interleaved", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    results = []
    for kind in a.tuners.split(","):
        cmd = [sys.executable, __file__, "--one", kind] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
            if k not in ("one", "out", "tuners", "skip_interleaved")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    timing = {} if a.skip_interleaved else interleaved(a, a.tuners.split(","))
    for r in results:
        r["interleaved"] = timing.get(r["tuner"], {})
    meta = {"device": f"cpu ({a.threads} thread(s), load average {os.getloadavg()[0]:.1f})", "model": Path(a.model).name,
            "batch_size": a.batch_size, "max_length": a.max_length, "steps": a.steps}
    print("\n| tuner | step, interleaved (s) | hooks (ms) | step, own Trainer run (s) | peak RSS (MB) | "
          "over model (MB) | trainable params | optimizer state (MB) | prepare (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r["interleaved"]
        print(f"| {r['tuner']} | {t.get('median_step_s', '-')} | {t.get('median_hooks_ms', '-')} | "
              f"{r['median_step_s']} | {r['peak_rss_mb']} | {r['peak_over_model_mb']} | "
              f"{r['trainable_params']:,} | {r['optimizer_state_mb']} | {r['prepare_s']} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
