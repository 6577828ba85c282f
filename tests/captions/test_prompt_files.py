"""Prompt files (strings, weighted objects, mixes) and the per-image draw from them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from joycap_queue.captions.prompts import WeightedPrompt, draw_prompt, parse_prompt_file
from tests.support.prompts import option_error as _raises
from tests.support.prompts import seeds

# --- prompt files -------------------------------------------------------------------------------


def _write(tmp_path: Path, content: str, name: str = "prompts.json") -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_prompt_file_of_strings(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps(["Describe it.", "  Tag it {now}.  "]))
    assert parse_prompt_file(path) == [
        WeightedPrompt("Describe it.", 1.0),
        WeightedPrompt("Tag it {now}.", 1.0),
    ]
    assert parse_prompt_file(str(path)) == parse_prompt_file(path)


def test_prompt_file_of_weighted_objects(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps([{"prompt": "A", "weight": 2}, {"prompt": "B", "weight": 0.5}]))
    assert parse_prompt_file(path) == [WeightedPrompt("A", 2.0), WeightedPrompt("B", 0.5)]


def test_prompt_file_mixed(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps(["A", {"prompt": "B"}, {"prompt": "C", "weight": 0}]))
    assert parse_prompt_file(path) == [
        WeightedPrompt("A", 1.0),
        WeightedPrompt("B", 1.0),
        WeightedPrompt("C", 0.0),
    ]


@pytest.mark.parametrize(
    ("content", "mention"),
    [
        ('["a", ', "JSON"),
        ("not json", "JSON"),
        ('{"prompt": "a"}', "list"),
        ('"a"', "list"),
        ("[]", "no prompts"),
        ('["a", 5]', "#2"),
        ('["a", null]', "#2"),
        ('["a", ""]', "#2"),
        ('["a", {"weight": 1}]', "#2"),
        ('["a", {"prompt": 3}]', "#2"),
        ('["a", {"prompt": "  "}]', "#2"),
        ('["a", {"prompt": "b", "weight": "2"}]', "#2"),
        ('["a", {"prompt": "b", "weight": true}]', "#2"),
        ('["a", {"prompt": "b", "weight": NaN}]', "#2"),
        ('["a", {"prompt": "b", "weigth": 2}]', "weigth"),
        ('["a", {"prompt": "b", "weight": -1}]', "negative"),
        ('[{"prompt": "a", "weight": 0}, {"prompt": "b", "weight": 0}]', "weight"),
    ],
)
def test_invalid_prompt_file(tmp_path: Path, content: str, mention: str) -> None:
    path = _write(tmp_path, content, "bad-prompts.json")
    message = _raises("prompt_file", lambda: parse_prompt_file(path), "bad-prompts.json", mention)
    assert "\n" not in message


def test_unreadable_prompt_file(tmp_path: Path) -> None:
    _raises("prompt_file", lambda: parse_prompt_file(tmp_path / "missing.json"), "missing.json")
    _raises("prompt_file", lambda: parse_prompt_file(tmp_path), str(tmp_path))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00[")
    _raises("prompt_file", lambda: parse_prompt_file(binary), "binary.json")


def test_draw_is_deterministic_per_seed() -> None:
    prompts = [WeightedPrompt(p) for p in "ABCDEFGH"]
    for seed in seeds(20):
        first = draw_prompt(prompts, seed)
        assert all(draw_prompt(prompts, seed) == first for _ in range(3))
    assert len({draw_prompt(prompts, seed) for seed in seeds(50)}) > 1


def test_draw_never_picks_weight_zero() -> None:
    prompts = [WeightedPrompt("zero-first", 0), WeightedPrompt("A", 1), WeightedPrompt("zero", 0.0)]
    drawn = Counter(draw_prompt(prompts, seed) for seed in seeds(200))
    assert drawn == Counter({"A": 200})


def test_draw_follows_weights() -> None:
    prompts = [WeightedPrompt("light", 1), WeightedPrompt("heavy", 3)]
    drawn = Counter(draw_prompt(prompts, seed) for seed in seeds(400))
    assert drawn["light"] > 0
    assert drawn["heavy"] > 2 * drawn["light"]


def test_draw_from_nothing_is_an_error() -> None:
    _raises("prompt_file", lambda: draw_prompt([], "seed"))
    _raises("prompt_file", lambda: draw_prompt([WeightedPrompt("a", 0)], "seed"))
