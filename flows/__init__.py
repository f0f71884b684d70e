"""Prefect flows over the l3m library, and the ``l3m`` command line.

Telemetry is switched off here, before Prefect/BentoML are imported, so every entry point
(CLI, worker, tests) runs offline without phoning home (see docs/stack.md).

The ephemeral Prefect server (what every command uses when no PREFECT_API_URL is set) creates
and migrates its SQLite database on first use under a new PREFECT_HOME; on a slow 2-core host
that alone outlasts Prefect's default 20 s startup timeout (docs/stack.md has the measurement),
so a first-time user's first command failed. The timeout is raised; a user's own setting wins.
"""

import os

for _k, _v in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
}.items():
    os.environ.setdefault(_k, _v)
