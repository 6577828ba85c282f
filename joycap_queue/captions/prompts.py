"""JoyCaption prompts, built exactly as upstream builds them, plus weighted prompt files.

The vocabulary (caption types, extra options, system prompts) lives in ``data/joycaption-prompts.json``:
the checkpoints were trained on those exact strings, so nothing here rewords them.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from joycap_queue.errors import OptionError

PROFILES: tuple[str, ...] = ("alpha-two", "beta-one")
# Kept in code rather than read from the JSON so that importing this module does no I/O; the tests
# check it against the JSON's "lengths".
LENGTHS: tuple[str, ...] = ("any", "very short", "short", "medium-length", "long", "very long") + tuple(
    str(n) for n in range(20, 261, 10)
)
# A stable public name for each extra option: index i is beta-one's option i, and alpha-two's 17 are
# beta-one's first 17 with the same texts. Append only; never reorder or rename.
EXTRA_OPTION_KEYS: tuple[str, ...] = (
    "name",
    "no-immutable-traits",
    "lighting",
    "camera-angle",
    "watermark",
    "jpeg-artifacts",
    "camera-details",
    "keep-pg",
    "no-resolution",
    "aesthetic-quality",
    "composition",
    "no-text",
    "depth-of-field",
    "lighting-sources",
    "no-ambiguity",
    "content-rating",
    "important-only",
    "no-artist-name",
    "orientation",
    "vulgar",
    "blunt",
    "ages",
    "shot-type",
    "no-mood",
    "vantage-height",
    "mention-watermark",
    "no-meta-phrases",
)
DEFAULT_CAPTION_TYPE = "Descriptive"
DEFAULT_LENGTH = "long"

_NAME_OPTION = 0
_MIN_WORDS, _MAX_WORDS, _WORD_STEP = 20, 260, 10


@dataclass(frozen=True)
class CaptionOptions:
    """What the user asked for; ``build_prompt`` turns it into the prompt text."""

    caption_type: str = DEFAULT_CAPTION_TYPE
    length: str = DEFAULT_LENGTH
    extra: tuple[int, ...] = ()
    name: str | None = None
    custom_prompt: str | None = None


@dataclass(frozen=True)
class WeightedPrompt:
    prompt: str
    weight: float = 1.0


@functools.cache
def vocabulary() -> dict[str, Any]:
    """The parsed prompt vocabulary (shared and cached: do not mutate it)."""
    text = resources.files("joycap_queue").joinpath("data/joycaption-prompts.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _squash(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.casefold())


def _profile_data(profile: str) -> dict[str, Any]:
    data: dict[str, Any] = vocabulary()[resolve_profile(profile)]
    return data


def profile_for_model(model: str) -> str:
    """The vocabulary a checkpoint was trained on, guessed from its hub id or folder name."""
    # Only the last path component: a parent folder such as /home/alpha/ must not decide it.
    name = re.split(r"[\\/]", model.strip().rstrip("\\/"))[-1]
    return "alpha-two" if "alpha" in name.casefold() else "beta-one"


def system_prompt(profile: str) -> str:
    return str(_profile_data(profile)["system_prompt"])


def caption_types(profile: str) -> list[str]:
    return list(_profile_data(profile)["caption_types"])


def extra_option_texts(profile: str) -> list[str]:
    return list(_profile_data(profile)["extra_options"])


def describe_extra_options(profile: str) -> list[tuple[int, str, str]]:
    """(index, key, text) for each extra option of the profile, for help output."""
    return [(i, EXTRA_OPTION_KEYS[i], text) for i, text in enumerate(extra_option_texts(profile))]


def resolve_profile(text: str) -> str:
    wanted = _squash(text)
    for profile in PROFILES:
        if _squash(profile) == wanted:
            return profile
    raise OptionError("profile", f"unknown profile {text!r}; choose one of: {', '.join(PROFILES)}")


def resolve_caption_type(profile: str, text: str) -> str:
    """The canonical caption type name; case, spaces and punctuation do not matter."""
    profile = resolve_profile(profile)
    names = caption_types(profile)
    wanted = _squash(text)
    for name in names:
        if _squash(name) == wanted:
            return name
    raise OptionError(
        "caption_type",
        f"unknown caption type {text!r} for {profile}; choose one of: {', '.join(names)}",
    )


def resolve_length(text: str) -> str:
    """The canonical length: a named length (case, spaces and hyphens ignored) or a word count."""
    cleaned = text.strip()
    if cleaned.isdecimal():
        # int() first so that "040" means 40; the word count must be one the model was trained on.
        words = int(cleaned)
        if _MIN_WORDS <= words <= _MAX_WORDS and words % _WORD_STEP == 0:
            return str(words)
    else:
        wanted = _squash(cleaned)
        for length in LENGTHS:
            if not length.isdecimal() and _squash(length) == wanted:
                return length
    named = ", ".join(length for length in LENGTHS if not length.isdecimal())
    raise OptionError(
        "length",
        f"unknown length {text!r}; choose {named}, "
        f"or a word count {_MIN_WORDS}-{_MAX_WORDS} in steps of {_WORD_STEP}",
    )


def _extra_error(profile: str, problem: str) -> OptionError:
    count = len(extra_option_texts(profile))
    keys = ", ".join(EXTRA_OPTION_KEYS[:count])
    return OptionError("extra", f"{problem}; choose an index 0-{count - 1} or a key: {keys}")


def _extra_index(profile: str, token: str | int) -> int:
    count = len(extra_option_texts(profile))
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise _extra_error(profile, f"extra option {token!r} is neither an index nor a key")
    if isinstance(token, int) or token.isdecimal():
        index = int(token)
        if 0 <= index < count:
            return index
        raise _extra_error(profile, f"extra option {index} does not exist for {profile} (it has {count})")
    key = token.strip().casefold().replace("_", "-").replace(" ", "-")
    if key in EXTRA_OPTION_KEYS:
        index = EXTRA_OPTION_KEYS.index(key)
        if index < count:
            return index
        raise _extra_error(profile, f"extra option {token!r} does not exist for {profile}")
    raise _extra_error(profile, f"unknown extra option {token!r} for {profile}")


def _split_tokens(tokens: Iterable[str | int]) -> Iterator[str | int]:
    for token in tokens:
        if isinstance(token, str):
            # Blank items are skipped so that a trailing comma ("0,1,") is harmless.
            yield from (item.strip() for item in token.split(",") if item.strip())
        else:
            yield token


def resolve_extra(profile: str, tokens: Iterable[str | int]) -> tuple[int, ...]:
    """Extra option indices from indices or keys (``8``, ``"8"``, ``"lighting"``, ``"0,1,8"``).

    Duplicates are dropped; the first occurrence keeps its place, since the order is the prompt's order.
    """
    profile = resolve_profile(profile)
    chosen: dict[int, None] = {}
    for token in _split_tokens(tokens):
        chosen.setdefault(_extra_index(profile, token), None)
    return tuple(chosen)


def build_prompt(profile: str, options: CaptionOptions) -> str:
    """The user prompt upstream JoyCaption would build for these options."""
    profile = resolve_profile(profile)
    if options.custom_prompt is not None and options.custom_prompt.strip():
        # Verbatim, never .format()ed: a custom prompt may legitimately contain braces.
        return options.custom_prompt.strip()

    data = _profile_data(profile)
    caption_type = resolve_caption_type(profile, options.caption_type)
    length = resolve_length(options.length)
    extra = resolve_extra(profile, options.extra)

    templates: list[str] = data["caption_types"][caption_type]
    if length == "any":
        prompt = templates[0]
    elif length.isdecimal():
        prompt = templates[1]
    else:
        prompt = templates[2]
    if extra:
        texts: list[str] = data["extra_options"]
        prompt = prompt + " " + " ".join(texts[i] for i in extra)

    name = (options.name or "").strip()
    if not name and _NAME_OPTION in extra:
        placeholder = data["name_placeholder_when_missing"]
        if placeholder is None:
            raise OptionError(
                "name",
                f"extra option {_NAME_OPTION} (name) needs a name: pass --name NAME "
                f"({profile} has no placeholder for a missing name)",
            )
        name = str(placeholder)
    # One format() over the whole string, as upstream does, so extra options can use {name} too.
    return prompt.format(name=name, length=length, word_count=length)


def _prompt_file_error(path: Path, problem: str) -> OptionError:
    return OptionError("prompt_file", f"prompt file {path}: {problem}")


def _parse_prompt_item(path: Path, number: int, item: object) -> WeightedPrompt:
    where = f"item #{number}"
    if isinstance(item, str):
        text, weight = item, 1.0
    elif isinstance(item, dict):
        unknown = sorted(set(item) - {"prompt", "weight"})
        if unknown:
            raise _prompt_file_error(
                path, f"{where} has unknown key {unknown[0]!r} (allowed: prompt, weight)"
            )
        raw_prompt = item.get("prompt")
        if not isinstance(raw_prompt, str):
            raise _prompt_file_error(path, f'{where} needs a "prompt" string')
        text = raw_prompt
        raw_weight = item.get("weight", 1.0)
        if isinstance(raw_weight, bool) or not isinstance(raw_weight, (int, float)):
            raise _prompt_file_error(path, f"{where} has a weight that is not a number: {raw_weight!r}")
        weight = float(raw_weight)
        # json.loads accepts NaN and Infinity, which would poison the weighted draw.
        if not math.isfinite(weight):
            raise _prompt_file_error(path, f"{where} has a weight that is not finite: {raw_weight!r}")
        if weight < 0:
            raise _prompt_file_error(path, f"{where} has a negative weight: {raw_weight!r}")
    else:
        raise _prompt_file_error(
            path, f'{where} is neither a string nor a {{"prompt", "weight"}} object: {item!r}'
        )
    if not text.strip():
        raise _prompt_file_error(path, f"{where} has an empty prompt")
    return WeightedPrompt(prompt=text.strip(), weight=weight)


PROMPT_FILE_MODES: tuple[str, ...] = ("draw", "all")


@dataclass(frozen=True)
class PromptFile:
    """A parsed prompt file: ``draw`` one prompt per image by weight, or ``all`` of them per image."""

    mode: str
    prompts: tuple[WeightedPrompt, ...]


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _prompt_file_error(path, f"cannot read it ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise _prompt_file_error(path, "is not UTF-8 text") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _prompt_file_error(
            path, f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc


def _mode_and_items(path: Path, data: object) -> tuple[str, object]:
    if not isinstance(data, dict):
        return "draw", data
    if not {"mode", "prompts"} & set(data):
        raise _prompt_file_error(
            path, 'must hold a JSON list of prompts or a {"mode": ..., "prompts": [...]} object'
        )
    unknown = sorted(set(data) - {"mode", "prompts"})
    if unknown:
        raise _prompt_file_error(path, f"has unknown key {unknown[0]!r} (allowed: mode, prompts)")
    mode = data.get("mode", "draw")
    if mode not in PROMPT_FILE_MODES:
        raise _prompt_file_error(
            path, f"has an unknown mode {mode!r}; choose {' or '.join(map(repr, PROMPT_FILE_MODES))}"
        )
    if "prompts" not in data:
        raise _prompt_file_error(path, 'needs a "prompts" list')
    return str(mode), data["prompts"]


def read_prompt_file(path: str | Path) -> PromptFile:
    """A prompt file: a JSON list of prompts, or ``{"mode": "draw" | "all", "prompts": [...]}``.

    Prompts are strings and/or ``{"prompt": ..., "weight": ...}`` objects, numbered from 1 in error
    messages and used verbatim (stripped), like --prompt. In mode ``all`` the weights are ignored
    and a prompt given twice counts once.
    """
    path = Path(path)
    mode, data = _mode_and_items(path, _read_json(path))
    if not isinstance(data, list):
        raise _prompt_file_error(path, f"must hold a JSON list of prompts, not a {type(data).__name__}")
    if not data:
        raise _prompt_file_error(path, "holds no prompts")
    items = [_parse_prompt_item(path, number, item) for number, item in enumerate(data, start=1)]
    if mode == "all":
        # Two equal prompts would be one job per image anyway (the same dedup key).
        unique = {item.prompt: item for item in items}
        return PromptFile(mode, tuple(unique.values()))
    if sum(p.weight for p in items) <= 0:
        raise _prompt_file_error(path, "all weights are 0; at least one must be positive")
    return PromptFile(mode, tuple(items))


def parse_prompt_file(path: str | Path) -> list[WeightedPrompt]:
    """The prompts of a prompt file, whatever its mode (see `read_prompt_file`)."""
    return list(read_prompt_file(path).prompts)


def draw_prompt(prompts: Sequence[WeightedPrompt], seed: str) -> str:
    """One prompt drawn by weight; the same seed always draws the same prompt.

    The caller seeds with the image's content hash, so a re-submitted image gets the same prompt and
    deduplicates. random.Random(str) hashes the string with SHA-512, so PYTHONHASHSEED does not matter.
    """
    if not prompts or sum(p.weight for p in prompts) <= 0:
        raise OptionError("prompt_file", "no prompt with a positive weight to draw from")
    chosen = random.Random(seed).choices(prompts, weights=[p.weight for p in prompts])[0]
    return chosen.prompt
