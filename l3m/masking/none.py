"""Single-task learning (STL): classification only, no auxiliary MLM batch or loss."""

from __future__ import annotations

import torch

from l3m.masking.base import MaskingStrategy, content_mask, register_masking


class NoMasking(MaskingStrategy):
    uses_mlm = False

    def selection_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros(content_mask(batch).shape)


register_masking("none", NoMasking)
