"""The task-weight log of a run: ``weights.jsonl`` (one row per optimizer step) and ``weights.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from l3m.weighting.base import TASKS

WEIGHTS_LOG = "weights.jsonl"
WEIGHTS_PLOT = "weights.png"


def write_weight_log(rows: list[dict[str, Any]], run_dir: Path) -> str:
    """Write the log and its plot into ``run_dir``; return the report.md section naming them."""
    run_dir = Path(run_dir)
    with open(run_dir / WEIGHTS_LOG, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    _plot(rows, run_dir / WEIGHTS_PLOT)
    last = rows[-1]
    final = ", ".join(f"{t} {last[f'weight_{t}']:.3f}" for t in TASKS)
    return (f"\n## Task weights\n\nLearned per optimizer step ({len(rows)} steps; last step: {final}). "
            f"Log: `{WEIGHTS_LOG}` (weights, cosine of each task's encoder gradient with the dev gradient, "
            f"dev-head loss); plot: `{WEIGHTS_PLOT}`.\n")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for t in TASKS:
        top.plot(steps, [r[f"weight_{t}"] for r in rows], label=f"weight {t}")
        cos = [r[f"cos_{t}"] for r in rows]
        bottom.plot(steps, [float("nan") if c is None else c for c in cos], label=f"cos({t}, dev)")
    top.set_ylabel("task weight")
    top.legend()
    bottom.axhline(0.0, color="grey", linewidth=0.5)
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("gradient cosine with dev")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
