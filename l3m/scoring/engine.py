"""PLL scoring engine: masked copies of many texts, batched under a token budget.

Scores follow Salazar et al. (2020), PLL(x) = sum_i log P(x_i | x_{\\i}), per token, with the
masking of the chosen metric (see ``plans``). Execution:

* copies of all texts are sorted by length (length bucketing) and cut into batches of at most
  ``token_budget`` tokens; a long text's copies are split over several batches, so memory is
  bounded by the budget, not by the text (a 512-token text has 510 copies = 261k tokens);
* the scorer picks its path (``path`` / ``path_reason`` say which and why): BERT-layout models
  with a known head run the padding-free ``PackedEncoder``; every other masked LM runs the
  generic path, the model's own forward on length-sorted padded batches (``generic``). Either
  way the MLM head runs at target rows only;
* ``torch.inference_mode``; low-precision dtypes follow autocast's rule; SDPA attention.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from l3m.quiet import quiet_loading_bars
from l3m.scoring import onednn
from l3m.scoring.generic import TargetForward, max_target_rows
from l3m.scoring.heads import MLMHead, resolve_head
from l3m.scoring.packed import Group, PackedEncoder, packed_unsupported
from l3m.scoring.plans import EncodedText, Item, Metric, Mode, Plan, encode, make_plan, normalise_items

quiet_loading_bars()  # no per-load 'Loading weights' bar (l3m.quiet)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Progress = Callable[[int, int], None]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 (else float16) on CUDA, float32 on CPU, where exact parity is the default.

    A low precision asked for on a CPU without a kernel for it becomes float32 (logged).
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    if device.type == "cpu":
        return onednn.cpu_dtype(DTYPES[dtype], "scoring")
    return DTYPES[dtype]


@dataclass
class _Unit:
    """Rows r0:r1 of one text's plan: the piece of work that goes into one batch."""

    text: int
    r0: int
    r1: int
    length: int


@dataclass
class EngineStats:
    """Counters of what the engine ran (tests read ``forward_batches``; benchmarks the rest)."""

    forward_batches: int = 0
    copies: int = 0
    copy_tokens: int = 0  # tokens through the encoder, padding excluded
    padded_tokens: int = 0  # tokens through the encoder, padding included
    max_batch_tokens: int = 0  # largest batch (padding included): what bounds memory
    targets: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class PLLScorer:
    """Frozen masked LM + tokenizer that scores token PLLs.

    ``model`` is a path or hub id (loaded with ``AutoModelForMaskedLM``) or a loaded module (then
    pass ``tokenizer``). ``packed=False`` forces the generic path (used to cross-check).
    """

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        packed: bool = True,
        threads: int | None = None,
    ) -> None:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.device = resolve_device(device)
        self.compute_dtype = resolve_dtype(dtype, self.device)
        if threads:
            torch.set_num_threads(threads)
        self.name = model if isinstance(model, str) else type(model).__name__
        self.revision = revision
        net: nn.Module
        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, revision=revision)
            net = AutoModelForMaskedLM.from_pretrained(model, revision=revision, dtype=torch.float32)
        else:
            net = model
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token: not a masked LM")
        self.tokenizer = tokenizer
        # Any: a transformers masked LM (``base_model``, ``config``), which nn.Module does not declare.
        self.model: Any = net.to(self.device).eval()
        self.packed: PackedEncoder | None = None
        self.head: MLMHead | None = None
        self.generic: TargetForward | None = None
        why_not = "packed=False" if not packed else packed_unsupported(net)
        if why_not is None and resolve_head(net) is None:
            why_not = f"{type(net).__name__}: no known MLM head"
        if why_not is None:
            self.head = MLMHead(self.model, self.compute_dtype)
            self.packed = PackedEncoder(self.model, self.compute_dtype, mask_token_id=tokenizer.mask_token_id)
            self.path = "packed"
            self.path_reason = f"{type(net).__name__}: BERT-layout encoder, absolute positions, known MLM head"
        else:
            self.generic = TargetForward(self.model, self.compute_dtype, self.vocab_size)
            self.path = "generic" if self.generic.hooked else "generic-full-logits"
            self.path_reason = f"{self.generic.reason} (packed path: {why_not})"
        self.max_targets = None if self.generic is None else max_target_rows(self.vocab_size, self.device)
        # A model whose outputs move with padding gets batches of one length (no padding at all).
        self.one_length = self.generic is not None and not self.generic.pad_exact
        self.stats = EngineStats()
        self._lock = threading.Lock()  # one forward at a time: threads share the model and cores
        self._local = threading.local()

    @property
    def vocab_size(self) -> int:
        cfg: Any = self.model.config
        return int(cfg.vocab_size)

    @property
    def last_seconds(self) -> float:
        """Model time of this thread's last ``score_encoded`` call, without the wait for the lock
        (shards scored from two threads would otherwise each count the other's forward)."""
        return float(getattr(self._local, "seconds", 0.0))

    # -- public API -----------------------------------------------------------------------------
    def encode(self, items: Sequence[Item | str], max_length: int) -> list[EncodedText]:
        return encode(self.tokenizer, normalise_items(items), max_length)

    def score(
        self,
        items: Sequence[Item | str],
        *,
        metric: Metric = "within_word_l2r",
        max_length: int = 128,
        mode: Mode = "exact",
        stride: int = 4,
        token_budget: int = 8192,
        progress: Progress | None = None,
    ) -> list[np.ndarray]:
        """Scores (float32 [L], NaN at specials) for each item; see ``score_encoded``."""
        encs = self.encode(items, max_length)
        return self.score_encoded(
            encs, metric=metric, mode=mode, stride=stride, token_budget=token_budget, progress=progress
        )

    def score_encoded(
        self,
        encs: Sequence[EncodedText],
        *,
        metric: Metric = "within_word_l2r",
        mode: Mode = "exact",
        stride: int = 4,
        token_budget: int = 8192,
        progress: Progress | None = None,
    ) -> list[np.ndarray]:
        plans = [make_plan(e, metric, mode, stride) for e in encs]
        out = [np.full(e.length, np.nan, dtype=np.float32) for e in encs]
        remaining = [p.n_copies for p in plans]
        done = sum(1 for r in remaining if r == 0)
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            for batch in self._batches(encs, plans, token_budget, self.max_targets, self.one_length):
                logp = self._run(batch, encs, plans)
                pos = 0
                for u in batch:
                    tgt = plans[u.text].targets[u.r0 : u.r1]
                    flat = tgt[tgt >= 0]
                    out[u.text][flat] = logp[pos : pos + flat.shape[0]]
                    pos += flat.shape[0]
                    remaining[u.text] -= u.r1 - u.r0
                    done += remaining[u.text] == 0
                if progress is not None:
                    progress(done, len(encs))
            self._local.seconds = time.perf_counter() - t0
            self.stats.seconds += self._local.seconds
        return out

    # -- batching -------------------------------------------------------------------------------
    def _batches(
        self, encs: Sequence[EncodedText], plans: Sequence[Plan], budget: int, max_targets: int | None = None,
        one_length: bool = False,
    ) -> Iterator[list[_Unit]]:
        """Greedy fill in descending length order, so each batch's first unit sets its padded length.

        ``max_targets`` also caps the target rows of a batch (the generic path's logits);
        ``one_length`` closes a batch where the length changes (a model that padding would move).
        """
        order = sorted(range(len(encs)), key=lambda i: -encs[i].length)
        batch: list[_Unit] = []
        cost = n_tgt = 0
        for i in order:
            L, c = encs[i].length, plans[i].n_copies
            per_copy = max(1, plans[i].targets.shape[1])
            per_batch = max(1, budget // L)
            if max_targets is not None:
                per_batch = min(per_batch, max(1, max_targets // per_copy))
            for r0 in range(0, c, per_batch):
                r1 = min(c, r0 + per_batch)
                # Padded cost: every copy of the batch is as long as its first (longest) unit.
                width = batch[0].length if batch else L
                add, add_t = (r1 - r0) * width, (r1 - r0) * per_copy
                over_t = max_targets is not None and n_tgt + add_t > max_targets
                if batch and (cost + add > budget or over_t or (one_length and L != batch[0].length)):
                    yield batch
                    batch, cost, n_tgt, add = [], 0, 0, (r1 - r0) * L
                batch.append(_Unit(i, r0, r1, L))
                cost += add
                n_tgt += add_t
        if batch:
            yield batch

    def _copies(self, u: _Unit, enc: EncodedText, plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
        ids = np.repeat(enc.input_ids[None, :], u.r1 - u.r0, axis=0)
        ids[plan.mask[u.r0 : u.r1]] = self.tokenizer.mask_token_id
        tt = None
        if enc.token_type_ids is not None:
            tt = np.repeat(enc.token_type_ids[None, :], u.r1 - u.r0, axis=0)
        return ids, tt

    # -- forward --------------------------------------------------------------------------------
    def _run(self, batch: list[_Unit], encs: Sequence[EncodedText], plans: Sequence[Plan]) -> np.ndarray:
        copies = [self._copies(u, encs[u.text], plans[u.text]) for u in batch]
        targets = [plans[u.text].targets[u.r0 : u.r1] for u in batch]
        target_ids = np.concatenate(
            [_target_ids(encs[u.text], t) for u, t in zip(batch, targets, strict=True)]
        )
        before = self.stats.padded_tokens
        tid = torch.from_numpy(target_ids).to(self.device)
        if self.packed is not None and self.head is not None:
            hidden = self.packed.forward(self._groups(batch, copies, targets, encs, plans))
            self.stats.padded_tokens += sum((u.r1 - u.r0) * u.length for u in batch)
            logp = self.head.target_logprobs(hidden, tid)
        else:
            logp = self._generic_forward(batch, copies, targets, tid)
        self.stats.max_batch_tokens = max(self.stats.max_batch_tokens, self.stats.padded_tokens - before)
        n_copies = sum(u.r1 - u.r0 for u in batch)
        self.stats.forward_batches += 1
        self.stats.copies += n_copies
        self.stats.copy_tokens += sum((u.r1 - u.r0) * u.length for u in batch)
        self.stats.targets += int(target_ids.shape[0])
        return logp.cpu().numpy()

    def _groups(
        self,
        batch: list[_Unit],
        copies: list,
        targets: list[np.ndarray],
        encs: Sequence[EncodedText],
        plans: Sequence[Plan],
    ) -> list[Group]:
        """Consecutive units of equal length become one attention group (one SDPA call)."""
        groups: list[Group] = []
        i = 0
        while i < len(batch):
            j = i
            while j + 1 < len(batch) and batch[j + 1].length == batch[i].length:
                j += 1
            ids = np.concatenate([copies[k][0] for k in range(i, j + 1)])
            tts = [copies[k][1] for k in range(i, j + 1)]
            m = max(targets[k].shape[1] for k in range(i, j + 1))
            tg = np.concatenate([_pad_cols(targets[k], m) for k in range(i, j + 1)])
            units = batch[i : j + 1]
            u, L = len(units), units[0].length
            base = np.stack([encs[x.text].input_ids for x in units])
            base_tt = None if tts[0] is None else np.stack([_token_types(encs[x.text]) for x in units])
            masked = np.concatenate([plans[x.text].mask[x.r0 : x.r1] for x in units])
            text_of_copy = np.repeat(np.arange(u), [x.r1 - x.r0 for x in units])
            rows = masked * (u * L) + text_of_copy[:, None] * L + np.arange(L)[None, :]
            groups.append(
                Group(
                    self._t(ids),
                    None if tts[0] is None else self._t(np.concatenate(tts)),
                    self._t(tg),
                    self._t(np.flatnonzero(tg.reshape(-1) >= 0)),
                    self._t(base),
                    None if base_tt is None else self._t(base_tt),
                    self._t(rows.reshape(-1).astype(np.int64)),
                )
            )
            i = j + 1
        return groups

    def _generic_forward(
        self, batch: list[_Unit], copies: list, targets: list[np.ndarray], target_ids: torch.Tensor
    ) -> torch.Tensor:
        """The model's own forward on the batch padded to its longest copy (batches are length-sorted)."""
        assert self.generic is not None
        width = max(u.length for u in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.concatenate([_pad_cols(c[0], width, pad) for c in copies])
        attn = np.concatenate([_pad_cols(np.ones_like(c[0]), width, 0) for c in copies])
        tt = None
        if copies[0][1] is not None:
            tt = self._t(np.concatenate([_pad_cols(c[1], width, 0) for c in copies]))
        self.stats.padded_tokens += int(ids.size)
        tg = np.concatenate([_pad_cols(t, max(x.shape[1] for x in targets)) for t in targets])
        rows, slots = np.nonzero(tg >= 0)
        kw = self.generic.inputs(self._t(ids), self._t(attn), tt)
        return self.generic.logprobs(kw, self._t(rows), self._t(tg[rows, slots]), target_ids)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)


def _pad_cols(a: np.ndarray, width: int, value: int = -1) -> np.ndarray:
    if a.shape[1] == width:
        return a
    out = np.full((a.shape[0], width), value, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _token_types(enc: EncodedText) -> np.ndarray:
    if enc.token_type_ids is None:  # a group is built from texts of one tokenizer: all or none have them
        raise ValueError("texts with and without token_type_ids in one batch")
    return enc.token_type_ids


def _target_ids(enc: EncodedText, targets: np.ndarray) -> np.ndarray:
    """Original (unmasked) token ids at the valid targets, row-major: the labels to score."""
    return enc.input_ids[targets[targets >= 0]]
