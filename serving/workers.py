"""Noticing that a worker process died: BentoML's process manager restarts a killed worker
silently (issue #17: nothing was logged), so each worker leaves a pid file for its server and
the next one to start reports the pids that ended without a clean shutdown."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger("l3m.serving")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def worker_dir(server_pid: int | None = None) -> Path:
    """Pid files of one server's workers (keyed by the server process, the workers' parent)."""
    return Path(tempfile.gettempdir()) / f"l3m-serving-{server_pid or os.getppid()}"


def register_worker(directory: Path | None = None) -> list[int]:
    """Record this worker; log and return the pids of earlier workers that died uncleanly."""
    directory = directory or worker_dir()
    directory.mkdir(parents=True, exist_ok=True)
    dead = []
    for f in directory.glob("*.pid"):
        pid = int(f.stem) if f.stem.isdigit() else -1
        if pid != os.getpid() and not _alive(pid):
            dead.append(pid)
            f.unlink(missing_ok=True)
    for pid in sorted(dead):
        logger.error("worker restarted: the previous worker (pid %d) of this server died without a clean "
                     "shutdown (killed, or out of memory); its in-flight requests were dropped", pid)
    (directory / f"{os.getpid()}.pid").write_text(str(os.getpid()), encoding="utf-8")
    return dead


def unregister_worker(directory: Path | None = None) -> None:
    """A clean shutdown: this worker's end is not a death to report."""
    (directory or worker_dir()).joinpath(f"{os.getpid()}.pid").unlink(missing_ok=True)
