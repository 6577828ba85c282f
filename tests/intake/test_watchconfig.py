"""The watch config file: several inboxes, each with its own options; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from joycap_queue.config import Settings
from joycap_queue.errors import OptionError
from joycap_queue.intake.watch.config import load_watch_config


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    path = tmp_path / "watch.toml"
    path.write_text(text)
    return path


def test_inboxes_with_their_own_options(tmp_path: Path) -> None:
    (tmp_path / "prompts.json").write_text('["Describe it."]')
    config = load_watch_config(
        write(
            tmp_path,
            """
settle_seconds = 3
polling = true

[defaults]
length = "short"
sidecar = ["txt", "json"]

[[inbox]]
path = "a"
caption_type = "Straightforward"
extra = [0, "lighting"]
name = "Alice"
move = true

[[inbox]]
path = "b"
prompt_file = "prompts.json"
sidecar = "none"
sidecar_mode = "overwrite"
prepend = "ohwx, "
""",
        ),
        Settings(),
    )
    assert (config.settle_seconds, config.polling) == (3, True)
    first, second = config.inboxes
    assert first.path == (tmp_path / "a").resolve()
    assert first.request.prompt_for("x").startswith("Write a short straightforward caption for this image.")
    assert first.request.prompt_for("x").endswith(
        "Include information about lighting."
    ) and "refer to them as Alice" in first.request.prompt_for("x")
    assert (first.request.outputs.txt, first.request.outputs.json) == (True, True)
    assert first.request.outputs.done_dir == str((tmp_path / "a" / "done").resolve())
    assert second.request.prompt_for("anything") == "Describe it."
    assert (second.request.outputs.txt, second.request.outputs.mode) == (False, "overwrite")
    assert second.request.prepend == "ohwx, "


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            '[[inbox]]\npath = "a"\ncaption_type = "haiku"\n',
            "caption_type",
            "inbox #1: unknown caption type 'haiku'",
        ),
        ('[[inbox]]\npath = "a"\nlength = 25\n', "length", "inbox #1: unknown length '25'"),
        ('[[inbox]]\npath = "a"\n[[inbox]]\npath = "b"\nextra = [99]\n', "extra", "inbox #2"),
        ('[[inbox]]\npath = "a"\ncolour = "red"\n', "colour", "unknown key 'colour'"),
        ('[[inbox]]\npath = "missing"\n', "inbox", "is not a folder"),
        ('[[inbox]]\npath = "a"\nsidecar_mode = "merge"\n', "sidecar_mode", "unknown sidecar mode"),
        ("settle_seconds = 2\n", "config", "lists no [[inbox]]"),
        ("[[inbox]\n", "config", "not valid TOML"),
        ('[[inbox]]\npath = "a"\nmove = "yes"\n', "move", "wrong type"),
    ],
)
def test_errors_name_the_inbox_and_the_key(tmp_path: Path, body: str, field: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        load_watch_config(write(tmp_path, body), Settings())
    assert info.value.field == field
    assert message in str(info.value)
    assert "\n" not in str(info.value)
