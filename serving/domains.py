"""Many domains in one process: one resident copy of each base, each domain's own tensors only.

A compact domain (``weight_mask`` or ``lora``, ``serving.bases``) is rebuilt by its tuner into a
whole classifier; ``share_base`` then points every tensor equal to its base's at one resident
copy of that base (``BasePool``), so the rebuilt copy's duplicate is freed as soon as loading
returns. What stays per domain:

* ``lora``: the adapters and the extras (head, the pooler the MLM checkpoint lacks); peft keeps
  the adapted linear as ``<name>.base_layer``, which is the base's tensor, unmerged;
* ``weight_mask``: each masked linear becomes ``SharedMaskedLinear``, the base's weight and a
  boolean mask multiplied per forward pass (1 byte per masked weight resident, a quarter of a
  float32 copy; the product is exactly the merged weight the tuner's rebuild computed);
* a full or Child-Tuned domain shares what happens to equal the base and owns the rest.

``DomainSet`` is what a multi-domain service serves: the production version of each wanted
domain (or of every domain in the registry), re-read when the registry's ledger changes. A new
version is loaded beside the old one and swapped in one reference assignment, so a request
that already holds the old ``Served`` finishes on it; every swap is logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from serving.bases import BaseRef, read_ref
from serving.model_io import ModelDirError, ModelMeta, load_classifier

logger = logging.getLogger("l3m.serving")

PathOf = Callable[[str], "str | Path"]


class UnknownDomain(LookupError):
    """A request for a domain the service does not serve (404), or none when several are."""

    def __init__(self, message: str, served: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.served = served


class SharedMaskedLinear(nn.Module):
    """A masked linear over a shared base weight: ``x (W * mask)^T + b``, the mask applied per call."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def _base_name(name: str) -> str:
    # peft keeps an adapted linear as ``<name>.base_layer``: the plain classifier's name.
    return name.replace(".base_layer.", ".")


class BasePool:
    """One resident copy of each base's tensors (classifier names), loaded on first use."""

    def __init__(self, path_of: PathOf) -> None:
        self.path_of = path_of
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def tensors(self, ref: BaseRef, domain_dir: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            if ref.tag not in self._tensors:
                from transformers import AutoConfig

                from l3m.tuning.compact import load_base

                base = load_base(self.path_of(ref.tag), AutoConfig.from_pretrained(str(domain_dir)))
                self._tensors[ref.tag] = {k: v.detach() for k, v in base.state_dict().items()}
                logger.info("base %s (%s) resident once for its domains", ref.tag, ref.name)
            return self._tensors[ref.tag]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pool in self._tensors.values() for t in pool.values())


def mask_views(model: nn.Module, domain_dir: Path, shared: dict[str, torch.Tensor]) -> None:
    """Replace a weight_mask domain's merged linears by the base's weight and the stored mask."""
    from safetensors.torch import load_file

    from l3m.tuning.compact import read_meta
    from l3m.tuning.packing import unpack_mask
    from l3m.tuning.weight_mask import MASK_FILE

    path = domain_dir / MASK_FILE
    tensors = load_file(str(path))
    for name, shape in read_meta(path)["shapes"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ModelDirError(f"{path}: {name} is a {type(linear).__name__} after the rebuild, not a linear")
        parent, _, child = name.rpartition(".")
        mask = unpack_mask(tensors[f"mask/{name}"], shape)
        # A masked layer the base lacks or that was trained (the head) is unmasked in the extras.
        weight = tensors.get(f"extra/{name}.weight", shared[f"{name}.weight"])
        view = SharedMaskedLinear(weight, linear.bias, mask)
        setattr(model.get_submodule(parent) if parent else model, child, view)


def share_base(model: nn.Module, shared: dict[str, torch.Tensor]) -> None:
    """Point every parameter and buffer of ``model`` equal to the base's at the base's tensor."""
    with torch.no_grad():
        for prefix, module in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                slots: dict[str, Any] = getattr(module, kind)
                for local, value in slots.items():
                    if value is None:
                        continue
                    base = shared.get(_base_name(f"{prefix}.{local}" if prefix else local))
                    if base is None or base.data_ptr() == value.data_ptr() or base.shape != value.shape \
                            or base.dtype != value.dtype or not torch.equal(base, value):
                        continue
                    if isinstance(value, nn.Parameter):
                        value.data = base
                    else:
                        slots[local] = base


def owned_bytes(model: nn.Module, shared: dict[str, torch.Tensor]) -> int:
    """Bytes of ``model``'s tensors that are not the base's resident ones."""
    pooled = {t.data_ptr() for t in shared.values()}
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in pooled or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class Served:
    """One served domain: its registry version and the loaded classifier."""

    tag: str
    meta: ModelMeta
    model: Any
    tokenizer: Any
    path: Path
    owned_bytes: int  # resident bytes of its own (what is not its base's)


def load_served(tag: str, path: Path, pool: BasePool) -> Served:
    """A store entry as a ``Served``: a compact domain over its base's resident tensors."""
    model, tokenizer, meta = load_classifier(path, pool.path_of)
    ref = read_ref(path)
    if ref is None:
        return Served(tag, meta, model, tokenizer, path, owned_bytes(model, {}))
    shared = pool.tensors(ref, path)
    if meta.tuner == "weight_mask":
        mask_views(model, path, shared)
    share_base(model, shared)
    return Served(tag, meta, model, tokenizer, path, owned_bytes(model, shared))


def encoder_key(served: Served, max_chars: int) -> str:
    """What a version's request encoding depends on: its tokenizer files' contents, max_length
    and the text bound (``max_chars``). Versions with one key (every domain over one base,
    typically) can share one set of tokenizers instead of loading their own."""
    from l3m.basefiles import TOKENIZER_PATTERNS, files_digest

    files = sorted({f for pat in TOKENIZER_PATTERNS for f in Path(served.path).glob(pat) if f.is_file()})
    return f"{files_digest(files)}:{served.meta.max_length}:{max_chars}"


def ledger_stamp() -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of the ledger: a refresh only re-reads it when this changes."""
    from serving.ledger import LEDGER_FILE
    from serving.registry import registry_home

    try:
        st = (registry_home() / LEDGER_FILE).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class DomainSet:
    """The production version of each wanted domain (None: every domain in the registry), or
    the fixed ``packaged`` versions a multi-domain bento was built with (no ledger is read).

    ``refresh`` loads what the ledger names and the set does not hold yet, then swaps it in;
    ``get`` is what a request uses. Reads need no lock: ``_served`` is replaced, never mutated.
    """

    def __init__(self, wanted: list[str] | None, path_of: PathOf, model_path: Callable[[str], Path],
                 packaged: dict[str, str] | None = None) -> None:
        self.wanted = wanted
        self.packaged = packaged
        self.pool = BasePool(path_of)
        self.model_path = model_path
        self._served: dict[str, Served] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._failed: dict[str, str] = {}  # domain -> tag that failed to load (not retried until it changes)
        self._refresh_lock = threading.Lock()

    @property
    def served(self) -> dict[str, Served]:
        return self._served

    def names(self) -> list[str]:
        return sorted(self._served)

    def get(self, domain: str | None) -> Served:
        served = self._served
        if domain is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise UnknownDomain(f"several domains are served; name one in 'domain': {sorted(served)}", sorted(served))
        if domain not in served:
            raise UnknownDomain(f"domain {domain!r} is not served; served: {sorted(served)}", sorted(served))
        return served[domain]

    def refresh(self, force: bool = False, prepare: Callable[[Served], None] | None = None) -> list[str]:
        """Load and swap in every changed production version; the swaps made, one line each.
        ``prepare`` runs on a loaded version before it is swapped in (the service warms it up)."""
        with self._refresh_lock:
            stamp = (0, 0, 0) if self.packaged is not None else ledger_stamp()
            if stamp == self._stamp and not force:
                return []
            self._stamp = stamp
            if self.packaged is not None:
                tags = dict(self.packaged)
            else:
                from serving.registry import production_tags

                tags = production_tags()
            missing = [d for d in self.wanted or [] if d not in tags]
            if missing:
                logger.warning("no production version in the registry for %s", missing)
            swaps = []
            for domain, tag in sorted(tags.items()):
                if self.wanted is not None and domain not in self.wanted:
                    continue
                current = self._served.get(domain)
                if (current is not None and current.tag == tag) or self._failed.get(domain) == tag:
                    continue
                try:
                    new = load_served(tag, self.model_path(tag), self.pool)
                    if prepare is not None:
                        prepare(new)
                except Exception:  # noqa: BLE001 - one broken version must not take the others down
                    logger.exception("domain %s: version %s failed to load; still serving %s", domain, tag,
                                     current.tag if current else "nothing")
                    self._failed[domain] = tag
                    continue
                self._served = {**self._served, domain: new}
                line = f"domain {domain}: {current.tag if current else '(new)'} -> {tag}"
                logger.info("swap %s (%d own bytes resident)", line, new.owned_bytes)
                swaps.append(line)
            return swaps
