"""Random token masking (RTM): every content token is selected with probability ``rate``.

This is BERT's masking and, through the shared collator, reproduces transformers'
``DataCollatorForLanguageModeling`` draw for draw under the same seed (tested).
"""

from __future__ import annotations

import torch

from l3m.masking.base import MaskingStrategy, content_mask, register_masking


class RandomMasking(MaskingStrategy):
    def selection_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        content = content_mask(batch)
        return torch.full(content.shape, self.rate) * content


register_masking("random", RandomMasking)
