"""The GPU check's driver (``bench/gpu_check.sh run`` starts it): the parts in order, each in its
own process session, under one deadline; resumable.

* Everything goes under ``--work`` (default ``.bench/gpu_check``): ``state.json`` (what each part
  did, over all attempts), ``parts/<part>.json`` (a part's own result), ``logs/``, the runs, and
  ``summary.json`` + ``summary.md``. The work folder is not ``$OUT`` because the device tool
  empties ``$OUT`` before every command and brings back at most 8 files; with ``$OUT`` set, the
  summary and a small ``logs.tar.gz`` are copied there after every part.
* ``DEADLINE`` (seconds since ``bench/gpu_check.sh`` started): a part is started only if its
  minimum fits in what is left; it runs until its own cap or the deadline, whichever is first;
  at the deadline its whole process session is stopped (TERM, then KILL), the summary says
  "stopped at deadline", and the check exits 3.
* A rerun skips parts that finished ("done"), and reruns the others; the paper table resumes
  from its finished runs and checkpoints (bench/paper_table.sh reuses runs by identity).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.gpu_parts import collect_paper  # noqa: E402  (after the path insert: run as a script)

RESERVE_S = 25  # kept back at the deadline for stopping a part and writing the summary
CPU_SLOWDOWN = 3  # caps are sized for the GPU; a CPU dry run's parts take longer


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    cap_s: float | None  # None: everything that is left (the paper table)
    min_s: float  # not started with less than this left


PARTS = [
    Part("setup", "versions, carried wheels, the fp32 model", 120, 10),
    Part("tests", "pytest tests/test_gpu.py -m gpu", 180, 30),
    Part("scoring_exact", "exact PLL in bf16: tokens/s, % of the bf16 matmul peak", 150, 20),
    Part("scoring_strided", "strided PLL (k=4, 8) in bf16: tokens/s, Spearman vs exact", 90, 15),
    Part("serving", "classifier forward in bf16: batched vs batch 1", 120, 15),
    Part("train", "L3 + META-TARTAN + stage 2 in bf16, a short run", 240, 30),
    Part("paper_table", "PARALLEL=1 bench/paper_table.sh, authors' full budget", None, 30),
]


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_state(work: Path) -> dict[str, Any]:
    path = work / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {"parts": {}, "attempts": []}


def save_state(work: Path, state: dict[str, Any]) -> None:
    tmp = work / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(work / "state.json")


def stop_session(sid: int, grace_s: float = 8) -> None:
    """TERM, then KILL, every process of the session the part was started in (the paper table's
    processes sit in their own process groups under ``timeout``, but in this session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        t_end = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < t_end:
            time.sleep(0.5)
        if not session_pids(sid):
            return


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies excluded: the part's own process stays one
    until ``wait`` reaps it, and waiting for it to vanish would only burn the grace period)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z" and os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                continue
    return pids


def run_part(part: Part, args: argparse.Namespace, timeout: float, log: Path) -> tuple[str, float]:
    """Run one part in a new session; (status, seconds). The part writes parts/<name>.json."""
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_parts.py"), part.name, "--work", str(args.work),
           "--carry", str(args.carry)] + (["--small"] if args.small else [])
    env = os.environ | {"PART_DEADLINE": str(int(timeout))}
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_session(proc.pid)
            proc.wait()
            return "timeout", time.monotonic() - t0
        stop_session(proc.pid, grace_s=5)  # anything a finished part left behind
    return ("done" if code == 0 else "failed"), time.monotonic() - t0


def part_result(work: Path, name: str) -> dict[str, Any]:
    path = work / "parts" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check(args: argparse.Namespace) -> int:
    work: Path = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    start = float(os.environ.get("GPU_CHECK_START") or time.time())
    deadline = start + args.deadline
    state = load_state(work)
    attempt: dict[str, Any] = {"started": now_utc(), "deadline_s": args.deadline, "small": args.small,
                               "skipped_done": [], "ran": [], "stopped_at_deadline": False}
    state["attempts"].append(attempt)
    selected = [p for p in PARTS if not args.only or p.name in args.only]
    for part in selected:
        rec = state["parts"].setdefault(part.name, {"attempts": 0})
        if rec.get("status") == "done" and not args.force:
            attempt["skipped_done"].append(part.name)
            print(f"[gpu_check] {part.name}: done before, skipped", flush=True)
            continue
        left = deadline - time.time() - RESERVE_S
        if left < part.min_s:
            rec["status"] = "not started: deadline"
            attempt["stopped_at_deadline"] = True
            print(f"[gpu_check] {part.name}: not started, {left:.0f} s left of the deadline", flush=True)
            break
        cap = None if part.cap_s is None else part.cap_s * (CPU_SLOWDOWN if args.cpu else 1)
        timeout = left if cap is None else min(cap, left)
        print(f"[gpu_check] {part.name}: {part.what} (up to {timeout:.0f} s)", flush=True)
        (work / "parts" / f"{part.name}.json").unlink(missing_ok=True)
        status, secs = run_part(part, args, timeout, work / "logs" / f"{part.name}.log")
        if status == "timeout":
            status = "stopped at deadline" if cap is None or timeout < cap else f"timed out (cap {cap:.0f} s)"
        res = part_result(work, part.name)
        if part.name == "paper_table" and status != "done":
            res = {"result": collect_paper(work / "paper")} | {k: v for k, v in res.items() if k != "result"}
        rec.update(status=status, seconds=round(secs, 1), attempts=rec["attempts"] + 1, finished=now_utc(),
                   result=res.get("result"), error=res.get("error"))
        attempt["ran"].append({"part": part.name, "status": status, "seconds": round(secs, 1)})
        print(f"[gpu_check] {part.name}: {status} in {secs:.0f} s", flush=True)
        save_state(work, state)
        write_summary(work, state, args)
        if status == "stopped at deadline":
            attempt["stopped_at_deadline"] = True
            break
    attempt["ended"] = now_utc()
    save_state(work, state)
    summary = write_summary(work, state, args)
    print((work / "summary.md").read_text(), flush=True)
    if attempt["stopped_at_deadline"]:
        return 3
    return 0 if all(summary["parts"][p.name].get("status") == "done" for p in selected) else 1


def write_summary(work: Path, state: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    parts = {p.name: state["parts"].get(p.name, {"status": "not started"}) for p in PARTS}
    summary = {"written": now_utc(), "work": str(work), "small": args.small, "cpu": args.cpu,
               "complete": all("status" in v and not v["status"].startswith("not") for v in parts.values()),
               "all_done": all(v.get("status") == "done" for v in parts.values()),
               "parts": parts, "attempts": state["attempts"]}
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (work / "summary.md").write_text(markdown(summary))
    copy_out(work)
    return summary


def copy_out(work: Path) -> None:
    """Into $OUT (the device tool's return folder): at most 8 files come back, so three."""
    out = os.environ.get("OUT")
    if not out:
        return
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md"):
        (dst / name).write_bytes((work / name).read_bytes())
    with tarfile.open(dst / "logs.tar.gz", "w:gz") as tar:
        for f in [*work.glob("logs/*"), *work.glob("parts/*.json"), work / "state.json", work / "gpu-tests.xml",
                  *work.glob("paper/logs/*"), *work.glob("paper/*/experiments/*/results.md"),
                  *work.glob("train/*/runs/*/report.md")]:
            if f.is_file() and f.stat().st_size < 2**20:
                tar.add(f, arcname=str(f.relative_to(work)))


# --------------------------------------------------------------------------- the summary's markdown
def markdown(s: dict[str, Any]) -> str:
    size = "SMALL (dry-run sizes)" if s["small"] else "full size"
    lines = [f"# GPU check ({size}, {'CPU: no CUDA' if s['cpu'] else 'CUDA'}), {s['written']}", "",
             f"Attempts: {len(s['attempts'])}; " + "; ".join(
                 f"#{i + 1} {a['started']}: ran {[r['part'] + ' ' + r['status'] for r in a['ran']]}"
                 f"{', skipped (done before) ' + str(a['skipped_done']) if a['skipped_done'] else ''}"
                 f"{', STOPPED AT DEADLINE' if a['stopped_at_deadline'] else ''}"
                 for i, a in enumerate(s["attempts"])), "",
             "| part | status | seconds | headline |", "| --- | --- | ---: | --- |"]
    for name, rec in s["parts"].items():
        lines.append(f"| {name} | {rec.get('status')} | {rec.get('seconds', '-')} | "
                     f"{headline(name, rec.get('result') or {}, rec.get('error'))} |")
    return "\n".join(lines) + "\n"


def headline(name: str, r: dict[str, Any], error: str | None) -> str:
    try:
        return _headline(name, r, error)
    except (KeyError, TypeError, ValueError):  # a result of another shape (an older check): raw
        return json.dumps(r, default=str)[:200]


def _headline(name: str, r: dict[str, Any], error: str | None) -> str:
    if error and not r:
        return f"error: {error}"[:200]
    if not r:
        return "-"
    if name == "setup":
        return (f"{r.get('device')}, torch {r.get('torch')}, pydantic {r.get('packages', {}).get('pydantic')}, "
                f"datasets {r.get('packages', {}).get('datasets')}")
    if name == "tests":
        passed = r["tests"] - r["failures"] - r["errors"] - r["skipped"]
        why = {c["status"] for c in r.get("cases", []) if c["status"] != "passed"}
        return f"{passed} passed, {r['skipped']} skipped, {r['failures'] + r['errors']} failed {sorted(why)}"[:300]
    if name == "scoring_exact":
        v = r.get("vs_float32_same_device", {})
        vs = (f"vs fp32: Spearman {v['spearman_pooled']:.4f}, max |diff| {v['max_abs_diff']:.3f}"
              if isinstance(v, dict) else f"vs fp32 {v}")
        return (f"{r['tokens_per_s']:.0f} tokens/s ({r['compute_dtype']}, budget {r['best_token_budget']}), "
                f"{r['pct_of_matmul_peak']:.2f}% of the matmul peak {r['matmul_peak']['tflops_best']:.3g} TFLOP/s "
                f"({r['matmul_peak']['shape']}); {vs}")
    if name == "scoring_strided":
        return "; ".join(f"k={x['stride']}: {x['tokens_per_s']:.0f} tokens/s ({x['speedup_vs_exact']}x exact), "
                         f"Spearman vs exact {x['vs_exact_bf16']['spearman_pooled']:.4f}" for x in r["runs"])
    if name == "serving":
        return (f"{r['dtype']} on {r['device']}: batch 1 {r['batch_1']['texts_per_s']} texts/s; batch 64 "
                f"{r['batched_over_batch_1']}x (chunk 512), {r['batched_chunk_8192_over_batch_1']}x (chunk 8192); "
                f"labels = fp32 {r['labels_equal_to_float32']}")
    if name == "train":
        weights = ", ".join(f"{k.removeprefix('weight_')} {v:.3f}" for k, v in r["final_task_weights"].items())
        return (f"finished: {r['stage1_steps']} stage-1 + {r['stage2_steps']} stage-2 steps, {r['steps_per_s']} "
                f"steps/s (median step), {r['precision']}, kept {r['kept']}, last task weights {weights}")
    if name == "paper_table":
        return (f"{r.get('finished_runs')} runs finished, {r.get('interrupted_runs')} interrupted (resumable), "
                f"{len(r.get('tables', []))} tables")
    return json.dumps(r)[:200]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".bench" / "gpu_check"))
    ap.add_argument("--carry", default=str(ROOT / ".bench" / "gpu_carry"))
    ap.add_argument("--deadline", type=float, default=float(os.environ.get("DEADLINE", "540")))
    ap.add_argument("--only", nargs="*", choices=[p.name for p in PARTS], help="run just these parts")
    ap.add_argument("--force", action="store_true", default=os.environ.get("FORCE") == "1",
                    help="rerun parts that finished before")
    args = ap.parse_args()
    args.work, args.carry = Path(args.work).resolve(), Path(args.carry).resolve()
    import torch  # after argument parsing: --help needs no torch

    args.cpu = not torch.cuda.is_available()
    small = os.environ.get("SMALL")
    args.small = small == "1" if small in ("0", "1") else args.cpu  # no CUDA: the dry run's sizes
    sys.exit(check(args))


if __name__ == "__main__":
    main()
