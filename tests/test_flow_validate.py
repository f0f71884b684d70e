"""The Prefect validate flow and the `l3m validate` command on good and broken domains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _broken(toy_domain, tmp_path: Path) -> Path:
    write_jsonl(toy_domain.root / "toy" / "test.jsonl",
                [{"text": f"t {i}", "label": "pos"} for i in range(12)] + [{"text": "x", "label": "mystery"}])
    p = tmp_path / "broken.yaml"
    p.write_text(yaml.safe_dump(toy_domain()))
    return p


def test_validate_flow_passes_fails_and_publishes_artifact(prefect_harness, toy_domain, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.validate import validate
    from l3m.data.validation import DataValidationError

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(toy_domain()))
    out = validate(str(good))
    assert out["passed"] and Path(out["html"]).exists()

    with pytest.raises(DataValidationError, match=r"label_in_label_set.*mystery"):
        validate(str(_broken(toy_domain, tmp_path)))

    async def latest():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    keys = {a.key for a in asyncio.run(latest())}
    assert "validation-toy" in keys


def test_cli_exits_2_with_a_readable_message(toy_domain, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(_broken(toy_domain, tmp_path)),
                           "--no-prefect"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "label_in_label_set" in proc.stderr and "mystery" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reports_a_missing_file_without_traceback(toy_domain, tmp_path):
    p = tmp_path / "missing.yaml"
    p.write_text(yaml.safe_dump(toy_domain(splits={"train": {"path": "toy/gone.jsonl"}})))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(p), "--no-prefect"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "gone.jsonl: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_validates_a_good_domain(toy_domain, tmp_path):
    p = tmp_path / "good.yaml"
    p.write_text(yaml.safe_dump(toy_domain()))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(p), "--no-prefect"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True


def test_a_skipped_validation_links_its_own_snapshots_report(prefect_harness, toy_domain, tmp_path):
    from flows.common import as_config
    from flows.validate import validate
    from l3m.data.validation import DataValidationError

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_domain()))
    test_file = toy_domain.root / "toy" / "test.jsonl"
    good_bytes = test_file.read_bytes()
    first = validate(str(config))
    broken = _broken(toy_domain, tmp_path)
    with pytest.raises(DataValidationError):  # another version of the data fails, and writes its report
        validate(str(broken))
    from flows.validate import report_dir

    failing = report_dir(as_config(broken, [])) / "validation.json"  # named by the broken data's bytes
    test_file.write_bytes(good_bytes)  # back to the validated data: validation is skipped
    again = validate(str(config))
    assert again["cached"] and again["snapshot"] == first["snapshot"]
    assert json.loads(Path(again["report"]).read_text())["passed"] is True
    assert Path(again["report"]).parent == Path(first["json"]).parent
    assert Path(first["snapshot"]).name == Path(first["json"]).parent.name

    assert failing.parent != Path(first["json"]).parent
    assert json.loads(failing.read_text())["passed"] is False
    assert failing.parent.parent == Path(first["json"]).parent.parent != failing.parent  # side by side
