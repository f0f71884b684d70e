"""Plain fine-tuning: every parameter trains with the Trainer's own optimizer; all hooks no-ops."""

from __future__ import annotations

from l3m.tuning.base import Tuner, register_tuner


class FullTuner(Tuner):
    """Vanilla fine-tuning, the baseline every other tuner is compared to."""


register_tuner("full", FullTuner)
