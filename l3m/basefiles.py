"""The files that define a base model and their content digest: what a compact domain is pinned to.

A ``weight_mask`` or ``lora`` domain (``l3m.tuning.compact``) is only the trained model when it
is applied to the base it was trained on. Training records the digest of that base in the domain
file (``base_digest``); the registry (``serving.bases``) recomputes it before storing the domain
and stores the base under it. The files: safetensors weights, config and tokenizer files (the
patterns below, which the score keys use too); the digest a sha256 over their names and contents, so the
same files under two names or paths are one base. Light on purpose (no torch): the registry
imports it for every registration.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

# Safetensors only (a store holds no pickle), with the config. Other formats a hub clone carries
# (.bin, .h5, .msgpack) are not part of a base.
BASE_WEIGHTS = ("config.json", "model*.safetensors", "model.safetensors.index.json")
# Every file a tokenizer of any family may load: tokenizer.json and its configs, WordPiece /
# byte-level BPE vocabularies and merges, and the SentencePiece models under each family's name
# (spm.model, spiece.model, sentencepiece.bpe.model, tokenizer.model) and tiktoken files.
TOKENIZER_PATTERNS = (
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab*.txt",
    "vocab*.json",
    "merges*.txt",
    "bpe.codes",  # BERTweet and PhoBERT's BPE merges
    "*.model",
    "*.tiktoken",
)
_CHUNK = 1 << 20


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; cached on (path, size, mtime) so a process hashes each model once."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def base_files(model_dir: Path) -> list[Path]:
    """The files of a base model directory that define it; FileNotFoundError without safetensors."""
    files = sorted({f for pat in (*BASE_WEIGHTS, *TOKENIZER_PATTERNS) for f in model_dir.glob(pat) if f.is_file()})
    if not any(f.suffix == ".safetensors" for f in files):
        raise FileNotFoundError(f"base model {model_dir}: no safetensors weights; the registry stores no pickle "
                                "checkpoint (convert it with save_pretrained)")
    return files


def files_digest(files: list[Path]) -> str:
    """sha256 over the files' names and contents (order-free): a base's content digest. Each
    file's digest is cached on (path, size, mtime), so a base is hashed once a process."""
    parts = "".join(f"{f.name}\0{file_digest(f)}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(parts.encode()).hexdigest()


def base_dir(location: str | Path, revision: str | None = None) -> Path | None:
    """The local directory of a base: ``location`` itself, or a hub id's cached snapshot at
    ``revision``; None when it is not on this machine."""
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(location), revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a repo id, ...: all mean "not here"
        return None


def base_digest(location: str | Path, revision: str | None = None) -> str | None:
    """The content digest of the base at ``location`` (see the module doc); None when it is not
    on this machine or has no safetensors weights (nothing a registry could store)."""
    found = base_dir(location, revision)
    if found is None:
        return None
    try:
        return files_digest(base_files(found))
    except OSError:
        return None
