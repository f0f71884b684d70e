"""User errors on the `l3m` command line: exit 2, one clear message, no traceback, under Prefect.

Every CLI call goes through the default Prefect path (no ``--no-prefect``), against one Prefect
server started for the module (an ephemeral server per call would cost seconds each).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import httpx

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    exe = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([exe, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off",
                               "--no-ui", "--no-services"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(env["PREFECT_API_URL"] + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                pytest.fail("prefect server did not start")
            time.sleep(0.5)
        yield env
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _cli(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run_env = {**env, "L3M_OUTPUT_ROOT": str(tmp_path / "runs")}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=300)


def _assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, err[-4000:]
    assert "Flow run" in err, "the command did not run as a Prefect flow"
    assert "Traceback" not in err, err[-4000:]
    for needle in needles:
        assert needle in err, f"{needle!r} not in stderr:\n{err[-4000:]}"


def _config(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


# --------------------------------------------------------------------------- config errors


def test_typod_key_names_the_field(prefect_env, toy_domain, tmp_path):
    cfg = _config(tmp_path, toy_domain(text_feild="text"))
    _assert_user_error(_cli(prefect_env, tmp_path, "validate", cfg), cfg, "domain.text_feild", "Extra inputs")


def test_debug_shows_the_traceback(prefect_env, toy_domain, tmp_path):
    cfg = _config(tmp_path, toy_domain(text_feild="text"))
    proc = _cli(prefect_env, tmp_path, "--debug", "validate", cfg)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError" in proc.stderr
    assert "domain.text_feild" in proc.stderr


# --------------------------------------------------------------------------- data errors


def test_missing_field_lists_the_fields_that_exist(prefect_env, toy_domain, tmp_path):
    cfg = _config(tmp_path, toy_domain(label_field="gold"))
    _assert_user_error(_cli(prefect_env, tmp_path, "validate", cfg),
                       f"{toy_domain.root / 'toy'}", ".jsonl: field(s) ['gold'] not found",
                       "the file has fields ['label', 'text']")


def test_empty_file(prefect_env, toy_domain, tmp_path):
    cfg = _config(tmp_path, toy_domain())
    (toy_domain.root / "toy" / "dev.jsonl").write_text("")
    _assert_user_error(_cli(prefect_env, tmp_path, "validate", cfg), "dev.jsonl: file is empty")


def test_unseen_label_fails_the_data_check(prefect_env, toy_domain, tmp_path):
    write_jsonl(toy_domain.root / "toy" / "test.jsonl",
                [{"text": f"t {i}", "label": "pos"} for i in range(12)] + [{"text": "x", "label": "mystery"}])
    cfg = _config(tmp_path, toy_domain())
    _assert_user_error(_cli(prefect_env, tmp_path, "validate", cfg), "label_in_label_set", "mystery", "[test]")


def test_invalid_utf8_names_file_and_line(prefect_env, toy_domain, tmp_path):
    path = toy_domain.root / "toy" / "train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b"train 4", b"train \xff\xfe 4")
    path.write_bytes(b"".join(lines))
    cfg = _config(tmp_path, toy_domain())
    _assert_user_error(_cli(prefect_env, tmp_path, "validate", cfg),
                       f"{path}: line 5: not valid UTF-8 (byte 0xff at column")


def test_split_path_that_is_a_directory(prefect_env, toy_domain, tmp_path):
    cfg = _config(tmp_path, toy_domain(splits={"train": {"path": "toy", "format": "jsonl"}}))
    _assert_user_error(_cli(prefect_env, tmp_path, "validate", cfg),
                       f"{toy_domain.root / 'toy'}: is a directory")


def test_url_split_while_offline(prefect_env, toy_domain, tmp_path):
    url = "https://example.org/toy/train.jsonl"
    cfg = _config(tmp_path, toy_domain(splits={"train": {"path": url}}))
    _assert_user_error(_cli(prefect_env, tmp_path, "validate", cfg), url, "offline mode is on")


# --------------------------------------------------------------------------- model errors


def test_run_with_missing_model_path_stops_before_validation(prefect_env, toy_domain, tmp_path):
    missing = tmp_path / "no-such-model"
    cfg = _config(tmp_path, {"domain": toy_domain(), "model": {"name_or_path": str(missing)}})
    _assert_user_error(_cli(prefect_env, tmp_path, "run", cfg),
                       "model.name_or_path", f"model path {missing} does not exist")
    assert not (tmp_path / "runs" / "toy" / "validation").exists(), "validation ran before the model check"


def test_a_model_that_cannot_do_a_step_is_refused_before_validation(prefect_env, toy_domain, family_models,
                                                                    tmp_path):
    """ELECTRA's discriminator has no MLM head: L3 (scoring + MLM task) is refused up front, by name."""
    from test_capabilities import _without_mlm_head

    disc = _without_mlm_head(family_models["electra"], tmp_path / "disc", "ElectraForPreTraining")
    cfg = _config(tmp_path, {"domain": toy_domain(), "model": {"name_or_path": str(disc)},
                             "strategies": [{"kind": "none"}, {"kind": "l3"}]})  # fmt: skip
    _assert_user_error(_cli(prefect_env, tmp_path, "run", cfg), "(electra family)",
                       "no pretrained masked-LM head", "MLM strategies ['l3']", "PLL scoring (for L3)")
    assert "Retrying" not in _cli(prefect_env, tmp_path, "score", cfg).stderr
    assert not (tmp_path / "runs" / "toy" / "validation").exists(), "validation ran before the model check"


def test_hub_id_while_offline(prefect_env, toy_domain, tmp_path):
    cfg = _config(tmp_path, {"domain": toy_domain(), "model": {"name_or_path": "nobody/no-such-model"}})
    _assert_user_error(_cli(prefect_env, tmp_path, "score", cfg),
                       "'nobody/no-such-model'", "offline mode is on (HF_HUB_OFFLINE=1)")


# --------------------------------------------------------------------------- the log filter, in-process


def test_filter_drops_tracebacks_of_user_errors_only():
    from flows.common import UserErrorTracebackFilter
    from l3m.config import ConfigError

    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test_cli_errors.run")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(UserErrorTracebackFilter((ConfigError,)))
    try:
        for exc in (ConfigError("cfg.yaml: invalid config\n  - domain.x: extra"), RuntimeError("boom")):
            try:
                raise exc
            except Exception as e:
                logger.exception("Encountered exception during execution: %r", e)
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()
    user, unexpected = records
    assert user.exc_info is None and "\n" not in user.getMessage()
    assert user.getMessage().startswith("ConfigError: cfg.yaml: invalid config")
    assert unexpected.exc_info is not None and "RuntimeError('boom')" in unexpected.getMessage()


# --------------------------------------------------------------------------- the library checks, in-process


def test_csv_decoding_error_names_file_and_line(tmp_path):
    from l3m.data.loading import DataError, _read_table

    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,a\nbad \xe9 latin-1,b\n")
    with pytest.raises(DataError, match=rf"{path}: line 3: not valid UTF-8 \(byte 0xe9 at column 5\)"):
        _read_table(str(path), "csv")


def test_unreadable_split_file_gets_its_own_message(tmp_path, monkeypatch):
    from l3m.data.loading import DataError, _read_table

    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}])

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    # Tests may run as root, which chmod cannot lock out: simulate the OS refusing the read.
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match=rf"{path}: cannot be read \(permission denied\)"):
        _read_table(str(path), "jsonl")


def test_model_check_accepts_a_model_and_rejects_what_is_not_one(tmp_path, shared_model):
    from l3m.config import ConfigError, ModelSpec
    from l3m.modelcheck import check_model

    assert check_model(ModelSpec(name_or_path=str(shared_model))) == str(shared_model)
    with pytest.raises(ConfigError, match=rf"model.name_or_path: {tmp_path} is a directory but not a model"):
        check_model(ModelSpec(name_or_path=str(tmp_path)))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ConfigError, match="is a file; give the model's directory"):
        check_model(ModelSpec(name_or_path=str(tmp_path / "weights.bin")))
    with pytest.raises(ConfigError, match="model path ./models/nothing-here does not exist"):
        check_model(ModelSpec(name_or_path="./models/nothing-here"))
    with pytest.raises(ConfigError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        check_model(ModelSpec(name_or_path="nobody/no-such-model"))


def test_meta_tartan_under_torchrun_is_refused_before_any_work(prefect_env, toy_domain, tmp_path):
    cfg = _config(tmp_path, {"domain": toy_domain(), "weighting": {"kind": "meta_tartan"},
                             "strategies": [{"kind": "l3"}]})
    proc = _cli(prefect_env, tmp_path, "train", cfg, "--nproc", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "weighting.kind=meta_tartan runs in one process" in proc.stderr
    assert not (tmp_path / "runs" / "toy").exists()
