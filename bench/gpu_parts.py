"""The parts of the GPU check; ``bench/gpu_check.py`` runs each as its own process:

    python bench/gpu_parts.py PART --work DIR --carry DIR [--small]

and reads its result from ``DIR/parts/PART.json``. A part imports only what the GPU machine has
(torch, transformers, pandas, numpy, scipy) plus the carried wheels (pydantic, datasets) where
it goes through l3m's training code. ``--small`` is the CPU dry run's size: the same code paths
on a handful of texts and steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL_NAME = "minilm-l6-mlm"
MAX_LENGTH = 128  # the paper profiles' model.max_length
SMALL_TEXTS = 12  # texts the dry run scores (exact PLL on 2 shared CPU cores: ~20-60 tokens/s)
SERVICE_BATCH = 64  # serving's default L3M_MAX_BATCH_SIZE (serving/schemas.py)
DOMAINS = ("citation_intent", "chemprot")
PAPER_CONFIG = ROOT / "configs" / "paper" / "{domain}-minilm.yaml"
# The training part: L3 with META-TARTAN and stage 2 on the paper profile, a short budget.
TRAIN_FULL = ["training.max_steps=120", "training.eval_steps=40", "training.stage2.epochs=2"]
TRAIN_SMALL = ["training.max_steps=2", "training.eval_steps=1", "training.batch_size=8", "training.grad_accum=1",
               "training.train_limit=24", "training.stage2.epochs=1", "weighting.dev_samples=8",
               "weighting.dev_batch_size=8", "weighting.head_iters=2"]
# The paper table in the dry run: citation_intent (chemprot's 2.4k dev / 3.5k test rows take
# minutes per evaluation on 2 CPU cores), one seed, one step (the authors' budget on a GPU).
PAPER_SMALL_BUDGET = ("training.max_steps=1 training.eval_steps=1 training.batch_size=4 training.grad_accum=1 "
                      "training.train_limit=8 training.stage2.epochs=1 weighting.dev_samples=4 "
                      "weighting.dev_batch_size=4 weighting.head_iters=2")


@dataclass(frozen=True)
class Ctx:
    work: Path
    carry: Path
    small: bool

    @property
    def model(self) -> Path:
        return self.work / "shared" / "models" / MODEL_NAME

    def snapshot(self, domain: str) -> Path:
        return self.carry / "snapshots" / domain

    def part_result(self, name: str) -> dict[str, Any]:
        path = self.work / "parts" / f"{name}.json"
        return dict(json.loads(path.read_text()).get("result") or {}) if path.is_file() else {}


def env_for_l3m(ctx: Ctx) -> dict[str, str]:
    """The environment every l3m subprocess of the check gets (the fp32 model under the model root)."""
    return os.environ | {"L3M_MODEL_ROOT": str(ctx.model.parent), "L3M_SHARED": str(ctx.model.parent.parent),
                         "HF_DATASETS_CACHE": str(ctx.work / "hf-datasets"), "PYTHONPATH": _pythonpath()}


def _pythonpath() -> str:
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*parts, str(ROOT)] if str(ROOT) not in parts else parts)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- setup
def part_setup(ctx: Ctx) -> dict[str, Any]:
    """Versions, the device, the carried wheels importing, and the model back in float32."""
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out |= {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()}
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()})"
    out["packages"] = {name: _version(name) for name in ("transformers", "tokenizers", "peft", "accelerate",
                                                         "pandas", "pyarrow", "numpy", "scipy", "sklearn",
                                                         "pydantic", "datasets", "typing_extensions")}
    out["model"] = upcast_model(ctx.carry / "models" / MODEL_NAME, ctx.model)
    # The library's training entry point imports: pydantic (config), datasets (train/snapshot).
    t0 = time.perf_counter()
    import l3m.experiment  # noqa: F401

    out["l3m_import_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError as e:
        return f"missing ({e})"
    where = Path(getattr(mod, "__file__", "") or "").parent
    carried = "carried" if "site" in where.parts and ".bench" in str(where) else "installed"
    return f"{getattr(mod, '__version__', '?')} ({carried})"


def upcast_model(src: Path, dst: Path) -> dict[str, Any]:
    """float16 weights (what travels) -> float32 (what l3m loads: from_pretrained keeps a
    checkpoint's dtype, and training and scoring expect float32 master weights)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").is_file():
        return {"path": str(dst), "reused": True}
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src}: no carried model; run `bench/gpu_check.sh prepare` first")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(dst)  # atomic: a killed setup leaves no half model behind
    return {"path": str(dst), "reused": False, "from": str(src), "dtype": str(torch.float32)}


# --------------------------------------------------------------------------- tests
def part_tests(ctx: Ctx) -> dict[str, Any]:
    """``pytest tests/test_gpu.py -m gpu``: only that file is collected (the others import Prefect,
    BentoML or GX, which the GPU machine lacks)."""
    import xml.etree.ElementTree as ET

    junit = ctx.work / "gpu-tests.xml"
    env = env_for_l3m(ctx) | {"L3M_OUTPUT_ROOT": str(ctx.work / "tests-runs")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           "tests/test_gpu.py", f"--junitxml={junit}", "-rs"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in suite.iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = f"{child.tag}: {(child.get('message') or '')[:200]}"
        cases.append({"name": case.get("name"), "status": status, "seconds": float(case.get("time", 0))})
    out = {"exit_code": proc.returncode, **counts, "cases": cases}
    if proc.returncode not in (0, 5) or counts["failures"] or counts["errors"]:
        raise PartFailed(f"gpu tests failed ({counts})", out)
    return out


class PartFailed(RuntimeError):
    """A part that ran and found a problem: its result is still written."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- scoring
def load_items(ctx: Ctx, domains: tuple[str, ...], splits: tuple[str, ...], limit: int | None
               ) -> list[tuple[str, str | None]]:
    """(text, text_pair) rows of the carried snapshots: pandas only, no datasets import."""
    import pandas as pd

    items: list[tuple[str, str | None]] = []
    for d in domains:
        for s in splits:
            frame = pd.read_parquet(ctx.snapshot(d) / f"{s}.parquet")
            pairs = frame["text_pair"] if "text_pair" in frame else [None] * len(frame)
            items += list(zip(frame["text"], pairs, strict=True))
    return items[:limit] if limit else items


def matmul_peak(seconds: float = 2.0, dtype: Any = None) -> dict[str, Any]:
    """The device's matmul rate in the scoring's compute dtype (bf16 on a GPU), measured here:
    8192^3 products timed with CUDA events (a CPU: 1024^3 with the wall clock, in the float32 a
    CPU without a bf16 kernel falls back to). What torch reaches here, not a spec sheet."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = dtype or torch.bfloat16
    n = 8192 if cuda else 1024
    dev = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    rates: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 5:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
        rates.append(2 * n**3 / dt / 1e12)
    return {"shape": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}", "timer": "CUDA events" if cuda else "wall clock",
            "tflops_best": max(rates), "tflops_median": sorted(rates)[len(rates) // 2], "reps": len(rates)}


def _time_scoring(scorer: Any, encs: list[Any], **kw: Any) -> tuple[float, list[Any]]:
    _sync()
    t0 = time.perf_counter()
    scores = scorer.score_encoded(encs, **kw)
    _sync()
    return time.perf_counter() - t0, scores


def _useful_flops(scorer: Any, encs: list[Any], mode: str, stride: int) -> float:
    """Matmul FLOPs any exact scorer must run for these copies (bench/scoring_flops.py's count)."""
    from bench.scoring_flops import Dims, useful_flops
    from l3m.scoring import make_plan

    copies = [(e.length, int((t >= 0).sum())) for e in encs
              for t in make_plan(e, "within_word_l2r", mode, stride).targets]  # type: ignore[arg-type]
    return useful_flops(Dims.of(scorer.model.config), copies)


def _scores_file(ctx: Ctx) -> Path:
    return ctx.work / "exact_bf16_scores.npz"


def part_scoring_exact(ctx: Ctx) -> dict[str, Any]:
    """Exact within_word_l2r PLL in bf16: tokens/s per token budget and the share of the bf16
    matmul peak measured just before; agreement with float32 on the same device."""
    import numpy as np
    import torch

    from l3m.scoring import PLLScorer

    items = load_items(ctx, ("citation_intent",) if ctx.small else DOMAINS, ("train",), SMALL_TEXTS if ctx.small else None)
    budgets = [4096] if ctx.small else [8192, 65536]
    scorer = PLLScorer(str(ctx.model), dtype="bfloat16", device="auto")
    peak = matmul_peak(0.5 if ctx.small else 2.0, scorer.compute_dtype)
    encs = scorer.encode(items, MAX_LENGTH)
    scorer.score_encoded(encs[:8], metric="within_word_l2r")  # warm-up: allocator, kernels
    if scorer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    flops = _useful_flops(scorer, encs, "exact", 4)
    runs, scores = [], []
    for budget in budgets:
        secs, scores = _time_scoring(scorer, encs, metric="within_word_l2r", mode="exact", token_budget=budget)
        tokens = sum(int(np.isfinite(s).sum()) for s in scores)
        runs.append({"token_budget": budget, "seconds": round(secs, 3), "tokens": tokens,
                     "tokens_per_s": round(tokens / secs, 1), "useful_tflops": round(flops / secs / 1e12, 3),
                     "pct_of_matmul_peak": round(100 * flops / secs / 1e12 / peak["tflops_best"], 2)})
    flat = np.concatenate(scores)
    lengths = np.array([len(s) for s in scores])
    np.savez(_scores_file(ctx), scores=flat, lengths=lengths)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    out: dict[str, Any] = {
        "texts": len(items), "max_length": MAX_LENGTH, "device": str(scorer.device),
        "compute_dtype": str(scorer.compute_dtype).removeprefix("torch."),
        "packed_path": getattr(scorer, "packed", None) is not None, "path": getattr(scorer, "path", None), "matmul_peak": peak, "runs": runs,
        "best_token_budget": best["token_budget"], "tokens_per_s": best["tokens_per_s"],
        "pct_of_matmul_peak": best["pct_of_matmul_peak"],
        "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20) if scorer.device.type == "cuda" else None,
    }
    if scorer.compute_dtype == torch.float32:  # a CPU without a bf16 kernel: nothing to compare
        out["vs_float32_same_device"] = "skipped: the scoring ran in float32"
        return out
    ref = PLLScorer(str(ctx.model), dtype="float32", device=str(scorer.device))
    fp32 = ref.score_encoded(encs, metric="within_word_l2r", token_budget=best["token_budget"])
    out["vs_float32_same_device"] = compare(fp32, scores)
    return out


def compare(ref: list[Any], got: list[Any]) -> dict[str, float]:
    """Max / mean |diff| in nats and Spearman (pooled over tokens; mean within text)."""
    import numpy as np
    from scipy.stats import spearmanr

    a = [np.asarray(x, dtype=np.float64) for x in ref]
    b = [np.asarray(x, dtype=np.float64) for x in got]
    fa, fb = np.concatenate(a), np.concatenate(b)
    fin = np.isfinite(fa) & np.isfinite(fb)
    within = [spearmanr(x[np.isfinite(x)], y[np.isfinite(x)])[0] for x, y in zip(a, b, strict=True)
              if np.isfinite(x).sum() > 2]
    return {"max_abs_diff": float(np.abs(fa[fin] - fb[fin]).max()),
            "mean_abs_diff": float(np.abs(fa[fin] - fb[fin]).mean()),
            "spearman_pooled": float(spearmanr(fa[fin], fb[fin])[0]),
            "spearman_within_text": float(np.nanmean(within))}


def part_scoring_strided(ctx: Ctx) -> dict[str, Any]:
    """Strided mode (k = 4 and 8 passes per text) in bf16: tokens/s and Spearman vs exact bf16."""
    import numpy as np

    from l3m.scoring import PLLScorer

    exact_part = ctx.part_result("scoring_exact")
    saved = np.load(_scores_file(ctx))
    exact = np.split(saved["scores"], np.cumsum(saved["lengths"])[:-1])
    items = load_items(ctx, ("citation_intent",) if ctx.small else DOMAINS, ("train",), SMALL_TEXTS if ctx.small else None)
    budget = int(exact_part.get("best_token_budget", 8192))
    peak = float(exact_part.get("matmul_peak", {}).get("tflops_best", 0.0)) or matmul_peak(0.5)["tflops_best"]
    scorer = PLLScorer(str(ctx.model), dtype="bfloat16", device="auto")
    encs = scorer.encode(items, MAX_LENGTH)
    scorer.score_encoded(encs[:8], metric="within_word_l2r", mode="strided")  # warm-up
    runs = []
    for stride in (4, 8):
        secs, scores = _time_scoring(scorer, encs, metric="within_word_l2r", mode="strided", stride=stride,
                                     token_budget=budget)
        tokens = sum(int(np.isfinite(s).sum()) for s in scores)
        flops = _useful_flops(scorer, encs, "strided", stride)
        runs.append({"stride": stride, "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs, 1),
                     "pct_of_matmul_peak": round(100 * flops / secs / 1e12 / peak, 2),
                     "speedup_vs_exact": round(tokens / secs / float(exact_part.get("tokens_per_s") or 1), 2),
                     "vs_exact_bf16": compare(exact, scores)})
    return {"texts": len(items), "token_budget": budget, "device": str(scorer.device), "runs": runs}


# --------------------------------------------------------------------------- serving
def build_classifier(ctx: Ctx, out: Path) -> Path:
    """The base model with a fresh head, as a trained-model directory (speed does not depend on
    the head being trained; bench/serving.py does the same)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    manifest = json.loads((ctx.snapshot("citation_intent") / "manifest.json").read_text())
    labels = list(manifest["label_names"])
    import torch

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(ctx.model), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(ctx.model)).save_pretrained(str(out))
    meta = {"domain": "citation_intent", "label_names": labels, "metric": "macro_f1",
            "metrics": {"dev": {"macro_f1": 0.0}, "test": {"macro_f1": 0.0}}, "strategy": "none", "tuner": "full",
            "base_model": str(ctx.model), "base_revision": None, "max_length": MAX_LENGTH, "text_pair": False}
    (out / "l3m.json").write_text(json.dumps(meta))
    return out


def part_serving(ctx: Ctx) -> dict[str, Any]:
    """The service's forward path without BentoML: ``serving.model_io.predict`` (what the
    service's micro-batcher calls per batch) on the device in bf16 autocast, one text per call
    vs 64-text batches (the service's default max batch), at the service's chunking (512 padded
    tokens per forward) and at 8192. HTTP, the batcher's queue and BentoML are not measured."""
    import torch

    from serving.model_io import CHUNK_TOKENS, load_classifier, predict, serving_dtype

    texts = [t for t, _ in load_items(ctx, ("citation_intent",), ("test", "dev"), None)]
    model_dir = build_classifier(ctx, ctx.work / "serving-model")
    model, tok, meta = load_classifier(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    dtype = serving_dtype("bfloat16", device)
    n1, nb = (16, 32) if ctx.small else (512, 4096)
    batched_texts = (texts * (nb // len(texts) + 1))[:nb]
    predict(model, tok, meta, texts[:SERVICE_BATCH], dtype=dtype)  # warm-up

    def rate(sample: list[str], batch: int, chunk: int) -> dict[str, float]:
        t0 = time.perf_counter()
        for i in range(0, len(sample), batch):
            predict(model, tok, meta, sample[i:i + batch], dtype=dtype, chunk_tokens=chunk)
        secs = time.perf_counter() - t0
        return {"texts": len(sample), "texts_per_s": round(len(sample) / secs, 1),
                "ms_per_text": round(1000 * secs / len(sample), 3)}

    one = rate(texts[:n1], 1, CHUNK_TOKENS)
    service = rate(batched_texts, SERVICE_BATCH, CHUNK_TOKENS)
    wide = rate(batched_texts, SERVICE_BATCH, 8192)
    ref = [p["label"] for p in predict(model, tok, meta, texts)]
    low = [p["label"] for p in predict(model, tok, meta, texts, dtype=dtype)]
    return {"device": device, "dtype": dtype, "batch_1": one, f"batch_{SERVICE_BATCH}_chunk_{CHUNK_TOKENS}": service,
            f"batch_{SERVICE_BATCH}_chunk_8192": wide,
            "batched_over_batch_1": round(service["texts_per_s"] / one["texts_per_s"], 2),
            "batched_chunk_8192_over_batch_1": round(wide["texts_per_s"] / one["texts_per_s"], 2),
            "labels_equal_to_float32": f"{sum(a == b for a, b in zip(ref, low, strict=True))}/{len(texts)}"}


# --------------------------------------------------------------------------- training
def part_train(ctx: Ctx) -> dict[str, Any]:
    """One short L3 run with META-TARTAN weighting and stage 2 through ``python -m
    l3m.experiment`` (the paper profile; bf16 on a bf16-capable GPU, l3m.train._mixed_precision)."""
    import torch

    out_root = ctx.work / "train"
    overrides = ["strategies=[{kind: l3, mode: paper}]", "training.seeds=[1]", "weighting.kind=meta_tartan",
                 *(TRAIN_SMALL if ctx.small else TRAIN_FULL)]
    cmd = [sys.executable, "-m", "l3m.experiment", f"--snapshot={ctx.snapshot('citation_intent')}",
           str(PAPER_CONFIG).format(domain="citation_intent"), *overrides]
    env = env_for_l3m(ctx) | {"L3M_OUTPUT_ROOT": str(out_root)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (ctx.work / "logs").mkdir(exist_ok=True)
    (ctx.work / "logs" / "train-experiment.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise PartFailed(f"l3m.experiment exited {proc.returncode}", {"tail": (proc.stdout + proc.stderr)[-3000:]})
    runs = sorted((out_root / "citation_intent" / "runs").glob("*/run.json"))
    rec = json.loads(runs[-1].read_text())
    weights = runs[-1].parent / "weights.jsonl"
    last = json.loads(weights.read_text().splitlines()[-1]) if weights.is_file() else {}
    step_s = float(rec.get("median_step_seconds") or 0)
    stages = rec.get("stages", {})
    return {"overrides": overrides, "finished": True, "wall_seconds": round(wall, 1),
            "precision": "bf16 autocast" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else "float32 (no CUDA)", "global_steps": rec.get("global_steps"),
            "train_seconds": rec.get("train_seconds"), "median_step_seconds": round(step_s, 4),
            "steps_per_s": round(1 / step_s, 2) if step_s else None,
            "stage1_steps": stages.get("stage1", {}).get("global_steps"),
            "stage2_steps": stages.get("stage2", {}).get("global_steps"), "kept": stages.get("kept"),
            "test": rec.get("metrics", {}).get("test"),
            "final_task_weights": {k: v for k, v in last.items() if k.startswith("weight_")}}


# --------------------------------------------------------------------------- paper table
def part_paper_table(ctx: Ctx) -> dict[str, Any]:
    """``PARALLEL=1 bench/paper_table.sh`` with the shared model at the authors' full budget,
    reading the carried snapshots; the orchestrator gives it the time left (``PART_DEADLINE``)."""
    root = ctx.work / "paper"
    env = env_for_l3m(ctx) | {"PARALLEL": "1", "PY": sys.executable, "SNAPSHOTS": str(ctx.carry / "snapshots"),
                              "DEADLINE": str(max(30, int(float(os.environ.get("PART_DEADLINE", "100000")))))}
    if ctx.small:
        env |= {"DOMAINS": "citation_intent", "SEEDS": "1", "ABLATION_SEEDS": "1", "JOBS": "2",
                "OMP_NUM_THREADS": "1", "BUDGET": PAPER_SMALL_BUDGET}
    proc = subprocess.run(["bash", "bench/paper_table.sh", str(root)], cwd=ROOT, env=env)
    out = collect_paper(root)
    out["exit_code"] = proc.returncode
    if proc.returncode != 0:
        raise PartFailed(f"bench/paper_table.sh exited {proc.returncode}", out)
    return out


def collect_paper(root: Path) -> dict[str, Any]:
    """What the paper table has so far: finished runs, interrupted ones (resumable) and tables."""
    finished, interrupted = [], []
    for run_dir in sorted(root.glob("*/runs/*")):
        if not run_dir.is_dir():
            continue
        rec_path = run_dir / "run.json"
        if rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            test = rec.get("metrics", {}).get("test", {})
            finished.append({"run": f"{run_dir.parent.parent.name}/{run_dir.name}", "weighting": _weighting(run_dir),
                             "steps": rec.get("global_steps"), "train_seconds": rec.get("train_seconds"),
                             "test_macro_f1": test.get("macro_f1"), "test_accuracy": test.get("accuracy"),
                             "kept": rec.get("stages", {}).get("kept")})
        else:
            steps = [int(p.name.split("-")[-1]) for p in run_dir.glob("checkpoints/checkpoint-*")]
            interrupted.append({"run": f"{run_dir.parent.parent.name}/{run_dir.name}", "weighting": _weighting(run_dir),
                                "last_checkpoint_step": max(steps) if steps else None})
    tables = sorted(str(p.relative_to(root)) for p in root.glob("*/experiments/*/results.md"))
    return {"root": str(root), "finished_runs": len(finished), "interrupted_runs": len(interrupted),
            "runs": finished, "interrupted": interrupted, "tables": tables}


def _weighting(run_dir: Path) -> str | None:
    """What tells the ablation's runs apart (their names differ only by the identity hash)."""
    path = run_dir / "identity.json"
    if not path.is_file():
        return None
    ident = json.loads(path.read_text())
    if (ident.get("weighting") or {}).get("kind") == "meta_tartan":
        return "meta_tartan"
    mlm = (ident.get("training") or {}).get("mlm_weight")
    return None if mlm is None else f"fixed {mlm:g}"


PARTS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "setup": part_setup, "tests": part_tests, "scoring_exact": part_scoring_exact,
    "scoring_strided": part_scoring_strided, "serving": part_serving, "train": part_train,
    "paper_table": part_paper_table,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=list(PARTS))
    ap.add_argument("--work", required=True)
    ap.add_argument("--carry", required=True)
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    ctx = Ctx(Path(a.work).resolve(), Path(a.carry).resolve(), a.small)
    (ctx.work / "parts").mkdir(parents=True, exist_ok=True)
    target = ctx.work / "parts" / f"{a.part}.json"
    code = 0
    try:
        result = {"status": "done", "result": PARTS[a.part](ctx)}
    except PartFailed as e:
        result, code = {"status": "failed", "error": str(e), "result": e.result}, 1
    except Exception as e:  # noqa: BLE001  (any error of a part is its result; the check goes on)
        import traceback

        traceback.print_exc()
        result, code = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, 1
    target.write_text(json.dumps(result, indent=1, default=str))
    sys.exit(code)


if __name__ == "__main__":
    main()
