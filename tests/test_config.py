import os
from pathlib import Path

import pytest

from l3m.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "domains").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_domain_configs_load(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.domain.name == path.stem
    assert "train" in cfg.domain.splits


def test_unknown_key_is_rejected_with_its_location(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("domain:\n  name: x\n  splits: {train: {path: a.jsonl}}\n  txt_field: body\n")
    with pytest.raises(ConfigError, match=r"domain\.txt_field: Extra inputs are not permitted"):
        load_config(p)


def test_overrides_are_parsed_as_yaml(tmp_path: Path):
    cfg = load_config(ROOT / "domains" / "citation_intent.yaml",
                      ["training.seeds=[1,2,3]", "model.max_length=64", "scoring.mode=strided"])
    assert cfg.training.seeds == [1, 2, 3]
    assert cfg.model.max_length == 64
    assert cfg.scoring.mode == "strided"


def test_bad_override_value_names_the_key():
    with pytest.raises(ConfigError, match="model.max_length"):
        load_config(ROOT / "domains" / "citation_intent.yaml", ["model.max_length=2"])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_run_config_may_point_at_a_domain_file(tmp_path: Path):
    run = tmp_path / "run.yaml"
    run.write_text(f"domain: {ROOT / 'domains' / 'chemprot.yaml'}\ntraining: {{seeds: [7]}}\n")
    cfg = load_config(run)
    assert cfg.domain.name == "chemprot" and cfg.training.seeds == [7]


def test_model_name_resolves_to_shared_models_or_stays_a_hub_id(shared_model):
    cfg = load_config(ROOT / "domains" / "citation_intent.yaml")
    assert Path(cfg.model.resolved()).resolve() == shared_model.resolve()
    cfg2 = load_config(ROOT / "domains" / "citation_intent.yaml", ["model.name_or_path=roberta-base"])
    assert cfg2.model.resolved() == "roberta-base"


def test_flows_give_the_ephemeral_prefect_server_time_to_create_its_database(tmp_path):
    """A new PREFECT_HOME migrates a fresh SQLite database on the first command: more than
    Prefect's default 20 s startup timeout on slow hosts. Importing flows raises it, unless set."""
    import subprocess
    import sys

    code = ("import flows, prefect.settings as s; "
            "print(s.get_current_settings().server.ephemeral.startup_timeout_seconds)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    env["PREFECT_HOME"] = str(tmp_path / "fresh-home")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) >= 120
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "45"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == 45


def test_a_misspelt_check_name_in_severity_is_an_error_naming_the_checks(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("name: d\nsplits: {train: {path: t.jsonl}}\nvalidation: {severity: {train_test_leakge: warning}}\n")
    with pytest.raises(ConfigError, match=r"validation.severity: .*unknown check\(s\) \['train_test_leakge'\].*train_test_leakage"):
        load_config(p)
    p.write_text("name: d\nsplits: {train: {path: t.jsonl}}\nvalidation: {severity: {train_test_leakage: warning}}\n")
    assert load_config(p).domain.validation.severity == {"train_test_leakage": "warning"}


def test_every_shipped_run_config_loads_and_the_paper_profiles_hold_the_authors_recipe():
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    runs = [p for p in paths if not p.name.endswith(".raw.yaml")]
    assert len(runs) >= 5
    for p in runs:
        load_config(p)
    for name, steps in (("citation_intent", 1950), ("chemprot", 4800)):
        for model in ("roberta", "minilm"):
            cfg = load_config(ROOT / "configs" / "paper" / f"{name}-{model}.yaml")
            t = cfg.training
            assert cfg.domain.name == name and cfg.weighting.kind == "meta_tartan" and cfg.model.head == "authors"
            assert (t.max_steps, t.batch_size * t.grad_accum, t.lr, t.head_lr, t.head_weight_decay) == (
                steps, 128, 1e-4, 1e-3, 0.1)
            assert (t.adam_beta2, t.adam_epsilon, t.eval_steps, t.early_stopping_patience) == (0.98, 1e-6, 30, 20)
            assert t.stage2 is not None and (t.stage2.lr, t.stage2.epochs, t.stage2.patience) == (5e-6, 10, 3)
            assert t.mlm_batch == "independent" and len(t.seeds) >= 5
            assert not any(cfg.domain.cleaning.model_dump().values())  # the raw standard splits
