"""Loss weightings for the multi-task run: ``build_weighting(spec, mlm_weight, seed)`` (see ``base.py``).

Importing this package registers every built-in kind: fixed, meta_tartan.
"""

from l3m.weighting import fixed, meta_tartan  # noqa: F401  (registration)
from l3m.weighting.base import LossWeighting, build_weighting, register_weighting, registered_weightings
from l3m.weighting.report import write_weight_log

__all__ = ["LossWeighting", "build_weighting", "register_weighting", "registered_weightings", "write_weight_log"]
