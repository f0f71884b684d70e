"""N processes train the one-process run (issue 23, item 2), the parts testable in one process.

The launch itself (torchrun, two processes against one) is tests/test_scale_ddp.py (slow).
"""

from __future__ import annotations

import contextlib

import pytest
from test_masking import _features, tok  # noqa: F401  (fixture)

from l3m import experiment
from l3m.config import MaskingSpec
from l3m.distributed import per_rank_batch
from l3m.masking import MaskingCollator, build_masking
from l3m.masking.collator import EXAMPLE_ID, MASKING_COUNTS


def test_the_global_batch_is_split_over_the_processes():
    assert per_rank_batch(16, 1, 1) == (16, 1)
    assert per_rank_batch(64, 2, 2) == (64, 1)  # accumulation splits first: the per-device batch is kept
    assert per_rank_batch(10, 1, 2) == (5, 1)
    assert per_rank_batch(64, 3, 4) == (16, 3)
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        per_rank_batch(6, 1, 4)


def _pool_collator(tok, seed=3):  # noqa: F811
    pool = [{**f, EXAMPLE_ID: 100 + i} for i, f in enumerate(_features(tok, seed=7) * 3)]
    return MaskingCollator(tok, build_masking(MaskingSpec(kind="random", rate=0.3)), seed=seed, mlm_pool=pool,
                           independent_mlm=True)



def test_pool_draws_are_keyed_per_example_so_ranks_split_one_batch(tok):  # noqa: F811
    feats = [{**f, EXAMPLE_ID: i} for i, f in enumerate(_features(tok))]
    half = len(feats) // 2
    one = _pool_collator(tok)(feats)  # one process: the whole step's batch
    rank0, rank1 = _pool_collator(tok)(feats[:half]), _pool_collator(tok)(feats[half:])  # two ranks
    # Same MLM texts, masked alike: the ranks' MLM rows together are the one process's rows.
    width = one["mlm_input_ids"].shape[1]
    assert rank0["mlm_input_ids"].shape[1] <= width and rank1["mlm_input_ids"].shape[1] <= width

    def unpadded(out):
        keep = out["mlm_attention_mask"].bool()
        return sorted((tuple(i[m].tolist()), tuple(lab[m].tolist()))
                      for i, lab, m in zip(out["mlm_input_ids"], out["mlm_labels"], keep, strict=True))

    assert sorted(unpadded(rank0) + unpadded(rank1)) == unpadded(one)
    # Rank-distinct: another rank's examples draw other texts or masks; a resumed batch the same ones.
    assert unpadded(rank0) != unpadded(rank1)
    assert unpadded(_pool_collator(tok)(feats[:half])) == unpadded(rank0)
    # The counts travel with the batch for the trainer to record once per trained batch.
    assert one[MASKING_COUNTS][0] == rank0[MASKING_COUNTS][0] + rank1[MASKING_COUNTS][0]
    assert one[EXAMPLE_ID].tolist() == list(range(len(feats)))


def test_under_torchrun_rank_zero_takes_the_run_lock_and_decides(monkeypatch, tmp_path):
    taken, decided = [], []

    @contextlib.contextmanager
    def exclusive(path):
        taken.append(path.name)
        yield

    monkeypatch.setattr(experiment, "exclusive", exclusive)
    monkeypatch.setattr(experiment, "process_group", lambda: None)
    monkeypatch.setattr(experiment, "_run_unlocked", lambda *a: decided.append(a[1].name))
    key = experiment.RunKey("none", "full", 1, "ab" * 32)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for r in ("0", "1"):
        monkeypatch.setenv("RANK", r)
        experiment.run_planned(None, key, None, tmp_path)  # type: ignore[arg-type]
    assert taken == [f"{key.name}.lock"] and decided == [key.name, key.name]


def test_nproc_that_cannot_split_the_global_batch_is_refused_before_launch(tmp_path, toy_domain):
    import yaml

    from flows.train import torchrun_train
    from l3m.config import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"domain": toy_domain(), "training": {"batch_size": 6, "grad_accum": 1}}))
    with pytest.raises(ConfigError, match="does not split over 4 processes"):
        torchrun_train(path, [], 4)
