"""The ``memguard`` command line."""

from __future__ import annotations

import sys

import click

from .audit import audit
from .calibrate import calibrate
from .demo import demo
from .explain import explain
from .scan import scan
from .serve import serve


class _Main(click.Group):
    """Every error of every command is one line in one form, ``memguard: error: ...`` (a usage error after the
    command's usage line, exit code 2; any other, exit code 1; tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.UsageError as error:
            if error.ctx is not None:
                click.echo(error.ctx.get_usage(), err=True)
                click.echo(f"Try '{error.ctx.command_path} --help' for help.", err=True)
            click.echo(f"memguard: error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            click.echo(f"memguard: error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except Exception as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"memguard: error: {error}", err=True)
            sys.exit(1)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="memguard")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """memguard: score text-to-image prompts for training-data memorization, before generation."""
    ctx.ensure_object(dict)["debug"] = debug
    if not debug:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """The CLI is an application, so it may silence the libraries' own progress bars and notices."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


main.add_command(scan)
main.add_command(audit)
main.add_command(calibrate)
main.add_command(serve)
main.add_command(demo)
main.add_command(explain)
