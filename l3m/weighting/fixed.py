"""Fixed weights: L = L_cls + lambda * L_mlm with lambda = ``training.mlm_weight``.

This is the model's own loss (``l3m.modeling.MultiTaskModel.forward``), so the trainer keeps
the stock Trainer path and a fixed run is exactly what it was before weightings existed.
"""

from __future__ import annotations

from l3m.weighting.base import LossWeighting, register_weighting


class FixedWeighting(LossWeighting):
    """The paper's equation; ``combine`` states it, the model computes it."""


register_weighting("fixed", FixedWeighting)
