"""Noticing that a worker process died: BentoML's process manager restarts a killed worker
silently (issue #17: nothing was logged), so each worker leaves a pid file for its server and
the next one to start reports the pids that ended without a clean shutdown.

A pid file holds the pid and the process's start time: pids are reused, and a file whose pid now
belongs to another process (started later) is a death too."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger("l3m.serving")


def _started(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch), None if there is none."""
    import psutil

    if pid <= 0:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # exists, but not ours to inspect: only the pid can be compared
        return -1.0


def _alive(pid: int, started: float | None) -> bool:
    """Whether the process that wrote a pid file (``pid``, started at ``started``) still runs."""
    now = _started(pid)
    if now is None:
        return False
    return now < 0 or started is None or abs(now - started) < 0.01


def _read(f: Path) -> tuple[int, float | None]:
    parts = f.read_text(encoding="utf-8").split()
    pid = int(f.stem) if f.stem.isdigit() else -1
    try:
        return pid, float(parts[1]) if len(parts) > 1 else None
    except ValueError:
        return pid, None


def worker_dir(server_pid: int | None = None) -> Path:
    """Pid files of one server's workers (keyed by the server process, the workers' parent)."""
    return Path(tempfile.gettempdir()) / f"l3m-serving-{server_pid or os.getppid()}"


def register_worker(directory: Path | None = None) -> list[int]:
    """Record this worker; log and return the pids of earlier workers that died uncleanly."""
    directory = directory or worker_dir()
    directory.mkdir(parents=True, exist_ok=True)
    dead = []
    for f in directory.glob("*.pid"):
        pid, started = _read(f)
        if pid != os.getpid() and not _alive(pid, started):
            dead.append(pid)
            f.unlink(missing_ok=True)
    for pid in sorted(dead):
        logger.error("worker restarted: the previous worker (pid %d) of this server died without a clean "
                     "shutdown (killed, or out of memory); its in-flight requests were dropped", pid)
    (directory / f"{os.getpid()}.pid").write_text(f"{os.getpid()} {_started(os.getpid())}", encoding="utf-8")
    return dead


def unregister_worker(directory: Path | None = None) -> None:
    """A clean shutdown: this worker's end is not a death to report."""
    (directory or worker_dir()).joinpath(f"{os.getpid()}.pid").unlink(missing_ok=True)
