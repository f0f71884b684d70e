"""An exclusive lock shared by processes (and threads) that write one store.

``flock`` on a lock file beside the data: it excludes other processes on the same machine and,
on Linux NFS clients (where the kernel emulates ``flock`` with NFS byte-range locks), processes
on other machines mounting the same volume. Storage without working locks (object-store mounts
such as s3fs or gcsfuse) cannot host a store written by more than one process; docs/scale-out.md
lists what each store needs. Each acquisition opens the file anew, so two threads of one process
exclude each other too (``flock`` locks belong to the open file description).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if missing) for the block."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
