"""Options shared by several commands, and turning click's values into Settings and RequestOptions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from joycap_queue.captions import prompts
from joycap_queue.captions.request import RequestOptions, normalize_model
from joycap_queue.config import Settings, is_tiny_model, settings_with

F = TypeVar("F", bound=Callable[..., Any])

CONNECTION_SETTINGS = ("broker_url", "database_url")
MODEL_SETTINGS = ("model", "profile", "device", "dtype", "torch_threads", "quantize", "lora")
GENERATION_SETTINGS = ("temperature", "top_p", "top_k", "max_new_tokens", "greedy", "seed")


def _apply(func: F, decorators: list[Callable[[F], F]]) -> F:
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _setting(flag: str, **attrs: Any) -> Callable[[F], F]:
    """An option for a setting: it also takes the setting's JOYCAP_ variable, shown in --help."""
    attrs.setdefault("envvar", "JOYCAP_" + flag.removeprefix("--").replace("-", "_").upper())
    attrs.setdefault("show_envvar", True)
    return click.option(flag, **attrs)


def connection_options(func: F) -> F:
    return _apply(
        func,
        [
            _setting("--broker-url", help="Redis URL of the queue [default: redis://127.0.0.1:6379/0]."),
            _setting(
                "--database-url",
                help="SQLAlchemy URL of the results database [default: SQLite file in the data dir].",
            ),
        ],
    )


def model_options(func: F) -> F:
    return _apply(
        func,
        [
            _setting(
                "--model",
                help="Hugging Face id or local folder of a JoyCaption LLaVA checkpoint "
                "[default: fancyfeast/llama-joycaption-beta-one-hf-llava].",
            ),
            _setting(
                "--profile",
                type=click.Choice(prompts.PROFILES),
                help="Prompt vocabulary [default: follows the model: alpha-two for an alpha checkpoint].",
            ),
        ],
    )


def variant_options(func: F) -> F:
    """Quantization and LoRA adapter: what the worker loads, and part of what a job asks for."""
    return _apply(
        func,
        [
            _setting(
                "--quantize",
                type=click.Choice(["none", "8bit", "nf4"]),
                help="Load the language model in 8 or 4 bits (bitsandbytes) to fit a 12-16 GB card; the "
                "vision tower, projector and lm_head stay unquantized [default: none].",
            ),
            _setting(
                "--lora",
                help="A LoRA adapter folder (peft, as upstream's finetuning/train.py saves it) applied "
                "over --model [default: none].",
            ),
        ],
    )


def device_options(func: F) -> F:
    return _apply(
        func,
        [
            _setting("--device", help="auto, cpu, cuda, cuda:1 …"),
            _setting(
                "--dtype",
                type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
                help="Model dtype [default: bfloat16 on CUDA, float32 on CPU].",
            ),
        ],
    )


def caption_options(func: F) -> F:
    return _apply(
        func,
        [
            click.option(
                "--caption-type",
                "-t",
                default=prompts.DEFAULT_CAPTION_TYPE,
                show_default=True,
                help="Caption type, e.g. Descriptive, 'Straightforward', 'Booru-like tag list' (see `prompt --list`).",
            ),
            click.option(
                "--length",
                "-l",
                default=prompts.DEFAULT_LENGTH,
                show_default=True,
                help="any, very short, short, medium-length, long, very long, or 20..260 words in steps of 10.",
            ),
            click.option(
                "--extra",
                "-e",
                "extra",
                multiple=True,
                help="Extra options by index or key, upstream style: --extra 0 1 8 or --extra lighting.",
            ),
            click.option("--name", help="Name for the person/character option (extra option 0 / 'name')."),
            click.option(
                "--prompt",
                "-p",
                "custom_prompt",
                multiple=True,
                help="A custom prompt; overrides type, length and extras. Repeat it for several captions "
                'per image: one job per image and prompt (a prompt file does it with "mode": "all").',
            ),
            click.option(
                "--prompt-file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="JSON list of prompts (strings or {prompt, weight}); one is drawn per image.",
            ),
            click.option("--prepend", default="", help="Text put before every caption (a trigger word …)."),
            click.option("--append", default="", help="Text put after every caption."),
            click.option(
                "--strip-lead-in",
                is_flag=True,
                help="Drop openings like 'This image is a photograph of' from stored captions (raw kept).",
            ),
            click.option(
                "--drop-sentences",
                multiple=True,
                metavar="PATTERN",
                help="Drop stored captions' sentences matching this regex, any case (repeatable), e.g. watermark.",
            ),
            click.option(
                "--dedupe-tags", is_flag=True, help="Tag-list captions: keep each tag once (raw kept)."
            ),
        ],
    )


def output_options(default_sidecar: tuple[str, ...]) -> Callable[[F], F]:
    """Sidecar files and moving, written by the worker when each job ends."""
    shown = ", ".join(default_sidecar) or "none"

    def decorate(func: F) -> F:
        return _apply(
            func,
            [
                click.option(
                    "--sidecar",
                    multiple=True,
                    type=click.Choice(["txt", "json", "none"]),
                    help=f"Write image.txt and/or image.json beside each image when it is done [default: {shown}].",
                ),
                click.option(
                    "--sidecar-mode",
                    type=click.Choice(["skip", "overwrite", "append", "prepend"]),
                    default="skip",
                    show_default=True,
                    help="What to do with a sidecar that already exists.",
                ),
                click.option(
                    "--skip-flagged-sidecars",
                    is_flag=True,
                    help="No sidecar for a caption the quality guard flagged (see `results --quality flagged`).",
                ),
                click.option(
                    "--move",
                    is_flag=True,
                    help="Move done images (with sidecars) to done/ and failed ones to failed/.",
                ),
                click.option("--done-dir", help="Where --move puts done images [default: INBOX/done]."),
                click.option("--failed-dir", help="Where --move puts failed images [default: INBOX/failed]."),
            ],
        )

    return decorate


def generation_options(func: F) -> F:
    return _apply(
        func,
        [
            _setting("--temperature", type=float, show_envvar=False, help="[default: 0.6]"),
            _setting("--top-p", type=str, show_envvar=False, help="[default: 0.9; 'none' turns it off]"),
            _setting("--top-k", type=str, show_envvar=False, help="[default: off]"),
            _setting("--max-new-tokens", type=int, show_envvar=False, help="[default: 256]"),
            _setting(
                "--greedy/--sample",
                default=None,
                envvar="JOYCAP_GREEDY",
                show_envvar=False,
                help="Greedy decoding [default: sample].",
            ),
            _setting(
                "--seed",
                type=click.IntRange(min=0),
                show_envvar=False,
                help="Sample repeatably: the same image and seed give the same caption, whatever else "
                "is in flight (continuous engine) [default: a fresh draw per caption].",
            ),
        ],
    )


def request_options(func: F) -> F:
    """Everything that decides a caption: caption, generation, model and variant options."""
    return _apply(func, [caption_options, generation_options, model_options, variant_options])


def intake_options(default_sidecar: tuple[str, ...]) -> Callable[[F], F]:
    """What queueing images takes: where the outputs go, the request, and the connections."""

    def decorate(func: F) -> F:
        return _apply(func, [output_options(default_sidecar), request_options, connection_options])

    return decorate


def request_of(params: Mapping[str, Any]) -> RequestOptions:
    """The command's caption and output options, typed, from click's keyword arguments."""
    return RequestOptions.from_params(params)


def bad_setting(exc: ValidationError) -> click.BadParameter:
    """A settings validation error as click's one line, naming the option it came from."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "settings"
    message = str(error["msg"]).removeprefix("Value error, ")
    return click.BadParameter(message, param_hint=f"'--{field.replace('_', '-')}'")


def build_settings(params: Mapping[str, Any]) -> Settings:
    """Settings from the environment with the command's options on top; one clear line if invalid."""
    names = (
        *CONNECTION_SETTINGS,
        *MODEL_SETTINGS,
        *GENERATION_SETTINGS,
        "concurrency",
        "max_attempts",
        "queue",
    )
    overrides = {name: params.get(name) for name in names}
    model = overrides.get("model")
    if isinstance(model, str):
        overrides["model"] = normalize_model(model)
    try:
        settings = settings_with(**overrides)
    except ValidationError as exc:
        raise bad_setting(exc) from None
    if settings.model != normalize_model(settings.model):
        settings = settings.model_copy(update={"model": normalize_model(settings.model)})
    if settings.lora and settings.lora != normalize_model(settings.lora):
        settings = settings.model_copy(update={"lora": normalize_model(settings.lora)})
    return settings


def tiny_model_notice(model: str) -> None:
    if is_tiny_model(model):
        click.secho(
            f"note: {model} is the tiny random-weight test model: its captions are random text.",
            fg="yellow",
            err=True,
        )


class ExtraGreedyCommand(click.Command):
    """Lets ``--extra 0 1 8`` take several values, as upstream's ``--extra_options 0 1 8`` does.

    Click options take one value each, so the values after ``--extra`` that look like option
    indices or keys are rewritten into repeated ``--extra`` options before parsing.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        keys = set(prompts.EXTRA_OPTION_KEYS)
        rewritten: list[str] = []
        greedy = False
        for arg in args:
            if arg in ("--extra", "-e"):
                greedy = True
                rewritten.append(arg)
                continue
            if greedy and rewritten[-1] not in ("--extra", "-e") and (arg.isdigit() or arg in keys):
                rewritten.extend(["--extra", arg])
                continue
            if greedy and rewritten[-1] in ("--extra", "-e"):
                rewritten.append(arg)
                continue
            greedy = False
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)
