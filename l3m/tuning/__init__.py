"""Tuning strategies as plug-ins: ``build_tuner(spec)`` -> a Tuner (see ``base.py``, docs/tuning.md).

Importing this package registers every built-in kind: full, child_f, child_d, weight_mask, lora.
"""

from l3m.tuning import child_d, child_f, full, lora, weight_mask  # noqa: F401  (registration)
from l3m.tuning.base import (
    Tuner,
    build_tuner,
    find_classifier,
    register_tuner,
    registered_tuners,
)
from l3m.tuning.packing import pack_mask, unpack_mask
from l3m.tuning.trained import load_trained
from l3m.tuning.weight_mask import MaskedLinear

__all__ = [
    "MaskedLinear",
    "Tuner",
    "build_tuner",
    "find_classifier",
    "load_trained",
    "pack_mask",
    "register_tuner",
    "registered_tuners",
    "unpack_mask",
]
