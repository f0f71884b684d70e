"""Compact domains in the registry: one stored copy of each base model, shared by its domains.

A ``weight_mask`` or ``lora`` model is a frozen base plus a small domain file (bit-packed masks
or adapters, the trained head and what the base checkpoint lacks: ``l3m.tuning.compact``).
Registering one stores:

* the base once, as ``l3m_base:<content digest prefix>`` in the same BentoML store: its weight,
  config and tokenizer files (the patterns of ``l3m.scoring.keys``), the digest a sha256 over
  their names and contents (``l3m.basefiles``), so the same files under two names or paths are
  one base. Not an ``l3m-`` name: the registry's domain listing does not see it. A domain file
  records the digest of the base it was trained on; a base that no longer has it is refused
  (``check_base``);
* the domain's directory without the merged full weights a ``weight_mask`` run also wrote,
  plus ``base.json``: ``{"tag", "digest", "name", "files"}`` of its base.

Loading (``load_model``) resolves the reference through a ``tag -> path`` lookup (the registry's
store by default; the service passes BentoML's active store, which inside a bento is the bento's
own), checks the base's digest, and lets the tuner rebuild the classifier exactly. Every other
tuner's model (full, Child-Tuning) is stored and loaded as before: full weights, no base. A
multi-domain service can read ``base.json`` of each domain and load each base once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from l3m import basefiles
from serving.model_io import ModelDirError, ModelMeta

BASE_NAME = "l3m_base"
BASE_REF = "base.json"
PathOf = Callable[[str], "str | Path"]


@dataclass(frozen=True)
class BaseRef:
    """Where a compact domain's base lives in the store, and what its files must hash to."""

    tag: str
    digest: str
    name: str
    files: list[str]  # the base's files the digest covers, in the store entry

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def domain_file(meta: ModelMeta) -> str | None:
    """The file ``meta``'s tuner stores a domain in over a shared base (weight_mask, lora), else None."""
    from l3m.tuning.trained import domain_file_of  # torch and transformers: not for every registry call

    return domain_file_of(meta.raw)


def is_compact(meta: ModelMeta) -> bool:
    return domain_file(meta) is not None


def base_files(model_dir: Path) -> list[Path]:
    """The files of a base model directory that define it (``l3m.basefiles``): safetensors
    weights, config, tokenizer; stored as the registry stores every model (no pickle)."""
    try:
        return basefiles.base_files(model_dir)
    except FileNotFoundError as e:
        raise ModelDirError(str(e)) from e


def local_base(meta: ModelMeta) -> Path:
    """The directory of the base ``meta`` was trained from (a hub id: its cached snapshot at
    the run's ``model.revision``)."""
    from l3m.tuning.trained import base_location, base_revision

    location = base_location(meta.raw)
    found = basefiles.base_dir(location, base_revision(meta.raw))
    if found is None:
        raise ModelDirError(f"base model {meta.base_model!r} of this {meta.tuner} model is not on this machine "
                            f"({location}): a compact domain is stored with a reference to its base, which must be "
                            f"there once; set L3M_MODEL_ROOT or fetch the model")
    return found


def check_base(meta: ModelMeta, src: Path) -> None:
    """Refuse a compact domain whose base is no longer the one it was trained on: its domain
    file records the base's digest (``base_digest``), compared here with the digest of the base
    registering would store. A domain file without one (written before it was recorded, or over
    a base training could not hash) is not checked."""
    name = domain_file(meta)
    if name is None or not (src / name).is_file():
        return  # a full model; a compact one without its domain file is refused by copy_model_dir
    from l3m.tuning.compact import read_meta

    trained = read_meta(src / name).get("base_digest")
    if not trained:
        return
    base = local_base(meta)
    now = basefiles.files_digest(base_files(base))
    if now != trained:
        raise ModelDirError(
            f"{src}: its base model {base} has changed since this {meta.tuner} model was trained (content digest "
            f"now {now}, trained on {trained}): its {name} applied to this base would not be the trained "
            f"classifier. Put the base it was trained on back at {base} (or point model.name_or_path / "
            f"L3M_MODEL_ROOT at a copy of it), or retrain the model over the current base")


def store_base(meta: ModelMeta, store: Any) -> BaseRef | None:
    """The base of a compact model, copied into ``store`` unless it is there already; None
    for a model stored with full weights."""
    if not is_compact(meta):
        return None
    import bentoml
    from bentoml.exceptions import NotFound

    files = base_files(local_base(meta))
    content = basefiles.files_digest(files)
    ref = BaseRef(f"{BASE_NAME}:{content[:32]}", content, meta.base_model, [f.name for f in files])
    try:
        bentoml.models.get(ref.tag, _model_store=store)
        return ref  # stored once: shared by every domain over this base
    except NotFound:
        pass
    with bentoml.models.create(ref.tag, labels={"kind": "base"}, metadata={"digest": content, "name": ref.name},
                               _model_store=store) as model:
        for f in files:
            shutil.copy2(f, Path(model.path) / f.name)
    return ref


def copy_model_dir(src: Path, dest: Path, ref: BaseRef | None, meta: ModelMeta) -> None:
    """Copy a trained model directory into a store entry; a compact one without its merged
    full weights and with its base reference."""
    if ref is not None and (name := domain_file(meta)) and not (src / name).is_file():
        raise ModelDirError(f"{src}: a compact model without its domain file {name}: nothing to rebuild it from")
    for item in src.iterdir():
        target = dest / item.name
        if ref is not None and item.name.startswith("model") and item.suffix == ".safetensors":
            continue  # the merged copy: rebuilt from the base + the domain file instead
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    if ref is not None:
        (dest / BASE_REF).write_text(json.dumps(ref.to_dict(), indent=2))


def read_ref(model_dir: str | Path) -> BaseRef | None:
    path = Path(model_dir) / BASE_REF
    if not path.is_file():
        return None
    try:
        return BaseRef(**json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise ModelDirError(f"{path}: not a base reference ({{tag, digest, name, files}}): {e}") from e


def registry_path(tag: str) -> Path:
    """A store entry's path in the registry's store (``BENTOML_HOME``)."""
    from serving.registry import model_path

    return model_path(tag)


def load_model(model_dir: str | Path, path_of: PathOf | None = None) -> Any:
    """The classifier of a model directory or store entry (eval mode): full weights, or a compact
    domain rebuilt over its base; a store entry's base is found with ``path_of`` (tag -> path)."""
    from l3m.tuning.trained import load_trained

    root = Path(model_dir)
    ref = read_ref(root)
    if ref is None:
        if not (root / "config.json").is_file():
            raise ModelDirError(f"{root}: no config.json (save_pretrained output expected)")
        return load_trained(root)  # a run directory: full weights, or a lora run over its named base
    base = Path((path_of or registry_path)(ref.tag))
    missing = [name for name in ref.files if not (base / name).is_file()]
    if missing:
        raise ModelDirError(f"{root}: its base {ref.tag} ({ref.name}) lacks {missing} in the store at {base}")
    found = basefiles.files_digest([base / name for name in ref.files])
    if found != ref.digest:
        raise ModelDirError(f"{root}: its base {ref.tag} ({ref.name}) has changed in the store (files digest "
                            f"{found[:12]}, registered {ref.digest[:12]}): the domain would not be the trained one")
    return load_trained(root, base=base)
