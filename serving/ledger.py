"""The stage/promotion ledger: a small JSON file beside the BentoML model store.

BentoML model labels are fixed when a model is saved (``ModelInfo`` is frozen and there is no
public update call), so the *current* stage of each version and the promotion history live
here, in ``$BENTOML_HOME/l3m-registry.json``. Every read-modify-write holds an exclusive
``fcntl`` lock and replaces the file atomically, so a crashed or concurrent writer never leaves
a half-written ledger behind.

``registration_lock`` serialises whole registrations (cache check, model copy, promotion,
bento build) across the workers sharing one ``BENTOML_HOME``: without it two pipelines that
chose the same model would both miss the registration cache and store it twice. It is a
separate file because the ledger lock is taken again inside a registration. Both locks are
``flock`` locks (``l3m.locking``): they need storage with working locks (local disk, NFS).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from l3m.locking import exclusive

LEDGER_FILE = "l3m-registry.json"
LOCK_FILE = "l3m-registry.lock"
REGISTRATION_LOCK_FILE = "l3m-registration.lock"
# Events kept per ledger; older ones are dropped so the file stays small.
MAX_EVENTS = 1000


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def empty_ledger() -> dict[str, Any]:
    # models: tag -> {domain, stage, reason, metric, dev_score, registered_at}
    # domains: domain -> {production: tag | None, history: [tags that were production, oldest first]}
    return {"version": 1, "models": {}, "domains": {}, "events": []}


def read_ledger(home: Path) -> dict[str, Any]:
    path = home / LEDGER_FILE
    if not path.exists():
        return empty_ledger()
    data = json.loads(path.read_text(encoding="utf-8"))
    base = empty_ledger()
    base.update(data)
    return base


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".l3m-registry-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked_ledger(home: Path) -> Iterator[dict[str, Any]]:
    """Yield the ledger for modification; it is written back only if the block succeeds."""
    with exclusive(home / LOCK_FILE):
        data = read_ledger(home)
        yield data
        data["events"] = data["events"][-MAX_EVENTS:]
        _write_atomic(home / LEDGER_FILE, data)


@contextlib.contextmanager
def registration_lock(home: Path) -> Iterator[None]:
    """Hold the store-wide registration lock (see the module docstring)."""
    with exclusive(home / REGISTRATION_LOCK_FILE):
        yield


def add_event(ledger: dict[str, Any], action: str, tag: str, domain: str, reason: str) -> None:
    ledger["events"].append({"time": now_iso(), "action": action, "tag": tag, "domain": domain, "reason": reason})


def domain_state(ledger: dict[str, Any], domain: str) -> dict[str, Any]:
    return ledger["domains"].setdefault(domain, {"production": None, "history": []})
