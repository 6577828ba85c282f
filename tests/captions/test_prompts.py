"""Prompts must be byte-identical to upstream JoyCaption's: the expected strings are built here from the
JSON vocabulary directly (or written out by hand), never by calling the code under test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from joycap_queue.captions.prompts import (
    EXTRA_OPTION_KEYS,
    LENGTHS,
    PROFILES,
    CaptionOptions,
    build_prompt,
    caption_types,
    describe_extra_options,
    extra_option_texts,
    profile_for_model,
    resolve_caption_type,
    resolve_extra,
    resolve_length,
    resolve_profile,
    system_prompt,
    vocabulary,
)
from joycap_queue.errors import OptionError
from tests.support.prompts import option_error as _raises

JSON_PATH = Path(__file__).resolve().parents[2] / "joycap_queue" / "data" / "joycaption-prompts.json"
with JSON_PATH.open(encoding="utf-8") as _f:
    VOCAB = json.load(_f)

NAMED_LENGTHS = ["very short", "short", "medium-length", "long", "very long"]
NUMERIC_LENGTHS = [str(n) for n in range(20, 261, 10)]
ALL_LENGTHS = ["any", *NAMED_LENGTHS, *NUMERIC_LENGTHS]


def expected_prompt(profile: str, caption_type: str, length: str, extra=(), name=None) -> str:
    vocab = VOCAB[profile]
    templates = vocab["caption_types"][caption_type]
    if length == "any":
        text = templates[0]
    elif length in NUMERIC_LENGTHS:
        text = templates[1]
    else:
        text = templates[2]
    if extra:
        text += " " + " ".join(vocab["extra_options"][i] for i in extra)
    return text.format(name=name, length=length, word_count=length)


# --- vocabulary ---------------------------------------------------------------------------------


def test_lengths_match_json() -> None:
    assert list(LENGTHS) == VOCAB["lengths"] == ALL_LENGTHS


def test_vocabulary_is_the_json() -> None:
    assert vocabulary() == VOCAB


def test_counts() -> None:
    assert PROFILES == ("alpha-two", "beta-one")
    assert len(caption_types("alpha-two")) == 9
    assert len(extra_option_texts("alpha-two")) == 17
    assert len(caption_types("beta-one")) == 12
    assert len(extra_option_texts("beta-one")) == 27


def test_caption_types_and_extra_texts_follow_json_order() -> None:
    for profile in PROFILES:
        assert caption_types(profile) == list(VOCAB[profile]["caption_types"])
        assert extra_option_texts(profile) == VOCAB[profile]["extra_options"]


def test_alpha_extra_options_are_betas_first_17() -> None:
    assert VOCAB["alpha-two"]["extra_options"] == VOCAB["beta-one"]["extra_options"][:17]


def test_system_prompts() -> None:
    assert system_prompt("alpha-two") == "You are a helpful image captioner."
    assert system_prompt("beta-one") == (
        "You are a helpful assistant and help users with any queries they may have "
        "with no censorship or restrictions."
    )


def test_extra_option_keys() -> None:
    assert len(EXTRA_OPTION_KEYS) == 27 == len(VOCAB["beta-one"]["extra_options"])
    assert len(set(EXTRA_OPTION_KEYS)) == 27
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key) for key in EXTRA_OPTION_KEYS)
    assert EXTRA_OPTION_KEYS[0] == "name"
    assert EXTRA_OPTION_KEYS[8] == "no-resolution"
    assert EXTRA_OPTION_KEYS[16] == "important-only"
    assert EXTRA_OPTION_KEYS[26] == "no-meta-phrases"


def test_describe_extra_options() -> None:
    rows = describe_extra_options("alpha-two")
    assert len(rows) == 17
    assert rows[2] == (2, EXTRA_OPTION_KEYS[2], VOCAB["alpha-two"]["extra_options"][2])
    rows = describe_extra_options("beta-one")
    assert [i for i, _, _ in rows] == list(range(27))
    assert rows[-1] == (26, "no-meta-phrases", VOCAB["beta-one"]["extra_options"][26])


def test_light_side_does_not_import_torch() -> None:
    code = "import sys, joycap_queue.captions.prompts; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- building prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "caption_type"),
    [(profile, ct) for profile in ("alpha-two", "beta-one") for ct in VOCAB[profile]["caption_types"]],
)
def test_every_caption_type_and_length(profile: str, caption_type: str) -> None:
    for length in ALL_LENGTHS:
        got = build_prompt(profile, CaptionOptions(caption_type=caption_type, length=length))
        assert got == expected_prompt(profile, caption_type, length), (profile, caption_type, length)
        assert "{" not in got


def test_hand_written_prompts() -> None:
    assert build_prompt("beta-one", CaptionOptions()) == "Write a long detailed description for this image."
    assert (
        build_prompt("alpha-two", CaptionOptions(length="40"))
        == "Write a descriptive caption for this image in a formal tone within 40 words."
    )
    assert (
        build_prompt("alpha-two", CaptionOptions(caption_type="Art Critic", length="very short"))
        == "Analyze this image like an art critic would with information about its composition, style, "
        "symbolism, the use of color, light, any artistic movement it might belong to, etc. "
        "Keep it very short."
    )
    assert (
        build_prompt("beta-one", CaptionOptions(caption_type="MidJourney", length="any", extra=(2,)))
        == "Write a MidJourney prompt for this image. Include information about lighting."
    )


def test_extra_by_index_and_by_key_are_identical() -> None:
    expected = (
        "Write a long detailed description for this image. "
        "If there is a person/character in the image you must refer to them as Alice. "
        "Do NOT include information about people/characters that cannot be changed (like ethnicity, "
        "gender, etc), but do still include changeable attributes (like hair style). "
        "Do NOT mention the image's resolution."
    )
    assert expected == expected_prompt("beta-one", "Descriptive", "long", (0, 1, 8), "Alice")
    spellings = [
        [0, 1, 8],
        ["0", "1", "8"],
        ["0,1,8"],
        [" 0, 1 ,8 "],
        ["name", "no-immutable-traits", "no-resolution"],
        ["NAME", "no_immutable_traits", "8"],
        ["name,1", "no-resolution"],
    ]
    for tokens in spellings:
        extra = resolve_extra("beta-one", tokens)
        assert extra == (0, 1, 8), tokens
        assert build_prompt("beta-one", CaptionOptions(extra=extra, name="Alice")) == expected


def test_extra_order_is_kept() -> None:
    assert resolve_extra("alpha-two", ["8", "2", "lighting-sources"]) == (8, 2, 13)
    got = build_prompt("alpha-two", CaptionOptions(length="any", extra=(8, 2)))
    assert got == (
        "Write a descriptive caption for this image in a formal tone. "
        "Do NOT mention the image's resolution. Include information about lighting."
    )
    assert got != build_prompt("alpha-two", CaptionOptions(length="any", extra=(2, 8)))


def test_extra_duplicates_dropped_keeping_first() -> None:
    assert resolve_extra("beta-one", ["8", "lighting", 8, "no-resolution,2", "0"]) == (8, 2, 0)
    assert resolve_extra("beta-one", []) == ()


def test_beta_only_options_work_on_beta() -> None:
    assert resolve_extra("beta-one", ["17", "vulgar", 26]) == (17, 19, 26)
    got = build_prompt("beta-one", CaptionOptions(length="any", extra=(17,)))
    assert got.endswith(" " + VOCAB["beta-one"]["extra_options"][17])


def test_alpha_name_option_without_name_is_an_error() -> None:
    for name in (None, "", "   "):
        with pytest.raises(OptionError) as info:
            build_prompt("alpha-two", CaptionOptions(extra=(0,), name=name))
        assert info.value.field == "name"
        assert "--name" in str(info.value)


def test_beta_name_option_without_name_uses_placeholder() -> None:
    got = build_prompt("beta-one", CaptionOptions(extra=(0,)))
    assert got == (
        "Write a long detailed description for this image. "
        "If there is a person/character in the image you must refer to them as {NAME}."
    )


def test_name_without_name_option_is_unused() -> None:
    got = build_prompt("alpha-two", CaptionOptions(name="Alice", extra=(2,)))
    assert got == expected_prompt("alpha-two", "Descriptive", "long", (2,))
    assert "Alice" not in got


def test_name_is_used_verbatim_inside_format() -> None:
    got = build_prompt("alpha-two", CaptionOptions(length="any", extra=(0,), name="Dr. {Who}"))
    assert got.endswith("you must refer to them as Dr. {Who}.")


def test_custom_prompt_overrides_everything() -> None:
    options = CaptionOptions(
        caption_type="no such type",
        length="huge",
        extra=(0, 99),
        custom_prompt="  Describe {this} image for {name}.\n",
    )
    assert build_prompt("alpha-two", options) == "Describe {this} image for {name}."


def test_blank_custom_prompt_is_ignored() -> None:
    got = build_prompt("beta-one", CaptionOptions(custom_prompt="  \n "))
    assert got == "Write a long detailed description for this image."


# --- resolving user input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "text", "canonical"),
    [
        ("alpha-two", "descriptive-informal", "Descriptive (Informal)"),
        ("alpha-two", "DESCRIPTIVE (INFORMAL)", "Descriptive (Informal)"),
        ("alpha-two", "booru like tag list", "Booru-like tag list"),
        ("alpha-two", "Booru-like tag list", "Booru-like tag list"),
        ("alpha-two", "booru_tag_list", "Booru tag list"),
        ("alpha-two", "training prompt", "Training Prompt"),
        ("beta-one", "descriptive-casual", "Descriptive (Casual)"),
        ("beta-one", "stable-diffusion-prompt", "Stable Diffusion Prompt"),
        ("beta-one", "E621 Tag List", "e621 tag list"),
        ("beta-one", " rule34-tag-list ", "Rule34 tag list"),
        ("beta-one", "midjourney", "MidJourney"),
    ],
)
def test_caption_type_resolution(profile: str, text: str, canonical: str) -> None:
    assert resolve_caption_type(profile, text) == canonical
    assert build_prompt(profile, CaptionOptions(caption_type=text)) == expected_prompt(
        profile, canonical, "long"
    )


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("Long", "long"),
        ("very-short", "very short"),
        ("very short", "very short"),
        ("VERY  LONG", "very long"),
        ("medium-length", "medium-length"),
        ("Medium Length", "medium-length"),
        ("any", "any"),
        (" 40 ", "40"),
        ("20", "20"),
        ("260", "260"),
    ],
)
def test_length_resolution(text: str, canonical: str) -> None:
    assert resolve_length(text) == canonical


def test_profile_resolution() -> None:
    assert resolve_profile("beta-one") == "beta-one"
    assert resolve_profile("Alpha Two") == "alpha-two"


@pytest.mark.parametrize(
    ("model", "profile"),
    [
        ("fancyfeast/llama-joycaption-alpha-two-hf-llava", "alpha-two"),
        ("fancyfeast/llama-joycaption-beta-one-hf-llava", "beta-one"),
        ("/models/JoyCaption-Alpha-Two/", "alpha-two"),
        ("C:\\models\\llama-joycaption-ALPHA-two", "alpha-two"),
        ("./checkpoints/llama-joycaption-beta-one-hf-llava", "beta-one"),
        ("/home/alpha/models/llama-joycaption-beta-one", "beta-one"),
    ],
)
def test_profile_for_model(model: str, profile: str) -> None:
    assert profile_for_model(model) == profile


def test_unknown_caption_type() -> None:
    message = _raises(
        "caption_type",
        lambda: resolve_caption_type("beta-one", "x"),
        "'x'",
        "beta-one",
        "Descriptive (Casual)",
        "Rule34 tag list",
        "Social Media Post",
    )
    assert message.startswith("unknown caption type 'x' for beta-one; choose one of: ")
    # A type only alpha-two knows is not valid on beta-one, and vice versa.
    _raises("caption_type", lambda: resolve_caption_type("beta-one", "Descriptive (Informal)"), "MidJourney")
    _raises("caption_type", lambda: resolve_caption_type("alpha-two", "Straightforward"), "Booru tag list")
    _raises("caption_type", lambda: build_prompt("alpha-two", CaptionOptions(caption_type="poem")))


@pytest.mark.parametrize("text", ["25", "huge", "300", "10", "0", "medium", "", "-20", "40.0"])
def test_invalid_length(text: str) -> None:
    _raises(
        "length", lambda: resolve_length(text), "any", "very short", "medium-length", "very long", "20-260"
    )
    _raises("length", lambda: build_prompt("beta-one", CaptionOptions(length=text)))


def test_extra_index_17_is_out_of_range_on_alpha_only() -> None:
    message = _raises("extra", lambda: resolve_extra("alpha-two", ["17"]), "17", "0-16", "important-only")
    assert "vulgar" not in message
    _raises("extra", lambda: resolve_extra("alpha-two", [17]), "0-16")
    _raises("extra", lambda: build_prompt("alpha-two", CaptionOptions(extra=(17,))), "0-16")
    assert resolve_extra("beta-one", ["17"]) == (17,)


@pytest.mark.parametrize(
    ("profile", "tokens"),
    [
        ("beta-one", ["sparkles"]),
        ("beta-one", ["27"]),
        ("beta-one", ["-1"]),
        ("beta-one", [-1]),
        ("beta-one", ["0,sparkles"]),
        ("alpha-two", ["vulgar"]),
        ("alpha-two", ["no-meta-phrases"]),
    ],
)
def test_invalid_extra(profile: str, tokens: list) -> None:
    last = "no-meta-phrases" if profile == "beta-one" else "important-only"
    _raises("extra", lambda: resolve_extra(profile, tokens), "name", "lighting", last)


def test_unknown_profile() -> None:
    _raises("profile", lambda: resolve_profile("gamma"), "alpha-two", "beta-one")
    _raises("profile", lambda: build_prompt("gamma", CaptionOptions()), "alpha-two", "beta-one")
    _raises("profile", lambda: caption_types("gamma"), "beta-one")
