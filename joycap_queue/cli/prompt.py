"""`prompt`: show the exact prompt a set of caption options produces."""

from __future__ import annotations

from typing import Any

import click

from joycap_queue.captions import prompts
from joycap_queue.captions.request import build_request, profile_of
from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    build_settings,
    caption_options,
    model_options,
    request_of,
)


@click.command(cls=ExtraGreedyCommand)
@click.option("--list", "show_list", is_flag=True, help="List caption types, lengths and extra options.")
@click.option("--system", "show_system", is_flag=True, help="Also print the system prompt.")
@caption_options
@model_options
def prompt(show_list: bool, show_system: bool, **params: Any) -> None:
    """Print the prompt that these caption options give, exactly as the model will see it.

    \b
    Examples:
      joycap-queue prompt -t Descriptive -l long --extra 0 1 8 --name Alice
      joycap-queue prompt --profile alpha-two -t "Training Prompt" -l 40
      joycap-queue prompt --list
    """
    settings = build_settings(params)
    profile = profile_of(settings)
    if show_list:
        click.echo(f"profile {profile} (model {settings.model})\n\ncaption types:")
        for name in prompts.caption_types(profile):
            click.echo(f"  {name}")
        click.echo("\nlengths:\n  " + ", ".join(prompts.LENGTHS))
        click.echo("\nextra options (index, key, text):")
        for index, key, text in prompts.describe_extra_options(profile):
            click.echo(f"  {index:>2}  {key:<20} {text}")
        return
    request = build_request(settings, request_of(params))
    if show_system:
        click.echo(f"system: {prompts.system_prompt(profile)}")
    if request.prompt_file:
        click.echo(f"one of {len(request.prompt_file)} prompts, drawn per image by weight:")
        for item in request.prompt_file:
            click.echo(f"  [{item.weight:g}] {item.prompt}")
        return
    click.echo(request.prompt_for(""))


COMMANDS = [prompt]
