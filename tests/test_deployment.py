"""A real Prefect server + process worker: deploy from prefect.yaml, trigger, watch, schedules.

Slow (server start, deploy, a flow run in a worker subprocess): `make test-slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import _write_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "prefect")
    return subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _api(env: dict[str, str], path: str, body: dict) -> list | dict:
    import httpx

    r = httpx.post(env["PREFECT_API_URL"] + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def test_server_worker_deploy_trigger_and_schedule(tmp_path, toy_domain, tiny_mlm_dir):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "BENTOML_HOME": str(tmp_path / "bento"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PYTHONUNBUFFERED": "1", "PWD": str(ROOT)}
    exe = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([exe, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    worker = None
    try:
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(env["PREFECT_API_URL"] + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not start")
        assert _prefect(["work-pool", "create", "l3m-process", "--type", "process"], env).returncode == 0
        for name in ("adapt-on-demand", "citation-intent-weekly"):
            dep = _prefect(["--no-prompt", "deploy", "--name", name], env)
            assert dep.returncode == 0, dep.stdout[-2000:] + dep.stderr[-2000:]

        # The schedule creates future runs of the cron deployment (scheduler loop set to 5 s).
        deadline, scheduled = time.time() + 90, []
        while time.time() < deadline and not scheduled:
            time.sleep(3)
            scheduled = _api(env, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                                                        "deployments": {"name": {"any_": ["citation-intent-weekly"]}}})
        assert scheduled, "the cron schedule created no runs"
        assert all(r["expected_start_time"] > r["created"] for r in scheduled)

        worker = subprocess.Popen([exe, "worker", "start", "--pool", "l3m-process", "--limit", "1"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        cfg = _write_config(tmp_path, toy_domain, tiny_mlm_dir, seeds=[1])
        run = _prefect(["deployment", "run", "adapt-domain/adapt-on-demand", "--param", f"config={cfg}",
                        "--watch", "--watch-timeout", "420"], env, timeout=480)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
        summary = json.loads((tmp_path / "out" / "pipeline.json").read_text())
        assert summary["registered"]["tag"].startswith("l3m-toy:")

        # The next scheduled run after the data changed (same deployment, same parameters, as a
        # cron run would be): it validates the new data, retrains and registers a new version.
        with (Path(toy_domain.root) / "toy" / "train.jsonl").open("a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps({"text": f"new row {i} good great", "label": "pos"}) + "\n" for i in range(6)))
        again = _prefect(["deployment", "run", "adapt-domain/adapt-on-demand", "--param", f"config={cfg}",
                          "--watch", "--watch-timeout", "420"], env, timeout=480)
        assert again.returncode == 0 and "Completed" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
        rerun = json.loads((tmp_path / "out" / "pipeline.json").read_text())
        assert rerun["validation"]["cached"] is False and not any(r["reused"] for r in rerun["runs"])
        assert rerun["scoring"]["texts_scored"] == 6
        assert rerun["registered"]["tag"] != summary["registered"]["tag"]
        assert rerun["registered"]["data_fingerprint"] == rerun["validation"]["fingerprint"]
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, 2)  # the worker ignores SIGTERM; SIGINT stops it
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
        shutil.rmtree(tmp_path / "prefect", ignore_errors=True)
    assert yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
