"""Does this CPU have a oneDNN kernel for a low-precision dtype? (serving's own copy of the probe)

``l3m.scoring.onednn.supports`` is the library's probe. A built bento packages only ``serving/``
(serving/bentofile.yaml ``include``), so the service cannot import ``l3m`` there; this module
runs the same tiny GEMM and is used when the library is absent.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def supports(dtype: Any) -> bool:
    """A probe rather than a CPU-flag check: oneDNN's own dispatch decides. Without a kernel,
    bf16/fp16 GEMMs fail here or fall to reference loops several times slower than float32."""
    import torch

    if dtype == torch.float32:
        return True
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_linear_pointwise") and torch.backends.mkldnn.is_available()):
        return False
    x, w, b = torch.ones(4, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype), torch.zeros(8, dtype=dtype)
    try:
        ops._linear_pointwise(x, w, b, "none", [], "none")
    except RuntimeError:
        return False
    return True


def low_precision_supported(dtype: Any) -> bool:
    """The library's probe when ``l3m`` is importable (one answer for scoring and serving, and
    what its tests patch), else this module's copy (inside a built bento)."""
    try:
        from l3m.scoring.onednn import supports as library_supports
    except ImportError:
        return supports(dtype)
    return bool(library_supports(dtype))
