"""Scale-out that runs: Prefect on a real PostgreSQL, two process workers on shared stores, a killed worker.

One PostgreSQL server (Debian's package, started here in a temporary directory as the
``postgres`` user, no Docker) backs one Prefect server; ``prefect.yaml``'s on-demand deployment
runs on two process workers that share the output root, the score store and the BentoML store
(with its ledger), as workers on one shared volume would. Slow: `make test-slow` (which installs
PostgreSQL when it is missing).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.test_deployment import _free_port, _prefect

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PG_USER = "postgres"  # PostgreSQL refuses to run as root; Debian's package creates this user


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found: install it with `make postgres` (apt-get install postgresql)")
    return found


def _as_pg(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    """Run a PostgreSQL command as PG_USER when we are root, as ourselves otherwise."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", PG_USER, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 and a free port; yields the Prefect connection URL."""
    root = Path(tempfile.mkdtemp(prefix="l3m-pg-"))  # not under pytest's root-only tmp dirs
    if os.geteuid() == 0:
        shutil.chown(root, user=PG_USER)
    data, port = root / "data", _free_port()
    init = _as_pg([_pg_bin("initdb"), "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8"])
    assert init.returncode == 0, init.stderr
    start = _as_pg([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start"])
    assert start.returncode == 0, start.stderr + (root / "log").read_text()
    try:
        made = subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        _as_pg([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def _psql(url: str, sql: str) -> str:
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", port, "-U", "prefect", "-d", "prefect", "-Atc", sql],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class Cluster:
    """A Prefect server on PostgreSQL, the deployment, and process workers sharing one volume."""

    def __init__(self, base: Path, db_url: str) -> None:
        self.base, self.db_url, self.port = base, db_url, _free_port()
        self.env = {**os.environ, "PREFECT_HOME": str(base / "prefect"), "BENTOML_HOME": str(base / "bento"),
                    "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": db_url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "L3M_OUTPUT_ROOT": str(base / "out"),
                    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(base / "out" / "prefect-results"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    # Heartbeats every 30 s (the minimum): the crash automation notices a dead run sooner.
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PWD": str(ROOT),
                    "PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}  # bento builds resolve nothing online
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        exe = str(Path(sys.executable).parent / "prefect")
        with log.open("ab") as fh:
            p = subprocess.Popen([exe, *args], cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def start(self) -> None:
        import httpx

        self._spawn(["server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--analytics-off"],
                    self.base / "server.log")
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(self.api("/health"), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not start:\n" + (self.base / "server.log").read_text()[-3000:])
        assert _prefect(["work-pool", "create", "l3m-process", "--type", "process"], self.env).returncode == 0
        dep = _prefect(["--no-prompt", "deploy", "--name", "adapt-on-demand"], self.env)
        assert dep.returncode == 0, dep.stdout[-2000:] + dep.stderr[-2000:]
        auto = yaml.safe_load((ROOT / "infra" / "prefect" / "crashed-flow-runs.yaml").read_text())
        auto["trigger"]["within"] = 75  # above the 30 s heartbeat set in env
        (self.base / "crashed.yaml").write_text(yaml.safe_dump(auto))
        made = _prefect(["automation", "create", "--from-file", str(self.base / "crashed.yaml")], self.env)
        assert made.returncode == 0, made.stdout + made.stderr

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(["worker", "start", "--pool", "l3m-process", "--name", name, "--limit", "1"],
                                         self.base / f"worker-{name}.log")

    def api(self, path: str) -> str:
        return self.env["PREFECT_API_URL"] + path

    def post(self, path: str, body: dict) -> Any:
        import httpx

        r = httpx.post(self.api(path), json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def get(self, path: str) -> Any:
        import httpx

        r = httpx.get(self.api(path), timeout=30)
        r.raise_for_status()
        return r.json()

    def trigger(self, config: Path) -> str:
        dep = self.get("/deployments/name/adapt-domain/adapt-on-demand")
        return self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"config": str(config)}})["id"]

    def wait(self, run_ids: list[str], states: set[str], timeout: float = 600) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            runs = [self.get(f"/flow_runs/{r}") for r in run_ids]
            if all(r["state_type"] in states for r in runs):
                return runs
            if any(r["state_type"] in {"FAILED", "CRASHED", "CANCELLED"} - states for r in runs):
                break
            time.sleep(3)
        logs = "".join((self.base / f).read_text()[-4000:] for f in os.listdir(self.base) if f.startswith("worker-"))
        pytest.fail(f"runs {[(r['name'], r['state_type']) for r in runs]} not in {states}\n{logs}")

    def log_lines(self, run_ids: list[str]) -> list[str]:
        """Every log message of these flow runs, their subflows (the pipeline calls the score and
        train flows) and their tasks, paging through the API's limit."""
        children = self.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": run_ids}}})
        run_ids = run_ids + [r["id"] for r in children]
        lines: list[str] = []
        while True:
            page = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}}, "sort": "TIMESTAMP_ASC",
                                              "offset": len(lines), "limit": 200})
            lines += [entry["message"] for entry in page]
            if len(page) < 200:
                return lines

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)  # the worker ignores SIGTERM; SIGINT stops it
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("scale"), postgres)
    try:
        c.start()
        c.start_worker("w1")
        c.start_worker("w2")
        yield c
    finally:
        c.stop()


def _config(c: Cluster, toy_domain, tiny_mlm_dir: Path, name: str, bento: bool = False) -> Path:
    """A pipeline config with no output paths: the workers' L3M_OUTPUT_ROOT holds every domain's
    outputs (<root>/<domain>/) and the score store (<root>/scores/), as on a shared volume."""
    cfg = {"domain": toy_domain(name=name), "model": {"name_or_path": str(tiny_mlm_dir), "max_length": 32},
           "scoring": {"mode": "exact", "shard_size": 20},
           "strategies": [{"kind": "none"}, {"kind": "l3"}],
           # Enough training for the toy data to beat the majority baseline (else no production).
           "training": {"seeds": [1], "epochs": 6, "batch_size": 16, "lr": 3e-3},
           "registry": {"build_bento": bento}}
    path = c.base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stored_keys(store: Path) -> list[str]:
    keys: list[str] = []
    for part in store.glob("*/part-*.parquet"):
        keys += pq.read_table(part).column("key").to_pylist()
    return keys


def _ledger(c: Cluster) -> dict:
    return json.loads((c.base / "bento" / "l3m-registry.json").read_text())


def _store_tags(c: Cluster) -> set[str]:
    models = c.base / "bento" / "models"
    return {f"{d.parent.name}:{d.name}" for d in models.glob("l3m-*/*") if d.is_dir()}


def _overlap(runs: list[dict]) -> bool:
    a, b = runs
    return a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"]


def test_two_domains_at_once_on_postgres(cluster, toy_domain, tiny_mlm_dir):
    c = cluster
    ids = [c.trigger(_config(c, toy_domain, tiny_mlm_dir, name, bento=True)) for name in ("toy", "toy2")]
    runs = c.wait(ids, {"COMPLETED"})
    assert _overlap(runs), "the two workers did not run the pipelines at the same time"
    assert {r["work_pool_name"] for r in runs} == {"l3m-process"}
    # The server's state lives in PostgreSQL: the runs are rows there.
    rows = _psql(c.db_url, "select state_type from flow_run where id in ('{}')".format("','".join(ids))).split()
    assert rows == ["COMPLETED", "COMPLETED"]

    # Both domains read the same 60 train texts with the same model: one scorer key, each text
    # stored once although two processes scored concurrently, and all of them readable.
    keys = _stored_keys(c.base / "out" / "scores")
    assert len(keys) == len(set(keys)) == 60
    ledger = _ledger(c)  # parses
    assert {d: s["production"] is not None for d, s in ledger["domains"].items()} == {"toy": True, "toy2": True}
    assert set(ledger["models"]) == _store_tags(c)  # the ledger and the BentoML store agree
    bentos = {p.parent.name for p in (c.base / "bento" / "bentos").glob("l3m-*/*") if p.is_dir()}
    assert bentos == {"l3m-toy", "l3m-toy2"}


def test_same_domain_twice_at_once_trains_and_registers_once(cluster, toy_domain, tiny_mlm_dir):
    c = cluster
    cfg = _config(c, toy_domain, tiny_mlm_dir, "twice")
    before = set(_ledger(c)["models"]) if (c.base / "bento" / "l3m-registry.json").exists() else set()
    ids = [c.trigger(cfg), c.trigger(cfg)]
    runs = c.wait(ids, {"COMPLETED"})
    assert _overlap(runs)
    lines = c.log_lines(ids)
    trained = [m for m in lines if m.startswith("run ") and "reused" not in m]
    reused = [m for m in lines if "finished before with identical settings" in m]
    assert len(trained) == 2 and len(reused) == 2, lines  # each of the 2 runs trained by one worker
    ledger = _ledger(c)
    new = set(ledger["models"]) - before
    assert len(new) == 1 and ledger["domains"]["twice"]["production"] in new  # one version, in production
    assert set(ledger["models"]) == _store_tags(c)
    keys = _stored_keys(c.base / "out" / "scores")
    assert len(keys) == len(set(keys))


def test_killed_worker_crashes_its_run_and_the_rerun_resumes(cluster, toy_domain, tiny_mlm_dir):
    c = cluster
    cfg = _config(c, toy_domain, tiny_mlm_dir, "killed")
    run_id = c.trigger(cfg)
    out = c.base / "out" / "killed"
    # SIGKILL the worker that took the run (and its flow-run process) once the first training run
    # has finished and the second has started.
    deadline, victim = time.time() + 400, None
    while time.time() < deadline and victim is None:
        started = list(out.glob("runs/*/identity.json"))
        if len(started) == 2 and len(list(out.glob("runs/*/run.json"))) == 1:
            victim = next((n for n, p in c.workers.items() if _runs_flow(p.pid, run_id)), None)
        time.sleep(0.5)
    assert victim is not None, "the run never reached its second training run"
    doomed = [c.workers[victim].pid, *_descendants(c.workers[victim].pid)]
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    c.workers[victim].wait()
    finished_before = {p.parent.name for p in out.glob("runs/*/run.json")}
    assert len(finished_before) == 1

    crashed = c.wait([run_id], {"CRASHED"}, timeout=240)[0]
    assert "heartbeat" in crashed["state"]["message"].lower()

    c.start_worker(victim + "-restarted")
    c.wait([c.trigger(cfg)], {"COMPLETED"})
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["validation"]["cached"] is True
    assert summary["scoring"]["texts_scored"] == 0 and summary["scoring"]["texts_from_store"] == 60
    assert {r["run"] for r in summary["runs"] if r["reused"]} == finished_before
    assert len(list(out.glob("runs/*/run.json"))) == 2


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _runs_flow(worker_pid: int, run_id: str) -> bool:
    """Whether one of the worker's processes is the flow run ``run_id`` (its env names it)."""
    for pid in _descendants(worker_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ:
            return True
    return False
