"""`bentoml build` of the service works offline and packages the production model.

BentoML 1.4.39 runs `uv` during every build and pip-installs it when missing; with PIP_NO_INDEX
set here, a missing `uv` fails the test instead of being fetched (install it with the dev tools).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest_serving import build_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent


def test_bentoml_build_offline_packages_production_model(tmp_path):
    home = tmp_path / "bentoml"
    env = os.environ | {
        "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
        # Any attempt to reach a package index would fail the build instead of passing silently.
        "PIP_NO_INDEX": "1", "UV_OFFLINE": "1",
    }
    code = (
        "import sys; from serving import registry; "
        "print(registry.register(sys.argv[1]).tag)"
    )
    model = build_tiny_model_dir(tmp_path / "model")
    tag = subprocess.run([sys.executable, "-c", code, str(model)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "serving/bentofile.yaml", "-o", "tag", "."],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    bentos = list((home / "bentos" / "l3m-classifier").glob("*/bento.yaml"))
    assert len(bentos) == 1
    bento_dir = bentos[0].parent
    info = yaml.safe_load(bentos[0].read_text())
    packaged = [m["tag"] for svc in info["services"] for m in svc["models"]]
    assert packaged == [tag]
    assert (bento_dir / "src" / "serving" / "service.py").is_file()
    assert not list((bento_dir / "src").rglob("*.safetensors"))  # model travels as a BentoML model only
    reqs = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0" in reqs
    assert not (bento_dir / "env" / "python" / "requirements.lock.txt").exists()
