"""The generic scoring path: any ``AutoModelForMaskedLM``, through its own forward.

Every masked LM in transformers computes ``logits = head(base_model(...)[0])`` with a head that
works position by position (BERT's transform + decoder, RoBERTa's ``lm_head``, DeBERTa's
``lm_predictions``, ELECTRA's generator head, ModernBERT's ``head`` + ``decoder``...). PLL reads
one row per masked copy, so a forward hook on ``base_model`` keeps only the target rows of its
output before the model's own head runs: the head (whose vocabulary projection costs about as
much as a small encoder layer per row) runs at the targets only, with no per-family code.

A model whose head is not position-wise would give different numbers with the hook, so the hook
is checked once against the unhooked forward on a short input; if they differ, or the hooked
forward fails, the full logits are computed and the targets read off them (exact, just slower).

Padding is checked the same way: most encoders give a sequence the same outputs alone as padded
in a batch (the attention mask hides the pads), but some do not (Funnel pools the padded
sequence, pads included). A model whose scores move with padding gets batches of one length
only (every masked copy of a text has the text's length, so nothing is padded).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger("l3m.scoring")

# Logits of one forward, bounded whatever the batch: the number of target rows per forward is
# capped so [rows, vocab] stays under this many bytes (float32). XLM-R's 250k vocabulary gets
# fewer rows per forward than BERT's 30k, not more memory.
LOGITS_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}
CHECK_TOL = 1e-4  # nats: the hooked and the full forward must agree this closely (float32)


def max_target_rows(vocab_size: int, device: torch.device) -> int:
    return max(16, LOGITS_BYTES.get(device.type, LOGITS_BYTES["cpu"]) // (4 * max(1, vocab_size)))


class TargetForward:
    """``model(**inputs)`` with its MLM head applied at (row, slot) positions only."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype, vocab_size: int) -> None:
        self.model: Any = model
        self.dtype = compute_dtype
        self.vocab_size = vocab_size
        self.accepts = set(inspect.signature(model.forward).parameters)
        self._picked: tuple[torch.Tensor, torch.Tensor] | None = None
        base = getattr(model, "base_model", None)
        self.base: nn.Module | None = base if isinstance(base, nn.Module) and base is not model else None
        self.hooked = False
        self.reason = "no separate base model: full logits"
        if self.base is not None:
            self.hooked, self.reason = self._check()
        self.pad_exact = self._pad_check()
        if not self.pad_exact:
            self.reason += "; its outputs depend on padding: batches of one length only"

    def inputs(self, ids: torch.Tensor, attn: torch.Tensor, tt: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The forward's keyword arguments; token types only for a model that takes them."""
        kw = {"input_ids": ids, "attention_mask": attn}
        if tt is not None and "token_type_ids" in self.accepts:
            kw["token_type_ids"] = tt
        return kw

    def logprobs(self, kw: dict[str, torch.Tensor], rows: torch.Tensor, slots: torch.Tensor,
                 target_ids: torch.Tensor) -> torch.Tensor:
        """log p(target_ids[i] | copy rows[i]) at position slots[i], float32 [N]."""
        use_amp = self.dtype != torch.float32
        with torch.autocast(rows.device.type, dtype=self.dtype, enabled=use_amp):
            if self.hooked:
                with self._pick(rows, slots):
                    logits = self.model(**kw, return_dict=True).logits.reshape(rows.shape[0], -1)
            else:
                logits = self.model(**kw, return_dict=True).logits[rows, slots]
        return _target_logprobs(logits, target_ids)

    @contextmanager
    def _pick(self, rows: torch.Tensor, slots: torch.Tensor) -> Iterator[None]:
        assert self.base is not None
        self._picked = (rows, slots)
        handle = self.base.register_forward_hook(self._keep_targets)
        try:
            yield
        finally:
            handle.remove()
            self._picked = None

    def _keep_targets(self, _module: nn.Module, _args: Any, out: Any) -> Any:
        assert self._picked is not None
        rows, slots = self._picked
        hidden = out[0]
        picked = hidden[rows, slots].unsqueeze(0)  # [1, N, d]: the head sees one "sequence" of targets
        if isinstance(out, tuple):
            return (picked, *out[1:])
        out["last_hidden_state"] = picked
        return out

    def _check(self) -> tuple[bool, str]:
        """Hooked == unhooked on a short input (float32), else the full-logits fallback."""
        name = type(self.model).__name__
        dev = next(self.model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(5, max(6, self.vocab_size), (2, 9), generator=gen).to(dev)
        attn = torch.ones_like(ids)
        attn[1, 6:] = 0
        kw = self.inputs(ids, attn, torch.zeros_like(ids))
        rows, slots = torch.tensor([0, 0, 1], device=dev), torch.tensor([1, 8, 3], device=dev)
        try:
            with torch.inference_mode():
                full = self._full_logits(kw, rows, slots)
                with self._pick(rows, slots):
                    picked = self.model(**kw, return_dict=True).logits.reshape(3, -1).float()
        except Exception as e:  # noqa: BLE001 - any failure of the hook means: do not use it
            log.info("%s: head at target rows failed (%s); scoring with full logits", name, e)
            return False, f"{name}: head at the target rows failed ({type(e).__name__}): full logits"
        diff = (full.log_softmax(-1) - picked.log_softmax(-1)).abs().max().item() if full.shape == picked.shape else None
        if diff is None or diff > CHECK_TOL:
            return False, f"{name}: its head is not position-wise (max |diff| {diff}): full logits"
        return True, f"{name}: the model's own forward, its MLM head at the target rows only"


    def _pad_check(self) -> bool:
        """A short sequence scores the same alone as padded beside a longer one (float32)."""
        dev = next(self.model.parameters()).device
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(5, max(6, self.vocab_size), (2, 12), generator=gen).to(dev)
        attn = torch.ones_like(ids)
        attn[1, 7:] = 0
        rows, slots = torch.tensor([1, 1], device=dev), torch.tensor([2, 5], device=dev)
        try:
            with torch.inference_mode():
                both = self._full_logits(self.inputs(ids, attn, torch.zeros_like(ids)), rows, slots)
                alone = self._full_logits(self.inputs(ids[1:, :7], attn[1:, :7], torch.zeros_like(ids[1:, :7])),
                                          rows * 0, slots)  # fmt: skip
        except Exception:  # noqa: BLE001 - a probe that fails: batches of one length are always exact
            return False
        return bool((both.log_softmax(-1) - alone.log_softmax(-1)).abs().max().item() <= CHECK_TOL)

    def _full_logits(self, kw: dict[str, torch.Tensor], rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.model(**kw, return_dict=True).logits[rows, slots].float()


def _target_logprobs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row in float32, without a second [N, V] tensor."""
    z = logits.float()
    m = z.amax(dim=1, keepdim=True)
    picked = z.gather(1, target_ids.unsqueeze(1)) - m
    lse = z.sub_(m).exp_().sum(dim=1, keepdim=True).log_()  # logits are ours: consumed in place
    return (picked - lse).squeeze(1)
