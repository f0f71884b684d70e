"""Benchmark: l3m's PLL engine vs minicons on the same texts and model, in one run.

    .venv/bin/python bench/scoring.py                      # CPU: minicons + l3m, 100 texts
    .venv/bin/python bench/scoring.py --no-minicons --device cuda --model .bench/model  # GPU

minicons 0.3.39 needs transformers 4.x, so it runs in a bench-only venv this script creates
(``.bench/minicons-venv``: minicons==0.3.39, transformers==4.57.6, torch==2.13.0) as a
subprocess. Each l3m configuration runs in its own subprocess too, so peak memory (max RSS;
CUDA max allocated on GPU) is per configuration. Reported per configuration: tokens/s (best of
``--repeats``, model load excluded, as for minicons), per-token parity with minicons, Spearman
vs l3m exact fp32 (pooled over tokens and mean within text), useful GFLOP/s and its fraction of
the matmul peak measured in the run (best of ``a @ b`` and the engine's oneDNN GEMM path; see
bench/scoring_flops.py). The report records the CPU model and ISA: the speedup depends on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "minilm-l6-mlm"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
VENV = ROOT / ".bench" / "minicons-venv"
MINICONS_PINS = ["minicons==0.3.39", "transformers==4.57.6", "torch==2.13.0"]
# (name, metric, mode, stride, dtype, packed)
CONFIGS = [
    ("exact fp32", "within_word_l2r", "exact", 4, "float32", True),
    ("exact bf16", "within_word_l2r", "exact", 4, "bfloat16", True),
    ("strided k=4 fp32", "within_word_l2r", "strided", 4, "float32", True),
    ("strided k=4 bf16", "within_word_l2r", "strided", 4, "bfloat16", True),
    ("strided k=8 bf16", "within_word_l2r", "strided", 8, "bfloat16", True),
    ("exact fp32, library forward", "within_word_l2r", "exact", 4, "float32", False),
    ("exact fp32 original", "original", "exact", 4, "float32", True),
]


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {VENV} ({' '.join(MINICONS_PINS)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *MINICONS_PINS], check=True)
    return py


def cpu_info() -> dict[str, object]:
    """CPU model and the ISA extensions that decide which GEMM kernels run (the speedup over
    minicons depends on them: see docs/benchmarks.md)."""
    info: dict[str, object] = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    info["model"] = fields.get("model name", "")
    flags = fields.get("flags", "").split()
    info["isa"] = sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    return info


def load_texts(data: Path, domain: str, split: str, n: int, offset: int = 0) -> list[str]:
    rows = [
        json.loads(line) for line in open(data / domain / f"{split}.jsonl", encoding="utf-8") if line.strip()
    ]
    return [r["text"] for r in rows[offset : offset + n]]


def run_minicons(
    model: str,
    texts: list[str],
    metrics: list[str],
    repeats: int,
    threads: int | None,
    cpu_clock: bool = False,
) -> dict:
    py = ensure_venv()
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        cfg = {
            "model": model,
            "texts": texts,
            "metrics": metrics,
            "per_call": 1,
            "repeats": repeats,
            "threads": threads,
        }
        inp.write_text(json.dumps(cfg))
        subprocess.run([str(py), str(ROOT / "bench" / "scoring_minicons.py"), str(inp), str(out)], check=True)
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- l3m worker
def worker(cfg: dict) -> dict:
    import torch

    from bench.scoring_flops import Dims, executed_flops_packed, matmul_peak, useful_flops
    from l3m.scoring import PLLScorer, make_plan

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    scorer = PLLScorer(cfg["model"], dtype=cfg["dtype"], device=cfg["device"], packed=cfg["packed"])
    kw = {
        "metric": cfg["metric"],
        "mode": cfg["mode"],
        "stride": cfg["stride"],
        "token_budget": cfg["budget"],
    }
    encs = scorer.encode(cfg["texts"], cfg["max_length"])
    scorer.score_encoded(encs[:4], **kw)  # warm-up: allocator, kernels, autotuning
    cuda = scorer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # The matmul peaks again, right before timing: on a shared machine the load changes during
    # a run, and the fraction of peak is only meaningful against a peak taken nearby.
    peaks = {
        str(dt).split(".")[-1]: matmul_peak(
            scorer.device, dt, seconds=1.5, cpu_clock=bool(cfg.get("cpu_clock"))
        )
        for dt in (torch.float32, torch.bfloat16)
    }
    clock = time.process_time if cfg.get("cpu_clock") else time.perf_counter
    best, scores = float("inf"), []
    for _ in range(cfg["repeats"]):
        t0 = clock()
        scores = scorer.score_encoded(encs, **kw)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    plans = [make_plan(e, cfg["metric"], cfg["mode"], cfg["stride"]) for e in encs]
    copies = [(e.length, int((t >= 0).sum())) for e, p in zip(encs, plans, strict=True) for t in p.targets]
    dims = Dims.of(scorer.model.config)
    useful = useful_flops(dims, copies)
    executed = (
        executed_flops_packed(dims, copies, [e.length for e in encs]) if scorer.packed is not None else None
    )
    n_tokens = sum(int(np.isfinite(s).sum()) for s in scores)
    return {
        "seconds": best,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / best,
        "useful_gflops": useful / best / 1e9,
        "executed_gflops": executed / best / 1e9 if executed else None,
        "useful_over_executed": useful / executed if executed else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20) if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mem_kind": "CUDA max allocated" if cuda else "max RSS",
        "scores": [s.tolist() for s in scores],
        "peaks": peaks,
        "device": str(scorer.device),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def run_worker(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(cfg))
        subprocess.run([sys.executable, __file__, "--worker", str(inp), str(out)], check=True, cwd=ROOT)
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- comparison
def _finite(scores: list[list[float]]) -> list[np.ndarray]:
    out = []
    for s in scores:
        a = np.asarray(s, dtype=np.float64)
        out.append(a[np.isfinite(a)])
    return out


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    from scipy.stats import spearmanr

    flat_a, flat_b = np.concatenate(a), np.concatenate(b)
    within = [spearmanr(x, y)[0] for x, y in zip(a, b, strict=True) if x.shape[0] > 2]
    return {
        "max_abs_diff": float(np.abs(flat_a - flat_b).max()),
        "spearman_pooled": float(spearmanr(flat_a, flat_b)[0]),
        "spearman_within_text": float(np.nanmean(within)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--domain", default="citation_intent")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=512)  # minicons does not truncate
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--configs", default="all", help="comma-separated indices into CONFIGS, or all")
    ap.add_argument("--no-minicons", action="store_true")
    ap.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time with process CPU time (use with --threads 1 on a shared, busy machine)",
    )
    ap.add_argument("--minicons-metrics", default="within_word_l2r,original")
    ap.add_argument("--texts-json", help="read the texts from this JSON list instead of the data dir")
    ap.add_argument(
        "--reference", help="JSON list of per-text scores (e.g. CPU fp32) to check exact fp32 against"
    )
    ap.add_argument("--save-scores", help="write the exact fp32 scores (JSON list per text) here")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "scoring.json"))
    args = ap.parse_args()
    if args.worker:
        cfg = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(worker(cfg)))
        return

    import torch

    from bench.scoring_flops import matmul_peak

    texts = (
        json.load(open(args.texts_json))
        if args.texts_json
        else load_texts(Path(args.data), args.domain, args.split, args.n)
    )
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report: dict = {"texts": len(texts), "device": args.device, "clock": "process CPU time" if args.cpu_clock else "wall", "host": platform.node(), "cpu": cpu_info(), "load_before": load,
                    "threads": torch.get_num_threads(), "budget": args.budget}  # fmt: skip
    report["peak_fp32"] = matmul_peak(device, torch.float32, cpu_clock=args.cpu_clock)
    report["peak_bf16"] = matmul_peak(device, torch.bfloat16, cpu_clock=args.cpu_clock)
    print(
        f"matmul peak fp32 {report['peak_fp32']['gflops']:.0f} GFLOP/s, bf16 {report['peak_bf16']['gflops']:.0f}",
        flush=True,
    )

    mc = None
    if not args.no_minicons:
        metrics = [m for m in args.minicons_metrics.split(",") if m]
        mc = run_minicons(args.model, texts, metrics, 1, args.threads, args.cpu_clock)
        for m, r in mc["results"].items():
            r["tokens_per_s"] = r["n_tokens"] / min(r["seconds"])
            print(
                f"minicons {m}: {r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        report["minicons"] = {m: {k: v for k, v in r.items() if k not in ("scores", "tokens")}
                              for m, r in mc["results"].items()} | {"versions": mc["versions"]}  # fmt: skip

    chosen = CONFIGS if args.configs == "all" else [CONFIGS[int(i)] for i in args.configs.split(",")]
    exact_ref: dict[str, list[np.ndarray]] = {}
    report["l3m"] = {}
    for name, metric, mode, stride, dtype, packed in chosen:
        cfg = {"model": args.model, "texts": texts, "metric": metric, "mode": mode, "stride": stride, "dtype": dtype,
               "packed": packed, "device": args.device, "budget": args.budget, "max_length": args.max_length,
               "repeats": args.repeats if mode == "strided" or dtype != "float32" else max(1, args.repeats - 1),
               "threads": args.threads, "cpu_clock": args.cpu_clock}  # fmt: skip
        r = run_worker(cfg) | {"dtype": dtype}
        raw = r.pop("scores")
        ours = _finite(raw)
        if mode == "exact" and dtype == "float32" and packed:
            exact_ref[metric] = ours
            if args.save_scores and metric == "within_word_l2r":
                Path(args.save_scores).write_text(json.dumps(raw))
            if args.reference and metric == "within_word_l2r":
                r["vs_reference"] = compare(_finite(json.load(open(args.reference))), ours)
        if metric in exact_ref:
            r["vs_exact_fp32"] = compare(exact_ref[metric], ours)
        if mc is not None and metric in mc["results"]:
            r["vs_minicons"] = compare(_finite(mc["results"][metric]["scores"]), ours)
            r["speedup_vs_minicons"] = r["tokens_per_s"] / mc["results"][metric]["tokens_per_s"]
        report["l3m"][name] = r
        print(f"l3m {name}: {r['tokens_per_s']:.1f} tokens/s", flush=True)
    # The machine's peak = the best matmul rate seen anywhere in this run (start, every worker).
    for dt in ("float32", "bfloat16"):
        key = _peak_key(dt)
        seen = [report[key]["gflops"]] + [r["peaks"][dt]["gflops"] for r in report["l3m"].values()]
        report[key]["gflops_start"] = report[key]["gflops"]
        report[key]["gflops"] = max(seen)
    for name, r in report["l3m"].items():
        r["useful_frac_fp32_peak"] = r["useful_gflops"] / report["peak_fp32"]["gflops"]
        r["useful_frac_bf16_peak"] = r["useful_gflops"] / report["peak_bf16"]["gflops"]
        r["useful_frac_fp32_peak_nearby"] = r["useful_gflops"] / r["peaks"]["float32"]["gflops"]
        if r.get("executed_gflops"):
            peak = report[_peak_key(r["dtype"])]["gflops"]
            r["executed_frac_peak"] = r["executed_gflops"] / peak  # of its own dtype's peak: <= 100%
        print(summary_line(name, r), flush=True)
    report["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))


def _peak_key(dtype: str) -> str:
    """The report's peak for a configuration's dtype (low precision runs on the bf16 GEMMs)."""
    return "peak_fp32" if dtype == "float32" else "peak_bf16"


def _pct(frac: float | None) -> str:
    return "-" if frac is None else f"{100 * frac:.0f}%"


def summary_line(name: str, r: dict) -> str:
    extra = ""
    if "speedup_vs_minicons" in r:
        extra += f" {r['speedup_vs_minicons']:.1f}x minicons, |diff| {r['vs_minicons']['max_abs_diff']:.1e}"
    if "vs_exact_fp32" in r:
        extra += f" spearman {r['vs_exact_fp32']['spearman_pooled']:.4f}/{r['vs_exact_fp32']['spearman_within_text']:.4f}"
    return (f"l3m {name}: {r['tokens_per_s']:.1f} tokens/s, useful {r['useful_gflops']:.0f} GFLOP/s "
            f"({100 * r['useful_frac_fp32_peak']:.0f}% fp32 peak of the run, "
            f"{100 * r['useful_frac_fp32_peak_nearby']:.0f}% of the peak measured just before; executed "
            f"{_pct(r.get('executed_frac_peak'))} of its dtype's peak), mem {r['peak_mem_mb']:.0f} MB{extra}")  # fmt: skip


def markdown(report: dict) -> str:
    rows = ["| engine / mode | tokens/s | x minicons | max abs diff vs minicons | Spearman vs exact (pooled / within text) "
            "| useful GFLOP/s | % fp32 peak | % bf16 peak | executed, % of own dtype's peak | peak mem (MB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for m, r in (report.get("minicons") or {}).items():
        if m == "versions":
            continue
        rows.append(f"| minicons token_score, {m}, 1 text/call | {r['tokens_per_s']:.1f} | 1.0 | - | - | - | - | - "
                    f"| - | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    for name, r in report["l3m"].items():
        vm, ve = r.get("vs_minicons"), r.get("vs_exact_fp32")
        rows.append(
            f"| l3m {name} | {r['tokens_per_s']:.1f} | {r.get('speedup_vs_minicons', float('nan')):.1f} "
            f"| {vm['max_abs_diff']:.1e} | "
            if vm
            else f"| l3m {name} | {r['tokens_per_s']:.1f} | - | - | "
        )
        rows[-1] += (
            f"{ve['spearman_pooled']:.4f} / {ve['spearman_within_text']:.4f} | " if ve else "- | "
        ) + (
            f"{r['useful_gflops']:.0f} | {100 * r['useful_frac_fp32_peak']:.0f}% | {100 * r['useful_frac_bf16_peak']:.0f}% "
            f"| {_pct(r.get('executed_frac_peak'))} | {r['peak_mem_mb']:.0f} |"
        )
    cpu = report.get("cpu") or {}
    head = (f"{report['texts']} texts, device {report['device']} ({cpu.get('model', '?')}; {' '.join(cpu.get('isa', []))}), {report['clock']} clock, {report['threads']} threads, budget {report['budget']} "
            f"tokens; matmul peak fp32 {report['peak_fp32']['gflops']:.0f} GFLOP/s, bf16 {report['peak_bf16']['gflops']:.0f}; "
            f"load average {report['load_before']:.1f} before, {report['load_after']:.1f} after.")  # fmt: skip
    return head + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
