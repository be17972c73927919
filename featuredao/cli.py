"""The ``featuredao`` command: validate, fetch and demo (exit 0 ok, 1 runtime failure, 2 usage or config)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from featuredao import config as config_mod
from featuredao.bench import bench
from featuredao.errors import FeatureDaoError
from featuredao.exits import run
from featuredao.sync.cli import sync


def _keys(text: str) -> list[str]:
    return [k for k in (p.strip() for p in text.split(",")) if k]


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def _pairs(given: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for pair in given:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.UsageError(f"{option} takes NAME=VALUE, got {pair!r}")
        out[name.strip()] = value
    return out


def _check_keys(service: Any, keys: list[str], *, view: str | None = None, entity: str | None = None) -> None:
    """A key that cannot be a key of a view it goes to is a usage error (exit 2), named with the view."""
    from featuredao.errors import UsageError
    from featuredao.keys import normaliser

    for name in service.views():
        v = service.view(name)
        if (view is not None and name != view) or (entity is not None and (v.entity != entity
                                                                          or name not in service.daos)):
            continue
        norm = normaliser(v.key_type)
        for key in keys:
            try:
                norm(key)
            except FeatureDaoError as exc:
                # Ours, not click's: one "error: ..." line, without click's usage lines above it.
                raise UsageError(f"key {key!r} cannot be a key of view {name!r} (key_type {v.key_type}): "
                                 f"{exc}") from None


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """featuredao: batch-first feature serving for recommender systems."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def validate(config: str) -> None:
    """Check a configuration file and report every problem with its JSON path."""
    cfg = config_mod.load(config)
    click.echo(f"OK: {len(cfg.sources)} source(s), {len(cfg.views)} view(s)")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--user", "user_id", help="User id: merge the features of every user view.")
@click.option("--items", default="", help="Comma-separated item ids.")
@click.option("--view", help="Read one view instead of merging all.")
@click.option("--keys", default="", help="Comma-separated keys (with --view).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--deadline-ms", type=float, help="Overall deadline (default from config).")
@click.option("--context", "context", multiple=True, metavar="NAME=VALUE",
              help="A request-context feature (repeatable), e.g. --context hour=9.")
@click.option("--scene", help="Read the views of this scene only (and use its deadline).")
@click.option("--key", "entity_keys", multiple=True, metavar="ENTITY=KEY",
              help="The key of another request-level entity (repeatable), e.g. --key shop=s9.")
def fetch(config: str, user_id: str | None, items: str, view: str | None, keys: str, as_json: bool,
          deadline_ms: float | None, scene: str | None, context: tuple[str, ...],
          entity_keys: tuple[str, ...]) -> None:
    """Fetch features: a user and items from every view, or keys from one view."""
    from featuredao.service import FeatureService

    if view is None and user_id is None and not items and not entity_keys:
        raise click.UsageError("give --user and/or --items, or --view with --keys")
    if view is not None and (user_id is not None or items):
        raise click.UsageError("--view reads one view: use --keys, not --user/--items")
    with FeatureService.from_config(config) as service:
        if view is not None:
            if view not in service.views():
                raise click.UsageError(f"unknown view {view!r}; known: {', '.join(service.views())}")
            _check_keys(service, _keys(keys), view=view)
            batch = service.read_view(view, _keys(keys))
            out: dict[str, Any] = {str(k): r for k, r in batch.as_dict().items()}
            if batch.degraded:
                click.echo(_dump({"degraded": [d.to_dict() for d in batch.degraded]}), err=True)
        else:
            others = _pairs(entity_keys, "--key")
            _check_keys(service, _keys(items), entity="item")
            _check_keys(service, [] if user_id is None else [user_id], entity="user")
            for entity, key in others.items():
                _check_keys(service, [key], entity=entity)
            out = service.fetch(user_id, _keys(items), deadline_ms=deadline_ms, scene=scene,
                                context=_pairs(context, "--context"), keys=others).to_dict()
    if as_json:
        click.echo(_dump(out))
    else:
        click.echo(json.dumps(out, ensure_ascii=False, indent=2, default=str))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for each source.")
def health(config: str, timeout: float) -> None:
    """Ping every source: latency and breaker state; exit 1 if any source is down."""
    from rich.console import Console
    from rich.table import Table

    from featuredao.service import FeatureService

    with FeatureService.from_config(config) as service:
        report = service.health(timeout)
    table = Table(title="featuredao health")
    for col in ("source", "type", "status", "latency ms", "breaker", "error"):
        table.add_column(col)
    for h in report:
        table.add_row(h.source, h.type, "[green]up[/]" if h.ok else "[red]DOWN[/]", f"{h.latency_ms:.1f}",
                      h.breaker, h.error)
    Console().print(table)
    if not all(h.ok for h in report):
        sys.exit(1)


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Where the dataset and its config go.")
@click.option("--users", default=10_000, show_default=True)
@click.option("--items", default=100_000, show_default=True)
@click.option("--fetch-items", default=500, show_default=True, help="Items fetched for the user.")
def demo(directory: Path, users: int, items: int, fetch_items: int) -> None:
    """Build an embedded SQLite dataset, fetch one user with 500 items, print features and timings."""
    from featuredao import demo as demo_mod

    demo_mod.run(directory, users, items, min(fetch_items, items))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", type=click.IntRange(1, 256), help="Worker processes  [default: usable cores]")
@click.option("--reload-interval", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between checks of the config file's hash (0: on SIGHUP only).")
@click.option("--token-env", metavar="VAR", help="Require 'Authorization: Bearer <token>', the token "
              "read from this environment variable (every route but /healthz).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1))
@click.option("--max-keys", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Most keys (item ids, or a view's keys) one request may carry.")
@click.option("--drain-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds requests in flight may take to finish on SIGTERM.")
def serve(config: str, host: str, port: int, workers: int | None, reload_interval: float,
          token_env: str | None, max_body_bytes: int, max_keys: int, drain_timeout: float) -> None:
    """Serve features over HTTP/JSON (POST /v1/fetch) with hot config reload."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401

        from featuredao.server import ServeError, ServeSettings, usable_cores
        from featuredao.server import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"featuredao serve needs the server extra "
                                   f"(pip install 'featuredao[server]'): {exc}") from None
    logging.getLogger("featuredao.server").setLevel(min(logging.getLogger().level, logging.INFO))
    settings = ServeSettings(str(Path(config).resolve()), host, port, workers or usable_cores(),
                             reload_interval, token_env, max_body_bytes, max_keys, drain_timeout)
    try:
        code = run_server(settings)
    except ServeError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


cli.add_command(bench)
cli.add_command(sync)


def main(argv: list[str] | None = None) -> None:
    """Entry point: map our errors to exit codes without tracebacks."""
    run(cli, argv, "featuredao")


if __name__ == "__main__":
    main()
