"""Multi-process training: ``l3m train --nproc 2`` (torchrun, HF Trainer DDP, gloo on CPU).

Slow (a torchrun launch of two processes plus a one-process reference): `make test-slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _config(tmp_path: Path, toy_domain, tiny_mlm_dir: Path) -> Path:
    # 60 train rows in global batches of 10 (5 per rank over two processes): 6 steps an epoch, so
    # no rank pads its share with repeated rows. L3 draws its MLM texts on their own (the
    # independent MLM batch), which must be rank-distinct and the one-process draws.
    cfg = {"domain": toy_domain(), "model": {"name_or_path": str(tiny_mlm_dir), "max_length": 32},
           "scoring": {"mode": "exact", "store_dir": str(tmp_path / "scores")},
           "strategies": [{"kind": "none"}, {"kind": "l3", "rate": 0.3}],
           "training": {"seeds": [1], "epochs": 2, "batch_size": 10, "lr": 1e-3, "warmup_ratio": 0.25,
                        "mlm_batch": "independent"},
           "output_dir": str(tmp_path / "ddp")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _runs(out: Path) -> dict[str, dict]:
    return {p.parent.name.split("-")[0]: json.loads(p.read_text()) for p in out.glob("runs/*/run.json")}


def test_torchrun_two_processes_train_the_one_process_run(tmp_path, toy_domain, tiny_mlm_dir):
    cfg = _config(tmp_path, toy_domain, tiny_mlm_dir)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run([sys.executable, "-m", "flows.cli", "train", str(cfg), "--nproc", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]

    runs = _runs(tmp_path / "ddp")
    assert set(runs) == {"none", "l3"}
    for rec in runs.values():
        # Metrics once, on the whole dev and test splits (15 rows each), not on a rank's share.
        assert rec["metrics"]["dev"]["n"] == 15 and rec["metrics"]["test"]["n"] == 15
        meta = json.loads((Path(rec["model_dir"]) / "l3m.json").read_text())
        assert meta["metrics"]["dev"]["n"] == 15
        for split in ("dev", "test"):
            lines = (Path(rec["model_dir"]) / "predictions" / f"{split}.jsonl").read_text().splitlines()
            assert len(lines) == 15
        assert not (Path(rec["model_dir"]).parent / "checkpoints").exists()
    tables = list((tmp_path / "ddp").glob("experiments/*/results.md"))
    assert len(tables) == 1

    # The same runs in one process on the same snapshot: every example masked alike.
    snapshot = next((tmp_path / "ddp" / "snapshots").glob("toy-*"))
    single = subprocess.run([sys.executable, "-m", "l3m.experiment", str(cfg), f"output_dir={tmp_path / 'one'}",
                             "--snapshot", str(snapshot)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = _runs(tmp_path / "one")
    for kind in ("none", "l3"):
        two, ref = runs[kind], one[kind]
        assert two["run_id"] == ref["run_id"]  # the same training, so the same identity
        assert (two["processes"], ref["processes"]) == (2, 1)
        # The same optimizer steps on the same examples (each step's examples, in any rank) ...
        assert two["global_steps"] == ref["global_steps"] == 12
        assert two["examples"] == ref["examples"] and ref["examples"]["count"] == 120
        # ... with warmup on that step count: 25% of 12, not of a rank's share.
        assert two["warmup_steps"] == ref["warmup_steps"] == 3
    # The masks and the independently drawn MLM texts summed over both ranks are the one process's.
    for k in ("content_tokens", "selected_tokens", "expected_rate"):
        assert runs["l3"]["masking"][k] == pytest.approx(one["l3"]["masking"][k], rel=1e-9), k
    assert runs["l3"]["masking"]["selected_tokens"] > 0
