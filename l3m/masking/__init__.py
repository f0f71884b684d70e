"""Masking strategies for the auxiliary MLM loss: one interface, one collator, a registry."""

from l3m.masking import l3, none, random, selective  # noqa: F401  (registers the strategies)
from l3m.masking.base import (
    MaskingStrategy,
    build_masking,
    content_mask,
    register_masking,
    registered_kinds,
)
from l3m.masking.collator import MaskingCollator, MaskingStats

__all__ = [
    "MaskingCollator",
    "MaskingStats",
    "MaskingStrategy",
    "build_masking",
    "content_mask",
    "register_masking",
    "registered_kinds",
]
