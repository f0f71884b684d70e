"""The adapt-domain pipeline end to end (tiny model, toy domain): outputs, and kill + resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _write_config(tmp_path: Path, toy_domain, tiny_mlm_dir: Path, seeds: list[int]) -> Path:
    cfg = {
        "domain": toy_domain(),
        "model": {"name_or_path": str(tiny_mlm_dir), "max_length": 32},
        "scoring": {"mode": "exact", "shard_size": 30},
        "strategies": [{"kind": "none"}, {"kind": "random"}, {"kind": "l3"}],
        "training": {"seeds": seeds, "epochs": 2, "batch_size": 16, "lr": 1e-3},
        "output_dir": str(tmp_path / "out"),
        "scoring_store": None,
    }
    cfg.pop("scoring_store")
    cfg["scoring"]["store_dir"] = str(tmp_path / "scores")
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _env(tmp_path: Path) -> dict[str, str]:
    # One PREFECT_HOME for both runs: the validation cache lives in its result storage.
    return {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "BENTOML_HOME": str(tmp_path / "bento"),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(cfg: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n"):])


def test_killed_run_resumes_without_redoing_validation_scoring_or_finished_runs(tmp_path, toy_domain, tiny_mlm_dir):
    cfg = _write_config(tmp_path, toy_domain, tiny_mlm_dir, seeds=[1, 2])
    env = _env(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Kill the whole process group as soon as the first training run has finished.
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(out.glob("runs/*/run.json")):
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent for p in out.glob("runs/*/run.json")}
    assert finished_before and not (out / "pipeline.json").exists()
    mtimes = {p: (p / "run.json").stat().st_mtime for p in finished_before}

    second = _run(cfg, env)
    assert second.returncode == 0, second.stderr[-3000:]
    s = _summary(second.stdout)
    assert s["validation"]["cached"] is True
    # Only what training reads is scored: the 60 train texts (no dev/test without shift_summary).
    assert s["scoring"]["texts_scored"] == 0 and s["scoring"]["texts_from_store"] == 60
    assert s["scoring"]["tokens_scored"] == 0
    for p, m in mtimes.items():  # finished runs reused, not retrained
        assert (p / "run.json").stat().st_mtime == m
    assert len(list(out.glob("runs/*/run.json"))) == 6
    assert sum(r["reused"] for r in s["runs"]) == len(finished_before)
    reg = s["registered"]
    assert reg["tag"].startswith("l3m-toy:") and reg["evaluated_on"] == "dev snapshot"
    assert reg["data_fingerprint"] == s["validation"]["fingerprint"]
    # The first model of a domain is promoted unless it does not beat the majority-class
    # baseline (the tiny random MLM may not): then it is a candidate with the warning, unpackaged.
    assert (reg["stage"] == "candidate") == bool(reg["warning"]) and reg["baseline"] is not None
    assert s["majority_baseline"]["dev"]["macro_f1"] > 0 and any("epochs 2" in x for x in s["settings"])
    assert Path(s["results"]["md"]).exists() and Path(s["tokenview"]).exists()
    assert json.loads((out / "pipeline.json").read_text())["registered"]["tag"] == s["registered"]["tag"]

    # A third run with nothing new: every step reused, and no new registry version.
    third = _summary(_run(cfg, env).stdout)
    assert third["registered"]["tag"] == s["registered"]["tag"]
    assert all(r["reused"] for r in third["runs"]) and third["results"]["md"] == s["results"]["md"]

    # A changed setting is a new experiment: every run trains anew (none returns the old numbers).
    fourth = _run(cfg, env, "--set", "training.epochs=3")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    f = _summary(fourth.stdout)
    assert not any(r["reused"] for r in f["runs"]) and f["results"]["md"] != s["results"]["md"]
    assert f["validation"]["cached"] is True and f["scoring"]["texts_scored"] == 0  # same data, same scores
    assert len(list(out.glob("runs/*/run.json"))) == 12
    assert "epochs 3" in Path(f["results"]["md"]).read_text()


def test_changed_data_revalidates_scores_only_new_texts_and_retrains(tmp_path, toy_domain, tiny_mlm_dir):
    """What a scheduled (cron) rerun does when the data files changed."""
    cfg = _write_config(tmp_path, toy_domain, tiny_mlm_dir, seeds=[1])
    env = _env(tmp_path)
    first = _run(cfg, env)
    assert first.returncode == 0, first.stderr[-3000:]
    a = _summary(first.stdout)
    # dill (datasets' fingerprinting) disassembles functions into a captured stdout; Prefect's
    # log_prints used to turn that into hundreds of log lines.
    assert "Disassembly of" not in first.stdout + first.stderr
    assert "ephemeral docs site" not in first.stderr  # Great Expectations' per-run INFO line
    train = Path(toy_domain.root) / "toy" / "train.jsonl"
    extra = [{"text": f"appended {i} good great fine nice", "label": "pos"} for i in range(6)]
    with train.open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in extra))
    second = _run(cfg, env)
    assert second.returncode == 0, second.stderr[-3000:]
    b = _summary(second.stdout)
    assert b["validation"]["cached"] is False and b["validation"]["snapshot"] != a["validation"]["snapshot"]
    assert b["validation"]["fingerprint"] != a["validation"]["fingerprint"]
    assert b["scoring"]["texts_scored"] == 6 and b["scoring"]["texts_from_store"] == 60
    assert not any(r["reused"] for r in b["runs"])
    assert b["registered"]["tag"] != a["registered"]["tag"]
    assert b["registered"]["data_fingerprint"] == b["validation"]["fingerprint"]


def test_new_domain_is_a_yaml_file_csv_pairs_numeric_labels(tmp_path, tiny_mlm_dir):
    """A domain written from scratch: CSV, other field names, text pairs, numeric labels."""
    import pandas as pd

    rows = []
    for i in range(90):
        gold = i % 3
        rows.append({"premise": f"claim {i} about item {i % 7}",
                     "hypothesis": ["it holds", "it fails", "unclear"][gold] + f" for {i}", "gold": gold})
    data = tmp_path / "nli"
    data.mkdir()
    pd.DataFrame(rows[:60]).to_csv(data / "train.csv", index=False)
    pd.DataFrame(rows[60:75]).to_csv(data / "dev.csv", index=False)
    pd.DataFrame(rows[75:]).to_csv(data / "test.csv", index=False)
    cfg = tmp_path / "nli.yaml"
    cfg.write_text(f"""
domain:
  name: toy_nli
  data_root: {data}
  splits: {{train: {{path: train.csv}}, dev: {{path: dev.csv}}, test: {{path: test.csv}}}}
  text_field: premise
  text_pair_field: hypothesis
  label_field: gold
  metric: accuracy
model: {{name_or_path: {tiny_mlm_dir}, max_length: 32}}
scoring: {{store_dir: {tmp_path / 'scores'}}}
strategies: [{{kind: l3}}]
training: {{seeds: [1], epochs: 1, batch_size: 16}}
output_dir: {tmp_path / 'out'}
""")
    proc = _run(cfg, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(proc.stdout)
    assert s["registered"]["tag"].startswith("l3m-toy_nli:")
    meta = json.loads((Path(s["chosen_run"]["model_dir"]) / "l3m.json").read_text())
    assert meta["text_pair"] is True and meta["label_names"] == ["0", "1", "2"]
    assert s["scoring"]["texts_scored"] == 60  # the train pairs, scored as the model sees them (text + pair)


def test_a_collapsed_model_is_a_candidate_with_a_warning_and_is_not_packaged(tmp_path, toy_domain, tiny_mlm_dir):
    """Every dev text identical: any model predicts one class there, which is exactly what the
    majority-class baseline scores on a balanced dev set, so nothing beats it."""
    dev = Path(toy_domain.root) / "toy" / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": "the same sentence", "label": lab}) + "\n"
                           for lab in ["pos", "neg", "neu"] * 5), encoding="utf-8")
    cfg = _write_config(tmp_path, toy_domain, tiny_mlm_dir, seeds=[1])
    spec = yaml.safe_load(cfg.read_text())
    spec["strategies"] = [{"kind": "none"}]
    spec["registry"] = {"build_bento": True}
    cfg.write_text(yaml.safe_dump(spec))
    proc = _run(cfg, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(proc.stdout)
    reg = s["registered"]
    assert reg["stage"] == "candidate" and not reg["promoted"]
    assert "baseline" in reg["warning"] and reg["dev_score"] <= reg["baseline"] + 1e-9
    assert s["bento"] == "not built (candidate)"
    bentos = tmp_path / "bento" / "bentos"
    assert not bentos.exists() or not any(bentos.iterdir())


def test_adapt_domain_runs_of_two_domains_feed_one_multi_domain_bento(tmp_path, toy_domain, tiny_mlm_dir):
    """A lora domain and a weight_mask domain, each through `l3m run` with registry.multi_bento:
    each run's summary names the bento of the production versions at its end (none yet: nothing
    built, the run still succeeds), and the bento holds them over their one shared base."""
    from serving import registry

    env = _env(tmp_path)
    summaries = {}
    for name, tuner in (("toy", {"kind": "lora", "lora_lr": 1e-2}), ("toy2", {"kind": "weight_mask", "mask_lr": 1e-2})):
        cfg = _write_config(tmp_path, toy_domain, tiny_mlm_dir, seeds=[1])
        spec = yaml.safe_load(cfg.read_text())
        spec["domain"]["name"] = name
        spec["strategies"], spec["tuners"] = [{"kind": "none"}], [tuner]
        spec["output_dir"] = str(tmp_path / "out" / name)
        spec["registry"] = {"multi_bento": True}
        cfg.write_text(yaml.safe_dump(spec))
        proc = _run(cfg, env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[name] = s = _summary(proc.stdout)
        if name == "toy" and s["registered"]["stage"] != "production":
            # A random 2-layer base with adapters need not beat the majority class in 2 epochs:
            # then nothing is packaged, and the domain is promoted by hand for the second run.
            assert s["multi_bento"] == {"tag": None, "status": "not built (no domain has a production version)",
                                        "domains": {}}
            with _bentoml_home(env):
                registry.promote(s["registered"]["tag"], force=True)
    with _bentoml_home(env):
        want = {n: t for n in summaries if (t := registry.production_tag(n)) is not None}
    assert want["toy"] == summaries["toy"]["registered"]["tag"]
    assert want.get("toy2") == (summaries["toy2"]["registered"]["tag"]
                                if summaries["toy2"]["registered"]["stage"] == "production" else None)
    last = summaries["toy2"]["multi_bento"]
    assert last["status"] == "built" and last["domains"] == want and last["tag"].startswith("l3m_domains:")
    info = yaml.safe_load((tmp_path / "bento" / "bentos" / "l3m_domains" / last["tag"].split(":")[1]
                           / "bento.yaml").read_text())
    packaged = [m["tag"] for m in info["models"]]
    assert sorted(t for t in packaged if not t.startswith("l3m_base:")) == sorted(want.values())
    assert len([t for t in packaged if t.startswith("l3m_base:")]) == 1  # one base for both


def _bentoml_home(env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    from test_serving import env as set_env

    return set_env(BENTOML_HOME=env["BENTOML_HOME"])
