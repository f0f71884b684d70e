"""Scorer keys: what identifies a set of scores, so a changed model or setting invalidates them.

A key is readable (model name, metric, length, mode) plus a hash over everything that changes a
score: the model weights (file contents for a local model; the hub revision otherwise), the
tokenizer files, the metric, max_length, mode and (strided only) the stride. The compute dtype
is deliberately not part of it: it changes scores by rounding only (docs/scoring.md gives the
measured size), and consumers look scores up without knowing which device produced them.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

# The tokenizer file patterns and the cached file digest live with the base files (light, and
# packaged into bentos, which hash a compact domain's base): re-exported here for the score keys.
from l3m.basefiles import TOKENIZER_PATTERNS, file_digest

# Files whose bytes define a model's weights / its tokenizer, in a local model directory.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.h5", "*.msgpack", "config.json")
HUB_TIMEOUT_S = 10.0
# Part of every score key: bumped when the scoring code computes different scores for the same
# model, text and settings (stored scores then recompute). SCORING_CODE pins the code the version
# was set against; tests/test_scoring_store.py fails on any change to these modules until it is
# pinned again (``scoring_code_drift`` says how).
SCORING_VERSION = 1
SCORING_CODE = {"version": 1, "digest": "8ad4b88abfdedffe9dae2bc8e7b47176733b828e996e7cf85c165dbf844d29e1"}
SCORING_MODULES = ("plans.py", "engine.py", "packed.py", "generic.py", "heads.py", "onednn.py")




def model_fingerprint(model_path_or_name: str, revision: str | None = None) -> dict[str, str]:
    """Digests of the weight and tokenizer files (local dir) or the hub id + revision."""
    p = Path(model_path_or_name)
    if p.is_dir():
        weights = sorted({f for pat in WEIGHT_PATTERNS for f in p.glob(pat) if f.is_file()})
        if not any(f.name != "config.json" for f in weights):
            raise FileNotFoundError(f"no weight files in model directory {p}")
        tok = sorted({f for pat in TOKENIZER_PATTERNS for f in p.glob(pat) if f.is_file()})
        return {
            "weights": _combine({f.name: file_digest(f) for f in weights}),
            "tokenizer": _combine({f.name: file_digest(f) for f in tok}),
        }
    # A hub id: the commit the revision resolves to pins weights and tokenizer together, so a
    # new commit on "main" gives new keys. Unresolvable (offline and not cached) is recorded as such.
    rev = revision or "main"
    commit = hub_commit(model_path_or_name, rev)
    if commit is None:
        return {"hub": model_path_or_name, "revision": rev, "commit": "unresolved"}
    return {"hub": model_path_or_name, "commit": commit}  # "main" today and its commit pinned: one model


@lru_cache(maxsize=32)
def hub_commit(repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` of a hub model resolves to, as loading resolves it: the hub's answer
    when online, else the local cache's ref (what an offline ``from_pretrained`` loads).

    Asked once per process: planning takes a run's identity many times, and one experiment must
    not see two commits of "main" (its runs would disagree with their plan)."""
    from huggingface_hub import constants

    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    cached = ref.read_text().strip() if ref.is_file() else None
    if constants.is_offline_mode():
        return cached
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S).sha or cached
    except Exception:  # noqa: BLE001 - no network or no such repo: the cache's answer, if any
        return cached


def _combine(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def scorer_key(
    model_path_or_name: str,
    revision: str | None,
    metric: str,
    max_length: int,
    mode: str = "exact",
    stride: int = 4,
) -> str:
    """``<model>.<metric>.L<max_length>.<mode>[k<stride>].<hash16>``, e.g.
    ``minilm-l6-mlm.within_word_l2r.L128.exact.3f0c...``. Safe as a directory name."""
    fp = model_fingerprint(str(model_path_or_name), revision)
    spec = {"model": fp, "metric": metric, "max_length": int(max_length), "mode": mode, "code": SCORING_VERSION}
    if mode == "strided":
        spec["stride"] = int(stride)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_\-]+", "-", Path(str(model_path_or_name).rstrip("/")).name)[:40]
    mode_tag = f"strided{int(stride)}" if mode == "strided" else mode
    return f"{name}.{metric}.L{int(max_length)}.{mode_tag}.{digest}"


def scoring_code_drift(root: Path | None = None) -> str | None:
    """None when the scoring modules are the code SCORING_VERSION was pinned against, else what to do."""
    from l3m.identity import code_digest

    now = {"version": SCORING_VERSION, "digest": code_digest(root or Path(__file__).parent, SCORING_MODULES)}
    if now == SCORING_CODE:
        return None
    return (f"the scoring code ({', '.join(SCORING_MODULES)} under l3m/scoring/) is not the code SCORING_VERSION "
            f"{SCORING_CODE['version']} was pinned against. If the change alters any score (masks, word boundaries, "
            "batching that is not exact, the head), bump SCORING_VERSION in l3m/scoring/keys.py with a line saying "
            f"why (stored scores then recompute); then set SCORING_CODE = {now}.")


def item_key(scorer: str, text: str, text_pair: str | None) -> str:
    """Content hash of (scorer key, text, text_pair); a None pair differs from an empty one."""
    payload = json.dumps([scorer, text, text_pair], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
