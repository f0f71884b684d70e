"""Prefect flows over the l3m library, and the ``l3m`` command line.

Telemetry is switched off here, before Prefect/BentoML are imported, so every entry point
(CLI, worker, tests) runs offline without phoning home (see docs/stack.md).
"""

import os

for _k, _v in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)
