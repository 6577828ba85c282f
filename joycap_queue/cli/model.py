"""`model make-tiny` and `model merge-lora`: build checkpoint folders (the heavy side, imported inside)."""

from __future__ import annotations

from pathlib import Path

import click

from joycap_queue.cli.options import tiny_model_notice
from joycap_queue.errors import JoycapError, OptionError


@click.group()
def model() -> None:
    """Model utilities: a tiny test model, a LoRA adapter merged into its base.

    \b
    Examples:
      joycap-queue model make-tiny ./tiny-model
      joycap-queue model merge-lora fancyfeast/llama-joycaption-beta-one-hf-llava ./my-lora ./merged
    """


@model.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--profile", type=click.Choice(["alpha-two", "beta-one"]), default="beta-one", show_default=True
)
def make_tiny(directory: Path, seed: int, profile: str) -> None:
    """Build a tiny random-weight JoyCaption-shaped model offline, for tests and the demo.

    Same classes and config keys as JoyCaption (LLaVA: SigLIP 384 px vision tower, Llama text
    model, 729 image tokens), a few MB, built in seconds. Its captions are random text.

    \b
    Example:
      joycap-queue model make-tiny ./tiny-model && JOYCAP_MODEL=./tiny-model joycap-queue worker
    """
    from worker.model.tiny import build_tiny_model

    out = build_tiny_model(directory, seed=seed, profile=profile)
    click.echo(str(Path(out).resolve()))
    tiny_model_notice(str(out))


@model.command("merge-lora")
@click.argument("base")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="dtype of the merged weights; auto keeps the base checkpoint's.",
)
def merge_lora(base: str, adapter: Path, out: Path, dtype: str) -> None:
    """Merge a LoRA ADAPTER into the BASE checkpoint and write the result to the folder OUT.

    The merged folder is a whole checkpoint: pass it as --model to a worker, to vLLM (which
    takes no LoRA on VLMs), or share it. BASE is a Hugging Face id or a local folder; ADAPTER a
    folder as peft's save_pretrained (upstream's finetuning/train.py) writes it.

    \b
    Example:
      joycap-queue model merge-lora fancyfeast/llama-joycaption-beta-one-hf-llava ./my-lora ./merged
      joycap-queue worker --model ./merged
    """
    if out.exists() and any(out.iterdir()):
        raise JoycapError(f"{out} is not empty: give a new folder for the merged checkpoint")
    from worker.backends.base import ModelLoadError
    from worker.model.lora import merge_lora as merge

    click.echo(f"merging {adapter} into {base} ...", err=True)
    try:
        written = merge(base, str(adapter), out, dtype=dtype)
    except (ModelLoadError, OptionError) as exc:
        raise JoycapError(str(exc)) from None
    click.echo(str(written.resolve()))


COMMANDS = [model]
