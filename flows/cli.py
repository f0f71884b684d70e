"""The ``l3m`` command line: each command runs the matching Prefect flow on a config file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

import flows  # noqa: F401  (telemetry switches before prefect is imported)
from l3m.config import ConfigError
from l3m.data.loading import DataError
from l3m.data.validation import DataValidationError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="l3m: domain adaptation of masked LMs.")
Sets = Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.sub=value")]
Config = Annotated[Path, typer.Argument(help="run or domain config (YAML)")]

# Errors a user can fix: print the message (no traceback) and exit non-zero.
USER_ERRORS = (ConfigError, DataError, DataValidationError)


@app.callback()
def _root() -> None:
    """l3m: validate, score, train, register and serve domain-adapted classifiers."""


def _fail(e: BaseException) -> None:
    typer.secho(str(e), fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def validate(config: Config, set_: Sets = None,
             prefect: Annotated[bool, typer.Option(help="run as a Prefect flow")] = True) -> None:
    """Validate a domain's data with Great Expectations; exit 2 if an error-level check fails."""
    try:
        if prefect:
            from flows.validate import validate as validate_flow

            out = validate_flow(str(config), set_ or [])
        else:
            from flows.common import as_config
            from l3m.data.loading import read_raw
            from l3m.data.report import write_report
            from l3m.data.validation import validate_domain

            cfg = as_config(config, set_ or [])
            rep = validate_domain(cfg.domain, read_raw(cfg.domain))
            paths = write_report(rep, cfg.resolved_output_dir() / "validation")
            if not rep.passed:
                raise DataValidationError(rep)
            out = {"passed": True, "warnings": len(rep.warnings), "report": str(paths["markdown"])}
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(out, indent=2))


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
