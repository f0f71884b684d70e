"""Split and corpus URLs: hashed and read by content (l3m.data.remote), not by address."""

from __future__ import annotations

import json
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from l3m.config import DomainConfig
from l3m.data import remote
from l3m.data.loading import DataError, load_domain, read_corpus
from l3m.data.snapshot import snapshot_id


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A directory served over HTTP on loopback, online mode, a fresh download cache; yields
    (directory, base URL, GET counts per path)."""
    from datasets import config as datasets_config

    site = tmp_path / "site"
    site.mkdir()
    gets: Counter[str] = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            gets[self.path] += 1
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(remote.ENV_DOWNLOAD_DIR, str(tmp_path / "downloads"))
    remote.forget_downloads()
    yield site, f"http://127.0.0.1:{server.server_address[1]}", gets
    server.shutdown()
    remote.forget_downloads()


def _write(path, labels):
    path.write_text("".join(json.dumps({"text": f"text {i} {lab}", "label": lab}) + "\n"
                            for i, lab in enumerate(labels)))


def _domain(url):
    return DomainConfig(name="web", splits={s: {"path": f"{url}/{s}.jsonl"} for s in ("train", "dev", "test")},
                        unlabelled={"path": f"{url}/corpus.txt"})


def _site(site, train_labels):
    _write(site / "train.jsonl", train_labels)
    for s in ("dev", "test"):
        _write(site / f"{s}.jsonl", ["a", "b"] * 10)
    (site / "corpus.txt").write_text("one line\nanother line\n")


def test_a_changed_file_behind_the_same_url_is_a_new_snapshot(served):
    site, url, gets = served
    _site(site, ["a", "b"] * 20)
    cfg = _domain(url)
    first = snapshot_id(cfg)
    loaded = load_domain(cfg)  # reads the bytes the id hashed (no second download)
    assert loaded.dataset["train"].num_rows == 40 and gets["/train.jsonl"] == 1
    assert read_corpus(f"{url}/corpus.txt") == ["one line", "another line"]
    # Reused when nothing changed: a new validation fetches again and finds the same content.
    remote.forget_downloads()
    assert snapshot_id(cfg) == first and gets["/train.jsonl"] == 2
    # Not reused when the content changed at the same address.
    _site(site, ["a", "b"] * 19 + ["b", "b"])
    remote.forget_downloads()
    changed = snapshot_id(cfg)
    assert changed != first
    assert list(load_domain(cfg).dataset["train"]["label_name"])[-2:] == ["b", "b"]
    # The download cache is content-addressed: both train versions, each under its hash, and
    # one file for dev and test (the same bytes).
    assert len(list(remote.download_dir().iterdir())) == 4


def test_an_unreachable_url_is_a_data_error_naming_it(served):
    _, url, _ = served
    with pytest.raises(DataError, match=rf"{url}/dev.jsonl: could not be downloaded \(HTTP Error 404"):
        snapshot_id(_domain(url))
