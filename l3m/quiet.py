"""One line per model load instead of transformers' LOAD REPORT table.

transformers 5 logs a multi-line table (keys, statuses, notes) at WARNING for every load whose
checkpoint does not match the class exactly. l3m loads the same checkpoint as a classifier and as
a masked LM in every run, where a new classifier head is the expected outcome, so the table
repeats for each run and strategy. The filter keeps one line naming what was newly initialised
(and what went unused) and sends the full table to the debug log of ``l3m.loads``.
"""

from __future__ import annotations

import logging
import re

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The loggers transformers logs load reports from (the model loading code's module loggers).
SOURCES = ("transformers.modeling_utils", "transformers.utils.loading_report")
DEBUG_LOG = logging.getLogger("l3m.loads")
STATUS_WORDS = {"MISSING": "newly initialised", "MISMATCH": "re-initialised (shape mismatch)",
                "UNEXPECTED": "not used"}  # fmt: skip


def summarise_report(message: str) -> str:
    """``<Class> from <path>: newly initialised a, b; not used c`` from a LOAD REPORT message."""
    text = ANSI.sub("", message)
    head, _, body = text.partition("\n")
    by_status: dict[str, list[str]] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[1] in STATUS_WORDS:
            by_status.setdefault(cells[1], []).append(cells[0])
    who = head.replace(" LOAD REPORT", "").strip()
    parts = [f"{STATUS_WORDS[s]} {', '.join(keys)}" for s, keys in by_status.items()]
    return f"{who}: {'; '.join(parts) or 'checkpoint differs from the class'} (full report: debug log l3m.loads)"


class LoadReportFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        DEBUG_LOG.debug("%s", ANSI.sub("", message))
        record.msg, record.args = summarise_report(message), ()
        return True


_FILTER = LoadReportFilter()


def quiet_load_reports() -> None:
    """Install the filter (idempotent) on the loggers that emit load reports."""
    for name in SOURCES:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def quiet_loading_bars() -> None:
    """No per-load "Loading weights" bar: l3m loads a checkpoint twice per run (classifier and
    masked LM) and once per scorer, and the bars interleave with the run's own progress lines.

    transformers' switch also turns off huggingface_hub's download bars, which a user fetching a
    hub model wants: those are turned back on unless they were off before.
    """
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    hub_bars_off = hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not hub_bars_off:
        hub.enable_progress_bars()
