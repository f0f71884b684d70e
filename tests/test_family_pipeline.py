"""Every encoder family through the whole pipeline, as a user runs it from the command line.

Per family (tiny random models of tests/families.py), against one Prefect server for the module:
1. ``l3m run``: validate -> score (exact) -> STL / RTM / L3 under META-TARTAN weighting with
   stage 2 -> register -> bento (promotion forced when a random-weight model does not beat the
   baseline: the model is not the point here, the path is);
2. ``bentoml serve`` of that bento, and ``l3m models verify``: served == offline on every test
   text, including texts cut by the long-text bound with that family's tokenizer; half of the
   families on a text-pair domain;
3. ``l3m train``: L3 with fixed weighting on strided scores, with the child_d and weight_mask tuners.
ModernBERT (the family that used to die in scoring) runs in the default suite, the rest in the
slow suite.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest_serving import bentoml_server
from families import EDGE_FAMILIES, FAMILIES, build
from test_cli_errors import prefect_env  # noqa: F401  (fixture: one Prefect server for the module)

from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SUITE = ["modernbert"]
PAIRS = {"bert-cased", "xlm-roberta", "electra", "albert", "modernbert"}  # text-pair domain for these
WORDS = {"pos": "good great fine nice", "neg": "bad awful poor sad", "neu": "plain usual normal so-so"}


def _domain(root: Path, pairs: bool) -> dict:
    rng = random.Random(0)

    def rows(n: int, tag: str, long: int = 0) -> list[dict]:
        out = []
        for i in range(n):
            lab = ["pos", "neg", "neu"][i % 3]
            words = [rng.choice(WORDS[lab].split()) for _ in range(8 if i >= long else 900)]
            row = {"text": f"{tag} {i} " + " ".join(words), "label": lab}
            if pairs:
                row["text_pair"] = f"second part {i} " + rng.choice(WORDS[lab].split())
            out.append(row)
        return out

    for split, n, long in (("train", 60, 0), ("dev", 15, 0), ("test", 18, 3)):
        write_jsonl(root / "fam" / f"{split}.jsonl", rows(n, split, long))
    dom = {"name": "fam", "data_root": str(root), "splits": {s: {"path": f"fam/{s}.jsonl"} for s in
                                                               ("train", "dev", "test")}}  # fmt: skip
    if pairs:
        dom["text_pair_field"] = "text_pair"
    return dom


def _cli(env: dict[str, str], tmp: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    run_env = {**env, "L3M_OUTPUT_ROOT": str(tmp / "runs"), "BENTOML_HOME": str(tmp / "bento"),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=run_env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"l3m {' '.join(args)}:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n"):])


def _config(tmp: Path, model: Path, domain: dict, **over: object) -> str:
    cfg = {
        "domain": domain,
        "model": {"name_or_path": str(model), "max_length": 32},
        "scoring": {"mode": "exact", "store_dir": str(tmp / "scores")},
        "strategies": [{"kind": "none"}, {"kind": "random"}, {"kind": "l3"}],
        "weighting": {"kind": "meta_tartan"},
        "training": {"seeds": [1], "epochs": 2, "batch_size": 16, "lr": 1e-3, "head_lr": 3e-3,
                     "stage2": {"epochs": 1}},
        "registry": {"build_bento": True},
        "output_dir": str(tmp / "out"),
        **over,
    }  # fmt: skip
    path = tmp / f"run-{len(list(tmp.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _through_the_pipeline(family: str, model: Path, env: dict[str, str], tmp: Path, scope: str = "layer") -> None:
    domain = _domain(tmp, pairs=family in PAIRS)
    s = _json(_cli(env, tmp, "run", _config(tmp, model, domain)).stdout)
    assert s["scoring"]["path"] in ("packed", "generic"), s["scoring"]
    runs = {r["run"].split("-")[0]: Path(s["output_dir"]) / "runs" / r["run"] for r in s["runs"]}
    assert set(runs) == {"none", "random", "l3"}
    for strategy, run_dir in runs.items():
        record = json.loads((run_dir / "run.json").read_text())
        assert {"stage1", "stage2"} <= set(record["stages"]), record["stages"]
        if strategy != "none":
            weights = run_dir / "weights.jsonl"
            assert weights.is_file() and weights.read_text().strip(), "META-TARTAN wrote no task weights"
    tag = s["registered"]["tag"]
    bento = s["bento"]
    if not s["registered"]["promoted"]:  # a random-weight model may not beat the baseline
        _cli(env, tmp, "models", "promote", tag, "--force")
        bento = _json(_cli(env, tmp, "models", "build", tag).stdout)["bento"]
    serve_env = {**env, "BENTOML_HOME": str(tmp / "bento"), "L3M_TORCH_THREADS": "1"}
    serve_env.pop("L3M_MODEL_TAG", None)
    with bentoml_server(bento, tmp, serve_env, tmp / "serve.log") as (url, _):
        report = _json(_cli(env, tmp, "models", "verify", "--url", url, "--model", tag).stdout)
    assert report["ok"] and report["n"] == 18 and report["max_prob_diff"] < 1e-4, report

    tuned = _config(tmp, model, domain, strategies=[{"kind": "l3"}], weighting={"kind": "fixed"},
                    scoring={"mode": "strided", "store_dir": str(tmp / "scores")},
                    tuners=[{"kind": "child_d", "scope": scope}, {"kind": "weight_mask", "scope": scope}],
                    training={"seeds": [1], "epochs": 1, "batch_size": 16, "lr": 1e-3})  # fmt: skip
    t = _json(_cli(env, tmp, "train", tuned).stdout)
    assert sorted(r["tuner"] for r in t["runs"]) == ["child_d", "weight_mask"], t["runs"]


@pytest.mark.parametrize("family", DEFAULT_SUITE)
def test_family_through_the_pipeline(family_models, prefect_env, tmp_path, family):  # noqa: F811
    _through_the_pipeline(family, family_models[family], prefect_env, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in DEFAULT_SUITE])
def test_family_through_the_pipeline_slow(family_models, prefect_env, tmp_path, family):  # noqa: F811
    _through_the_pipeline(family, family_models[family], prefect_env, tmp_path)



@pytest.mark.slow
@pytest.mark.parametrize("family", ["deberta-v2-lm", "xlm"])  # heads that train through their own forward
def test_edge_family_through_the_pipeline(shared_data, prefect_env, tmp_path, family):  # noqa: F811
    assert family in EDGE_FAMILIES
    model = build(family, tmp_path / "model", shared_data)
    # XLM names its blocks attentions / ffns: the tuners' scope "layer" is refused for it up front
    _through_the_pipeline(family, model, prefect_env, tmp_path, scope="" if family == "xlm" else "layer")
