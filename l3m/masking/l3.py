"""L3Masking: select the tokens the *vanilla* model finds surprising (Kimura et al. 2024).

Inputs are the stored vanilla log-likelihoods ``token_logp`` (natural log, NaN at specials),
precomputed once by ``l3m.scoring``; nothing here calls a model, so an L3 step costs what an
RTM step costs. With surprisal s_i = -log p_i over the n content tokens of a text:

* ``paper`` mode, the authors' mapping:  p_i = min(1, r * n * s_i / sum_j s_j).
  Without the cap the expected number of selected tokens is exactly r * n; the cap loses
  mass, so the realised rate falls below r on short or skewed texts.
* ``calibrated`` mode: p_i = min(1, c * s_i) with c chosen per text so that
  sum_i p_i = r * n ("water-filling"): the mass clipped at 1 goes to the other tokens in
  proportion to their surprisal, and the realised rate equals r.

Whole-word option: every subword of a word gets the word's mean surprisal (so the formula's
normaliser sum_j s_j is unchanged) and the collator draws one Bernoulli per word.
"""

from __future__ import annotations

import torch

from l3m.masking.base import MaskingStrategy, content_mask, register_masking

# A floor on surprisal so a token the vanilla model predicts with certainty (s = 0) can still
# be drawn in calibrated mode when the rest of the text cannot absorb r * n.
_EPS = 1e-4


def surprisal(token_logp: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """s_i = -log p_i on content tokens (floored at _EPS), 0 elsewhere; NaN scores count as 0."""
    s = torch.nan_to_num(-token_logp.float(), nan=0.0).clamp_min(_EPS)
    return torch.where(content, s, torch.zeros_like(s))


def word_mean(s: torch.Tensor, word_ids: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Replace each token's value by the mean over its word (word ids per row, -1 = none)."""
    wid = torch.where(content & (word_ids >= 0), word_ids, torch.zeros_like(word_ids)).long()
    n_words = int(wid.max().item()) + 1 if wid.numel() else 1
    sums = torch.zeros(s.shape[0], n_words, dtype=s.dtype).scatter_add_(1, wid, s * content)
    counts = torch.zeros_like(sums).scatter_add_(1, wid, content.to(s.dtype))
    mean = sums / counts.clamp_min(1)
    return torch.where(content, mean.gather(1, wid), torch.zeros_like(s))


def paper_probs(s: torch.Tensor, content: torch.Tensor, rate: float) -> torch.Tensor:
    """The authors' p_i = min(1, r * n * s_i / sum_j s_j) (L3Masking, Sec. 3)."""
    n = content.sum(1, keepdim=True).to(s.dtype)
    total = s.sum(1, keepdim=True)
    p = rate * n * s / total.clamp_min(1e-12)
    return p.clamp(max=1.0) * content


def calibrated_probs(s: torch.Tensor, content: torch.Tensor, rate: float) -> torch.Tensor:
    """p_i = min(1, c * s_i) with sum_i p_i = r * n per row, by water-filling.

    Sort surprisals descending; if the top k tokens are clipped to 1, the rest share
    R - k (R = r * n) in proportion to s, i.e. c_k = (R - k) / sum_{j >= k} s_(j). The right
    k is the smallest one whose first unclipped token stays below 1: c_k * s_(k) <= 1.
    A valid k <= floor(R) always exists because r < 1 and every content s > 0.
    """
    B, L = s.shape
    n = content.sum(1, keepdim=True).to(s.dtype)
    budget = rate * n
    s_sorted, _ = s.sort(dim=1, descending=True)
    tail = s_sorted.flip(1).cumsum(1).flip(1)  # tail[:, k] = sum_{j >= k} s_(j)
    k = torch.arange(L, dtype=s.dtype).expand(B, L)
    c = (budget - k) / tail.clamp_min(1e-12)
    valid = (s_sorted * c <= 1.0 + 1e-6) & (tail > 0) & (k <= budget)
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    c_star = c.gather(1, first).clamp_min(0.0)
    c_star = torch.where(valid.any(1, keepdim=True), c_star, torch.zeros_like(c_star))
    return (c_star * s).clamp(max=1.0) * content


class L3Masking(MaskingStrategy):
    columns = ("token_logp",)

    def selection_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "token_logp" not in batch:
            raise KeyError("l3 masking needs the 'token_logp' column (stored vanilla scores)")
        content = content_mask(batch)
        s = surprisal(batch["token_logp"], content)
        if self.whole_word and "word_ids" in batch:
            s = word_mean(s, batch["word_ids"], content)
        if self.spec.mode == "paper":
            return paper_probs(s, content, self.rate)
        return calibrated_probs(s, content, self.rate)


register_masking("l3", L3Masking)
