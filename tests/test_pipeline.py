"""The adapt-domain pipeline end to end (tiny model, toy domain): outputs, and kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _write_config(tmp_path: Path, toy_domain, tiny_mlm_dir: Path, seeds: list[int]) -> Path:
    cfg = {
        "domain": toy_domain(),
        "model": {"name_or_path": str(tiny_mlm_dir), "max_length": 32},
        "scoring": {"mode": "exact", "shard_size": 30},
        "strategies": [{"kind": "none"}, {"kind": "random"}, {"kind": "l3"}],
        "training": {"seeds": seeds, "epochs": 2, "batch_size": 16, "lr": 1e-3},
        "output_dir": str(tmp_path / "out"),
        "scoring_store": None,
    }
    cfg.pop("scoring_store")
    cfg["scoring"]["store_dir"] = str(tmp_path / "scores")
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _env(tmp_path: Path) -> dict[str, str]:
    # One PREFECT_HOME for both runs: the validation cache lives in its result storage.
    return {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "BENTOML_HOME": str(tmp_path / "bento"),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(cfg: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n"):])


def test_killed_run_resumes_without_redoing_validation_scoring_or_finished_runs(tmp_path, toy_domain, tiny_mlm_dir):
    cfg = _write_config(tmp_path, toy_domain, tiny_mlm_dir, seeds=[1, 2])
    env = _env(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Kill the whole process group as soon as the first training run has finished.
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*/*/seed*/run.json")):
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent for p in out.glob("*/*/seed*/run.json")}
    assert finished_before and not (out / "pipeline.json").exists()
    mtimes = {p: (p / "run.json").stat().st_mtime for p in finished_before}

    second = _run(cfg, env)
    assert second.returncode == 0, second.stderr[-3000:]
    s = _summary(second.stdout)
    assert s["validation"]["cached"] is True
    assert s["scoring"]["texts_scored"] == 0 and s["scoring"]["texts_from_store"] == 90
    assert s["scoring"]["tokens_scored"] == 0
    for p, m in mtimes.items():  # finished runs reused, not retrained
        assert (p / "run.json").stat().st_mtime == m
    assert len(list(out.glob("*/*/seed*/run.json"))) == 6
    assert s["registered"]["stage"] == "production" and s["registered"]["tag"].startswith("l3m-toy:")
    assert Path(s["results"]["md"]).exists() and Path(s["tokenview"]).exists()
    assert json.loads((out / "pipeline.json").read_text())["registered"]["tag"] == s["registered"]["tag"]

    # A third run with nothing new: every step reused, and no new registry version.
    third = _summary(_run(cfg, env).stdout)
    assert third["registered"]["tag"] == s["registered"]["tag"]
