"""The ``l3m`` command line: each command runs the matching Prefect flow on a config file."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer

import flows  # noqa: F401  (telemetry switches before prefect is imported)
from flows.common import quiet_user_error_tracebacks
from l3m.config import ConfigError
from l3m.data.loading import DataError
from l3m.data.validation import DataValidationError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="l3m: domain adaptation of masked LMs.")
Sets = Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.sub=value")]
Config = Annotated[Path, typer.Argument(help="run or domain config (YAML)")]

# Errors a user can fix: print the message (no traceback) and exit non-zero.
USER_ERRORS = (ConfigError, DataError, DataValidationError)


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for user errors too")] = False) -> None:
    """l3m: validate, score, train, register and serve domain-adapted classifiers."""
    ctx.obj = {"debug": debug}
    if not debug:
        # Prefect logs each failed run with its traceback before the message below is printed;
        # for errors the user fixes in a config or data file that traceback is noise.
        quiet_user_error_tracebacks(USER_ERRORS)


def _fail(e: BaseException) -> NoReturn:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.obj or {}).get("debug"):
        traceback.print_exception(e)
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
            from flows.validate import validate_and_report

            rep, paths = validate_and_report(as_config(config, set_ or []))
            if not rep.passed:
                raise DataValidationError(rep)
            out = {"passed": True, "warnings": len(rep.warnings), "report": str(paths["markdown"])}
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(out, indent=2))


def _run_flow(module: str, name: str, config: Path, set_: list[str] | None) -> None:
    import importlib

    try:
        fn = getattr(importlib.import_module(module), name)
        out = fn(str(config), set_ or [])
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(out, indent=2, default=str))


@app.command()
def score(config: Config, set_: Sets = None) -> None:
    """Score every token of the domain's texts with the vanilla model (cached in the score store)."""
    _run_flow("flows.score", "score", config, set_)


@app.command()
def train(config: Config, set_: Sets = None,
          nproc: Annotated[int, typer.Option("--nproc", min=1, help=(
              "processes per run: >1 validates and scores here, then trains every run with "
              "torchrun --nproc_per_node N (DDP; one process per GPU, gloo on CPU)"))] = 1) -> None:
    """Train strategies x tuners x seeds and write the results table (scores read from the store)."""
    if nproc == 1:
        _run_flow("flows.train", "train", config, set_)
        return
    try:
        from flows.train import torchrun_train

        code = torchrun_train(config, set_ or [], nproc)
    except USER_ERRORS as e:
        _fail(e)
    raise typer.Exit(code)


@app.command()
def run(config: Config, set_: Sets = None) -> None:
    """The whole pipeline: validate -> score -> train/evaluate -> register (-> build bento)."""
    _run_flow("flows.pipeline", "adapt_domain", config, set_)


models = typer.Typer(no_args_is_help=True, help="The model registry (BentoML store + promotion ledger).")
app.add_typer(models, name="models")


def _registry():  # noqa: ANN202 - lazy: importing bentoml costs seconds
    from serving import registry

    return registry


def _echo(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@models.command("list")
def models_list(domain: Annotated[str | None, typer.Option(help="only this domain")] = None) -> None:
    """Registered versions with stage, dev metric and strategy."""
    rows = _registry().list_models(domain)
    if not rows:
        typer.echo("no models registered")
        return
    for r in rows:
        typer.echo("  ".join(str(r.get(k, "")) for k in ("tag", "stage", "metric", "dev", "test", "strategy", "tuner", "created")))


@models.command("show")
def models_show(tag: str) -> None:
    """Everything recorded about one version (metadata, lineage, stage history)."""
    try:
        _echo(_registry().show(tag))
    except _registry().RegistryError as e:
        _fail(e)


@models.command("register")
def models_register(
    model_dir: Path,
    margin: Annotated[float, typer.Option(help="promotion margin")] = 0.0,
    snapshot: Annotated[Path | None, typer.Option(help="validated data snapshot: score both models on its dev split")]
    = None,
    confidence: Annotated[float, typer.Option(help="level of the paired bootstrap interval (0-1, exclusive)")] = 0.95,
) -> None:
    """Register a trained model directory; promote it if it beats the majority baseline and production
    (on a snapshot: with a paired bootstrap interval over the dev examples above the bar)."""
    try:
        from flows.register import eval_set_from_snapshot

        dev = eval_set_from_snapshot(snapshot) if snapshot else None
        _echo(_registry().register(model_dir, promote_margin=margin, dev=dev, confidence=confidence).to_dict())
    except _registry().RegistryError as e:
        _fail(e)


@models.command("build")
def models_build(tag: Annotated[str | None, typer.Argument(help="default: the domain's production version")] = None,
                 domain: Annotated[str, typer.Option(help="domain whose production to build")] = "citation_intent",
                 multi: Annotated[bool, typer.Option(help="one bento with the production version of every domain "
                                                          "(or of --domains) and their bases")] = False,
                 domains: Annotated[str | None, typer.Option(help="with --multi: comma-separated domains")] = None,
                 ) -> None:
    """Package a production version as bento l3m-<domain>:<version>, or with --multi every domain's
    production version as one bento l3m_domains:<versions> (nothing to do if it exists)."""
    reg = _registry()
    try:
        if multi:
            if tag is not None:
                raise reg.RegistryError("--multi packages production versions: give --domains, not a tag")
            from flows.multi_bento import build_multi_bento

            names = [d.strip() for d in domains.split(",") if d.strip()] if domains else None
            bento, built, tags = build_multi_bento(names)
            _echo({"bento": bento, "built": built, "domains": tags,
                   "serve": f"bentoml serve {bento}"})
            return
        if domains is not None:
            raise reg.RegistryError("--domains goes with --multi")
        if tag is None:
            tag = reg.production_tag(domain)
            if tag is None:
                raise reg.RegistryError(f"domain {domain!r} has no production model to build")
        info = reg.show(tag)
        if info["stage"] != "production":
            raise reg.RegistryError(f"{info['tag']} is {info['stage']}, not production: only production is "
                                    "packaged (`l3m models promote` it first)")
        from flows.register import build_bento

        bento, built = build_bento(info["tag"])
    except (reg.RegistryError, RuntimeError) as e:
        _fail(e)
    _echo({"bento": bento, "built": built})


@models.command("promote")
def models_promote(tag: str, force: Annotated[bool, typer.Option(help="skip the metric rule")] = False,
                   margin: float = 0.0) -> None:
    """Make a version production if, by the intervals recorded at its registration, it beats the
    majority baseline and production on the same data (+ margin) and was compared fairly, or --force."""
    try:
        _echo(_registry().promote(tag, force=force, margin=margin).to_dict())
    except _registry().RegistryError as e:
        _fail(e)


@models.command("rollback")
def models_rollback(domain: str) -> None:
    """Restore the previous production version of a domain."""
    try:
        _echo(_registry().rollback(domain).to_dict())
    except _registry().RegistryError as e:
        _fail(e)


@models.command("verify")
def models_verify(
    url: Annotated[str, typer.Option(help="base URL of the running service")] = "http://127.0.0.1:3000",
    model: Annotated[str | None, typer.Option(help="tag or model directory (default: the tag /metadata names)")] = None,
    split: Annotated[str, typer.Option(help="split whose offline predictions to replay")] = "test",
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 8,
    domain: Annotated[str | None, typer.Option(help="multi-domain service: only this domain (default: every one)")]
    = None,
) -> None:
    """Replay a split's offline-evaluation inputs against a running service (each domain's, for a
    multi-domain one); exit 1 on any label mismatch."""
    import httpx

    from serving.verify import verify

    try:
        meta = httpx.get(f"{url.rstrip('/')}/metadata", timeout=30).raise_for_status().json()
        if "domains" in meta:  # serving.multi_service: each domain against its own version's predictions
            served = {d["domain"]: d["model_tag"] for d in meta["domains"]}
            if domain is not None and domain not in served:
                raise RuntimeError(f"domain {domain!r} is not served; served: {sorted(served)}")
            targets = [(d, model or t) for d, t in sorted(served.items()) if domain in (None, d)]
        else:
            targets = [(None, model or str(meta["model_tag"]))]
        reports = []
        for name, tag in targets:
            path = Path(tag) if Path(tag).is_dir() else Path(_registry().show(tag)["path"])
            reports.append(({"domain": name} if name else {}) | {"model": tag}
                           | verify(url, path, split, concurrency=concurrency, domain=name).to_dict())
    except (_registry().RegistryError, FileNotFoundError, httpx.HTTPError, RuntimeError) as e:
        _fail(e)
    _echo(reports[0] if len(reports) == 1 and "domain" not in reports[0] else reports)
    if not all(r["ok"] for r in reports):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
