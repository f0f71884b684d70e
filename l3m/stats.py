"""Is one strategy better than another on this test set? A paired bootstrap over test examples.

The unit that is resampled is the test example, pooled across seeds: one resample of example
indices is drawn and applied to every seed of both strategies, so the seed-to-seed variation
of training stays in the statistic (mean over the seeds both strategies have of
``metric(A_seed) - metric(B_seed)``) and the example-to-example variation of the test set is
what the interval measures. Macro-F1 is not a mean over examples, so each resample recomputes
it from per-class counts. Those counts are linear in the resample's per-example multiplicities,
and a run's true positives follow from the gold counts and its misses, so each run only needs
products over the examples it gets wrong (and a permutation swap only over the examples where
the two runs disagree): 10,000 resamples cost a few small matrix products, not a Python loop.

That interval is conditional on the trained seeds. ``seed_test`` asks the other question,
whether the difference holds across seeds: a paired t-test on the per-seed differences.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Metric = Literal["accuracy", "macro_f1"]
# Below this many paired seeds the seed-to-seed variation is too poorly sampled for the interval
# to be more than a hint (the task's agreed threshold for "indicative only").
MIN_SEEDS = 5
INDICATIVE = f"(n seeds < {MIN_SEEDS}: indicative only)"
NO_DIFFERENCE = "no detectable difference"
# Resamples per matrix product: bounds the multiplicity matrix (chunk x examples, float32).
_CHUNK = 250


@dataclass(frozen=True)
class Comparison:
    """A minus B in points (x100) of ``metric``, with the 95% percentile bootstrap interval."""

    a: str
    b: str
    metric: str
    seeds: int
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str
    n_examples: int
    n_boot: int


def verdict(a: str, b: str, ci_low: float, ci_high: float, p_value: float = 0.0, alpha: float = 0.05) -> str:
    """A direction only when the interval excludes 0 *and* the permutation test agrees.

    With few seeds and few examples on which the two runs disagree, the percentile interval can
    exclude 0 while the permutation test does not reject (the bootstrap is anti-conservative
    there); that is reported as no detectable difference, with the reason.
    """
    if ci_low <= 0 <= ci_high:
        return NO_DIFFERENCE
    if p_value >= alpha:
        return f"{NO_DIFFERENCE} (CI excludes 0 but permutation p >= {alpha:g})"
    return f"{a} {'>' if ci_low > 0 else '<'} {b} (CI excludes 0)"


def _one_hot(y: np.ndarray, n_labels: int) -> np.ndarray:
    out = np.zeros((len(y), n_labels), dtype=np.float32)
    out[np.arange(len(y)), y] = 1.0
    return out


def _errors(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Per example (n x 2k): a miss under its gold class, a false alarm under its predicted class."""
    wrong = (gold != pred).astype(np.float32)[:, None]
    return np.concatenate([_one_hot(gold, n_labels) * wrong, _one_hot(pred, n_labels) * wrong], axis=1)


def _score(errors: np.ndarray, gold_c: np.ndarray, n: int, metric: Metric) -> np.ndarray:
    """The metric from a run's summed ``_errors`` (..., 2k) and the gold class counts (..., k).

    As sklearn computes it: macro-F1 averages over the whole label set, and a class with neither
    gold nor predicted examples scores 0 (``zero_division=0`` with ``labels=`` the label set).
    """
    errors, gold_c = errors.astype(np.float64), gold_c.astype(np.float64)
    k = gold_c.shape[-1]
    tp = gold_c - errors[..., :k]
    if metric == "accuracy":
        return tp.sum(-1) / n
    denom = 2 * tp + errors[..., k:] + errors[..., :k]  # predicted + gold
    f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
    return f1.mean(-1)


def _check(gold: np.ndarray, preds: Sequence[np.ndarray], n_labels: int) -> None:
    for y in (gold, *preds):
        if y.shape != gold.shape:
            raise ValueError(f"predictions for {y.shape[0]} examples, gold labels for {gold.shape[0]}")
        if len(y) and (y.min() < 0 or y.max() >= n_labels):
            raise ValueError(f"label ids must lie in [0, {n_labels}), got {y.min()}..{y.max()}")


def metric_value(gold: np.ndarray, pred: np.ndarray, n_labels: int, metric: Metric) -> float:
    """The metric on the full sample (what every resample's statistic is an instance of)."""
    gold, pred = np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    _check(gold, [pred], n_labels)
    return float(_score(_errors(gold, pred, n_labels).sum(0), _one_hot(gold, n_labels).sum(0), len(gold), metric))


def _draws(rng: np.random.Generator, total: int, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of m resamples: how often each example is drawn (m x n) and a fair coin per example.

    One integer in [0, 2n) per draw gives both, independently: its upper part is the drawn
    example, its lowest bit the permutation test's swap of the example in that column.
    """
    for start in range(0, total, _CHUNK):
        m = min(_CHUNK, total - start)
        # 32-bit draws halve the memory traffic; the flat bin index must still fit.
        dtype = np.int32 if 2 * n * m < 2**31 else np.int64
        v = rng.integers(0, 2 * n, size=(m, n), dtype=dtype)
        swaps = (v & 1).astype(np.float32)
        v >>= 1
        np.add(v, (np.arange(m, dtype=dtype) * n)[:, None], out=v)
        yield np.bincount(v.ravel(), minlength=m * n).reshape(m, n).astype(np.float32), swaps


def paired_bootstrap(gold: np.ndarray, a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], n_labels: int,
                     metric: Metric = "macro_f1", names: tuple[str, str] = ("A", "B"), n_boot: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> Comparison:
    """Compare strategy A with B on the seeds both have (``a``/``b``: seed -> predicted label ids).

    ``gold`` holds the test labels every run predicted, in the same order. The returned diff and
    interval are in points; the interval is the percentile interval of the bootstrap
    distribution of the statistic; ``p_value`` is a two-sided paired permutation test (each
    example's A and B predictions swapped by a fair coin, the same swap for every seed) with
    ``n_boot`` permutations.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"{names[0]} and {names[1]} have no seed in common")
    gold = np.asarray(gold, dtype=np.int64)
    pa = [np.asarray(a[s], dtype=np.int64) for s in seeds]
    pb = [np.asarray(b[s], dtype=np.int64) for s in seeds]
    _check(gold, pa + pb, n_labels)
    n, g = len(gold), _one_hot(gold, n_labels)
    err = [_errors(gold, p, n_labels) for p in pa + pb]  # A's seeds, then B's
    wrong = [np.flatnonzero(p != gold) for p in pa + pb]
    # Swapping an example moves B's counts on it into A and A's into B; zero where they agree.
    moves = [(np.flatnonzero(x != y), e_b - e_a) for x, y, e_a, e_b in
             zip(pa, pb, err[:len(seeds)], err[len(seeds):], strict=True)]
    gold_full = g.sum(0)
    full = np.stack([e.sum(0) for e in err])  # runs x 2k
    observed = _score(full, gold_full, n, metric)
    diff = float((observed[:len(seeds)] - observed[len(seeds):]).mean())
    diffs, extreme = [], 0
    for weights, swaps in _draws(np.random.default_rng(seed), n_boot, n):
        per_run = _score(np.stack([weights[:, w] @ e[w] for w, e in zip(wrong, err, strict=True)], axis=1),
                         (weights @ g)[:, None, :], n, metric)  # m x runs
        diffs.append(per_run[:, :len(seeds)].mean(1) - per_run[:, len(seeds):].mean(1))
        moved = np.stack([swaps[:, d] @ delta[d] for d, delta in moves], axis=1)  # m x seeds x 2k
        stat = (_score(full[:len(seeds)] + moved, gold_full, n, metric)
                - _score(full[len(seeds):] - moved, gold_full, n, metric)).mean(1)
        # Ties with the observed value (e.g. identical runs) count as at least as extreme.
        extreme += int((np.abs(stat) >= abs(diff) - 1e-12).sum())
    tail = 100 * (1 - level) / 2
    lo, hi = (float(v) for v in np.percentile(100 * np.concatenate(diffs), [tail, 100 - tail]))
    p_value = (1 + extreme) / (1 + n_boot)
    return Comparison(a=names[0], b=names[1], metric=metric, seeds=len(seeds), diff=100 * diff, ci_low=lo,
                      ci_high=hi, p_value=p_value, verdict=verdict(*names, lo, hi, p_value),
                      n_examples=n, n_boot=n_boot)


@dataclass(frozen=True)
class SeedTest:
    """A minus B across seeds: each seed's difference on the full test set, in points."""

    seeds: int
    diff: float  # mean over the seeds
    ci_low: float  # the t interval of that mean (NaN below two seeds)
    ci_high: float
    p_value: float  # two-sided paired t-test over seeds (NaN below two seeds)
    higher: int  # seeds on which A scores above B
    verdict: str


def seed_test(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("A", "B"), level: float = 0.95,
              alpha: float = 0.05) -> SeedTest:
    """Does A's advantage hold across training seeds? A paired t-test on per-seed differences.

    The bootstrap above is conditional on the trained seeds: it asks whether these runs differ on
    this test set. Here the unit is the seed (``a[i]`` / ``b[i]``: the two strategies' metric for
    the same seed, which shares their train subsample and data order), so the question is whether
    another seed would be expected to show the difference too. A paired t-test, not a sign-flip or
    Wilcoxon test: with 5 seeds those have 2^5 equally likely sign patterns, so their smallest
    two-sided p is 1/16 and they could never detect anything at 0.05.
    """
    from scipy import stats as sps

    if len(a) != len(b):
        raise ValueError(f"{len(a)} seeds of {names[0]} but {len(b)} of {names[1]}: pair them by seed")
    d = 100 * (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    n, mean = len(d), float(d.mean()) if len(d) else 0.0
    higher = int((d > 0).sum())
    nan = float("nan")
    if n < 2:
        return SeedTest(n, mean, nan, nan, nan, higher, "not tested (one seed)")
    sd = float(d.std(ddof=1))
    if sd <= 1e-9 * max(1.0, abs(mean)):  # the same difference every seed (up to float noise)
        return SeedTest(n, mean, mean, mean, nan, higher, "not tested (no spread across seeds)")
    se = sd / n**0.5
    p = float(2 * sps.t.sf(abs(mean) / se, n - 1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * se
    lo, hi = mean - half, mean + half
    if p >= alpha:
        verdict = f"{NO_DIFFERENCE} across seeds"
    else:
        verdict = f"{names[0]} {'>' if mean > 0 else '<'} {names[1]} across seeds"
    return SeedTest(n, mean, lo, hi, p, higher, verdict)
