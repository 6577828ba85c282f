"""`joycap-queue`: the command line. Commands are thin; the work happens in the modules they call."""

from __future__ import annotations

from typing import Any

import click

from joycap_queue import __version__
from joycap_queue.errors import JoycapError, OptionError
from joycap_queue.outages import outage, outage_line

HELP = """Caption large image collections with JoyCaption through a Redis job queue.

\b
  joycap-queue worker                       # on each GPU machine
  joycap-queue submit photos/ -t Descriptive -l long
  joycap-queue status --watch
  joycap-queue results --jsonl > captions.jsonl
"""


class JoycapGroup(click.Group):
    """Turns the errors a user can fix into one line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OptionError as exc:
            raise click.BadParameter(str(exc), param_hint=f"'--{exc.field.replace('_', '-')}'") from None
        except JoycapError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None
        except Exception as exc:
            # The database or Redis went away (or SQLite stayed locked) in a command that has no
            # better advice of its own: what failed, in one line, and that a rerun is the remedy.
            reason = outage(exc)
            if reason is None:
                raise
            raise click.ClickException(outage_line(reason, "run the command again once it is back")) from None


@click.group(cls=JoycapGroup, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="joycap-queue")
def cli() -> None:
    pass


def _register() -> None:
    from joycap_queue.cli import deploy, export, inspect, manage, model, prompt, run, submit, watch

    for module in (submit, watch, inspect, prompt, run, model, deploy, export, manage):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="joycap-queue")
