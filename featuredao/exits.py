"""Run a click command group with featuredao's exit codes: 0 ok, 1 runtime failure, 2 usage or config.

A leaf shared by every command group (``featuredao``, ``featuredao bench``, ``featuredao sync``), so no
group has to import another to get the same exit codes.
"""

from __future__ import annotations

import sys

import click

from featuredao.errors import ArgumentTypeError, ConfigError, FeatureDaoError, UsageError


def run(group: click.Group, argv: list[str] | None, prog_name: str) -> None:
    """Run a command group with featuredao's exit codes: 0 ok, 1 runtime failure, 2 usage or config."""
    try:
        group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (UsageError, ArgumentTypeError) as exc:  # the caller's input: a usage error, no traceback
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except FeatureDaoError as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
