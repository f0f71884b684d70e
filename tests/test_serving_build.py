"""Bento builds: offline, production only, one bento ``l3m-<domain>:<model version>-<build inputs>``
per model version and serving code, and a built bento serves the tag it packaged.

BentoML 1.4.39 runs `uv` during every build and pip-installs it when missing; with PIP_NO_INDEX
set here, a missing `uv` fails the test instead of being fetched (install it with the dev tools).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest_serving import bentoml_server, build_tiny_model_dir, copy_with_dev

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "citation_intent"


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "bentoml"
    for k, v in {"BENTOML_HOME": str(h), "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
                 # Any attempt to reach a package index would fail the build instead of passing silently.
                 "PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    return h


def bento_dirs(home: Path) -> list[Path]:
    return sorted(p.parent for p in (home / "bentos").glob("*/*/bento.yaml"))


def test_production_bento_is_named_for_the_domain_and_built_once(home, tmp_path):
    from flows.register import bento_inputs_digest, build_bento
    from serving import registry

    res = registry.register(build_tiny_model_dir(tmp_path / "model"))
    assert res.promoted
    tag, built = build_bento(res.tag)
    assert built and tag == f"{res.tag}-{bento_inputs_digest()}"  # l3m-<domain>:<model version>-<inputs>
    (bento_dir,) = bento_dirs(home)
    assert bento_dir.parent.name == f"l3m-{DOMAIN}" and bento_dir.name == tag.split(":")[1]
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [m["tag"] for svc in info["services"] for m in svc["models"]] == [res.tag]
    assert {e["name"]: e["value"] for e in info["envs"]}["L3M_MODEL_TAG"] == res.tag
    assert (bento_dir / "src" / "serving" / "service.py").is_file()
    assert not list((bento_dir / "src").rglob("*.safetensors"))  # model travels as a BentoML model only
    reqs = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0" in reqs
    assert not (bento_dir / "env" / "python" / "requirements.lock.txt").exists()

    _bento_code_runs_without_the_library(bento_dir / "src")

    mtime = (bento_dir / "bento.yaml").stat().st_mtime
    assert build_bento(res.tag) == (tag, False)  # nothing changed: nothing built
    assert bento_dirs(home) == [bento_dir] and (bento_dir / "bento.yaml").stat().st_mtime == mtime


def test_changed_serving_code_builds_a_new_bento_of_the_same_model(home, tmp_path, monkeypatch):
    import shutil

    import flows.register as fr
    from serving import registry

    res = registry.register(build_tiny_model_dir(tmp_path / "model"))
    first, _ = fr.build_bento(res.tag)
    root = tmp_path / "repo"  # the serving code as it will be after an edit
    shutil.copytree(ROOT / "serving", root / "serving")
    service = root / "serving" / "service.py"
    service.write_text(service.read_text() + "\n# an edit after the first build\n")
    monkeypatch.setattr(fr, "ROOT", root)
    monkeypatch.setattr(fr, "BENTOFILE", root / "serving" / "bentofile.yaml")
    second, built = fr.build_bento(res.tag)
    assert built and second != first and second.startswith(res.tag + "-")
    assert len(bento_dirs(home)) == 2
    packaged = home / "bentos" / f"l3m-{DOMAIN}" / second.split(":")[1] / "src" / "serving" / "service.py"
    assert packaged.read_text().endswith("# an edit after the first build\n")


def test_candidate_is_registered_but_not_packaged(home, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.register import build_bento_task
    from serving import registry

    base = build_tiny_model_dir(tmp_path / "base")
    registry.register(copy_with_dev(base, tmp_path / "a", 0.5))
    worse = registry.register(copy_with_dev(base, tmp_path / "b", 0.3))
    assert worse.stage == "candidate"
    assert build_bento_task.fn(worse.to_dict()) == {"tag": None, "status": "not built (candidate)"}
    res = CliRunner().invoke(app, ["models", "build", worse.tag])
    assert res.exit_code == 2 and "candidate, not production" in res.output
    assert bento_dirs(home) == []


def test_built_bento_serves_its_packaged_tag_not_the_ledger_production(home, tmp_path):
    from flows.register import build_bento
    from serving import registry

    base = build_tiny_model_dir(tmp_path / "base")
    packaged = registry.register(copy_with_dev(base, tmp_path / "a", 0.5)).tag
    bento, _ = build_bento(packaged)
    newer = registry.register(copy_with_dev(base, tmp_path / "b", 0.6))
    assert newer.promoted and registry.production_tag(DOMAIN) == newer.tag != packaged

    env = os.environ | {"L3M_TORCH_THREADS": "1"}
    env.pop("L3M_MODEL_TAG", None)
    with bentoml_server(bento, tmp_path, env, tmp_path / "serve.log") as (url, _):
        meta = httpx.get(f"{url}/metadata", timeout=30).json()
        assert meta["model_tag"] == packaged


def _bento_code_runs_without_the_library(src: Path) -> None:
    """Every serving module the service imports is packaged, and the bf16 probe (which used to
    import l3m lazily) answers inside the bento, where only serving/ exists."""
    import re

    imported = set(re.findall(r"^from serving\.(\w+) import", (ROOT / "serving" / "service.py").read_text(), re.M))
    assert imported and all((src / "serving" / f"{m}.py").is_file() for m in imported), imported
    code = ("import sys; sys.modules['l3m'] = None; import serving.model_io as m; "
            "assert m.__file__.startswith(sys.argv[1]), m.__file__; print(m.serving_dtype('bfloat16', 'cpu'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code, str(src)], cwd=src, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] in ("bfloat16", "float32")
