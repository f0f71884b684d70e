"""One bento for many domains (flows.multi_bento, `l3m models build --multi`): it packages every
production domain and each base once, is built once per set of versions and serving code, and,
exported and imported elsewhere (no registry, no ledger), serves the versions it packaged ==
offline."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest_serving import bentoml_server, offline_predictions
from test_multi_domain import TEXTS, _as_domain, _register, trained  # noqa: F401  (fixture reused)
from test_serving import env

BUILD_ENV = {"BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
             # Any attempt to reach a package index fails the build instead of passing silently.
             "PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}


@pytest.fixture(scope="module")
def home(tmp_path_factory, trained) -> Iterator[Path]:  # noqa: F811
    h = tmp_path_factory.mktemp("multi-bento-home")
    for d in trained.values():
        _register(h, d)
    with env(BENTOML_HOME=str(h), **BUILD_ENV):
        yield h


@pytest.fixture(scope="module")
def built(home) -> tuple[str, bool, dict[str, str]]:
    from flows.multi_bento import build_multi_bento

    return build_multi_bento()


def _bento_dir(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "bentos" / name / version


def test_packages_every_production_domain_and_each_base_once(home, built):
    from flows.multi_bento import build_multi_bento
    from serving import registry
    from serving.bases import read_ref

    tag, was_built, tags = built
    assert was_built and tag.startswith("l3m_domains:")
    assert tags == {d: registry.production_tag(d) for d in ("wm_a", "lora_b")}
    info = yaml.safe_load((_bento_dir(home, tag) / "bento.yaml").read_text())
    packaged = [m["tag"] for m in info["models"]]
    refs = [read_ref(registry.model_path(t)) for t in tags.values()]
    bases = {r.tag for r in refs if r is not None}
    assert len(bases) == 1 and None not in refs  # both domains over one base
    assert sorted(packaged) == sorted([*tags.values(), *bases])  # the base once
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert envs["L3M_DOMAIN_TAGS"] == ",".join(f"{d}={tags[d]}" for d in sorted(tags))
    assert "L3M_MODEL_TAG" not in envs
    assert info["service"] == "serving.multi_service:L3MDomains"
    # Nothing changed: the same bento, not rebuilt.
    mtime = (_bento_dir(home, tag) / "bento.yaml").stat().st_mtime
    assert build_multi_bento() == (tag, False, tags)
    assert (_bento_dir(home, tag) / "bento.yaml").stat().st_mtime == mtime
    assert [p.name for p in (home / "bentos" / "l3m_domains").iterdir() if p.is_dir()] == [tag.split(":")[1]]


# Run in the bento's src/ with the repository's editable install switched off: every l3m /
# serving module the services import, at import and while loading domains, must be packaged.
WITHOUT_REPO = """
import json, pathlib, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
src, tags = sys.argv[1], json.loads(sys.argv[2])
import bentoml
import serving.multi_service, serving.service  # module-level imports (the single service's too)
from serving.domains import DomainSet
ds = DomainSet(None, lambda t: bentoml.models.get(t).path, lambda t: pathlib.Path(bentoml.models.get(t).path), tags)
ds.refresh(force=True)
assert ds.names() == sorted(tags), ds.names()
outside = [m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] in ("l3m", "serving", "flows")
           and getattr(m, "__file__", None) and not m.__file__.startswith(src)]
assert not outside, outside
print("ok")
"""


def test_the_packaged_code_runs_without_the_repository(home, built):
    import subprocess
    import sys

    tag, _, tags = built
    src = _bento_dir(home, tag) / "src"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "L3M_DOMAINS", "L3M_DOMAIN_TAGS")}
    env["L3M_MODEL_TAG"] = tags["wm_a"]  # serving.service resolves its model at import
    res = subprocess.run([sys.executable, "-c", WITHOUT_REPO, str(src), json.dumps(tags)], cwd=src, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_a_promotion_or_a_serving_code_change_makes_a_new_multi_bento(home, built, trained, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    import flows.register as fr
    from flows.multi_bento import build_multi_bento, multi_bento_tag

    first, _, tags = built
    root = tmp_path / "repo"  # the serving code as it will be after an edit
    shutil.copytree(fr.ROOT / "serving", root / "serving")
    (root / "serving" / "multi_service.py").write_text((root / "serving" / "multi_service.py").read_text() + "\n# edit\n")
    with monkeypatch.context() as m:
        m.setattr(fr, "ROOT", root)
        m.setattr(fr, "BENTOFILE", root / "serving" / "bentofile.yaml")
        assert multi_bento_tag(tags) != first
    new = _register(home, _as_domain(trained["lora_b"], tmp_path / "v2", "lora_b", dev=0.99))
    second, was_built, tags2 = build_multi_bento()
    assert was_built and second != first and tags2 == {**tags, "lora_b": new}
    assert build_multi_bento(["wm_a"])[2] == {"wm_a": tags["wm_a"]}  # only the named domains
    from serving import registry

    registry.rollback("lora_b")  # back to the versions the module's bento holds
    assert build_multi_bento()[:2] == (first, False)


def test_named_domains_without_production_and_bad_arguments_exit_2(home):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.multi_bento import build_multi_bento
    from serving.registry import RegistryError

    with pytest.raises(RegistryError, match=r"no production version for \['nope'\]; domains with one: "):
        build_multi_bento(["wm_a", "nope"])
    runner = CliRunner()
    res = runner.invoke(app, ["models", "build", "--multi", "--domains", "nope"])
    assert res.exit_code == 2 and "no production version for ['nope']" in res.output
    res = runner.invoke(app, ["models", "build", "l3m-wm_a:x", "--multi"])
    assert res.exit_code == 2 and "give --domains, not a tag" in res.output
    res = runner.invoke(app, ["models", "build", "--domains", "wm_a"])
    assert res.exit_code == 2 and "--domains goes with --multi" in res.output


def test_the_exported_bento_serves_its_packaged_versions_elsewhere(home, built, trained, tmp_path):  # noqa: F811
    """Exported (`bentoml export`) and imported into a BentoML home that held nothing (no model
    store, no ledger): every domain and its base travel in the archive, the service serves the
    packaged versions, and the answers equal the offline ones."""
    import subprocess
    import sys

    tag, _, tags = built
    archive = tmp_path / "domains.bento"
    bare = tmp_path / "bare-home"
    for args, h in ((["export", tag, str(archive)], home), (["import", str(archive)], bare)):
        res = subprocess.run([sys.executable, "-m", "bentoml", *args], env=os.environ | {"BENTOML_HOME": str(h)},
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    assert not (bare / "l3m_ledger.json").exists() and (bare / "models").is_dir()
    server_env = {k: v for k, v in os.environ.items() if k not in ("L3M_DOMAINS", "L3M_DOMAIN_TAGS", "L3M_MODEL_TAG")}
    server_env |= {"BENTOML_HOME": str(bare), "L3M_TORCH_THREADS": "1"}
    with bentoml_server(tag, tmp_path, server_env, tmp_path / "serve.log") as (url, _):
        meta = httpx.get(f"{url}/metadata", timeout=30).json()
        assert {d["domain"]: d["model_tag"] for d in meta["domains"]} == tags
        for domain, model_dir in trained.items():
            got = httpx.post(f"{url}/classify", json={"texts": TEXTS, "domain": domain}, timeout=60).json()
            want = offline_predictions(model_dir, TEXTS)
            assert [g["label"] for g in got] == [w["label"] for w in want], json.dumps(got)
            for g, w in zip(got, want, strict=True):
                assert g["score"] == pytest.approx(w["probabilities"][g["label"]], abs=1e-5)
        r = httpx.post(f"{url}/classify", json={"texts": TEXTS, "domain": "nope"}, timeout=30)
        assert r.status_code == 404 and sorted(r.json()["domains"]) == sorted(tags)
        # `l3m models verify` against the multi-domain service: every domain's stored offline
        # test predictions replayed as that domain's requests.
        from typer.testing import CliRunner

        from flows.cli import app

        res = CliRunner().invoke(app, ["models", "verify", "--url", url])
        assert res.exit_code == 0, res.output
        reports = json.loads(res.output)
        assert {r["domain"]: r["model"] for r in reports} == tags
        assert all(r["ok"] and r["n"] == 12 and r["max_prob_diff"] < 1e-5 for r in reports), reports
        res = CliRunner().invoke(app, ["models", "verify", "--url", url, "--domain", "nope"])
        assert res.exit_code == 2 and "'nope' is not served" in res.output
    assert "packaged versions" in (tmp_path / "serve.log").read_text()
