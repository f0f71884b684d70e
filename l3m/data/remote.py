"""Split and corpus files given as URLs: fetched once, stored by content, hashed by content.

A URL names a place, not data: the file behind it can change while the address stays. So a URL
split is downloaded into a content-addressed cache (``<dir>/<sha256>``) and everything reads
that copy: the snapshot id hashes its bytes (a changed file at the same address is new data),
and the reader parses exactly the bytes that were hashed. Within one process a URL is fetched
once (``local_copy``); ``forget_downloads`` starts over, so a long-lived worker sees the
current content at the start of each validation.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ENV_DOWNLOAD_DIR = "L3M_DOWNLOAD_DIR"
_CHUNK = 1 << 20
_FETCHED: dict[str, Path] = {}
_LOCK = threading.Lock()


class DownloadError(ValueError):
    """A URL that could not be fetched; the message names it and why."""


def is_url(location: str) -> bool:
    return "://" in location


def download_dir() -> Path:
    return Path(os.environ.get(ENV_DOWNLOAD_DIR) or Path.home() / ".cache" / "l3m" / "downloads")


def _offline() -> bool:
    from datasets import config as datasets_config

    return bool(datasets_config.HF_HUB_OFFLINE)


def _open(url: str) -> Any:
    """A binary stream of the URL: urllib for http(s)/ftp/file, fsspec for the other schemes."""
    if url.split("://", 1)[0].lower() in ("http", "https", "ftp", "file"):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (the scheme is checked above)
    import fsspec

    return fsspec.open(url, "rb").open()


def fetch(url: str) -> Path:
    """Download ``url`` into the cache and return its content-addressed path (always fetches)."""
    if _offline():
        raise DownloadError(f"{url}: a URL, but offline mode is on (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1); "
                            "download the file and give its local path, or turn offline mode off")
    root = download_dir()
    root.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=root)
    try:
        with os.fdopen(fd, "wb") as out, _open(url) as src:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        path = root / h.hexdigest()
        os.replace(tmp, path)  # same bytes under the same name: replacing is harmless
    except Exception as e:  # noqa: BLE001 - any scheme's failure (a missing fsspec backend, a cut stream) is the URL's
        raise DownloadError(f"{url}: could not be downloaded ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def local_copy(location: str) -> str:
    """A local path with the location's bytes: the path itself, or the URL's cached download
    (fetched at its first use in this process, the same bytes after that)."""
    if not is_url(location):
        return location
    with _LOCK:
        if location not in _FETCHED or not _FETCHED[location].is_file():
            _FETCHED[location] = fetch(location)
        return str(_FETCHED[location])


def content_digest(location: str) -> str:
    """sha256 of a URL's content (the name of its cached copy)."""
    return Path(local_copy(location)).name


def forget_downloads() -> None:
    """Fetch every URL anew at its next use (the cached files stay: same bytes, same name)."""
    with _LOCK:
        _FETCHED.clear()

