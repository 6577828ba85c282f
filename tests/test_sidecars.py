"""Sidecar files and moves: modes, names, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from joycap_queue.errors import OptionError
from joycap_queue.sidecars import (
    OutputOptions,
    finish_done,
    finish_failed,
    merge_caption,
    sidecar_path,
    write_sidecars,
)


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)
    return path


@pytest.mark.parametrize(
    ("existing", "mode", "expected"),
    [
        (None, "skip", "new"),
        ("old", "skip", None),
        ("old", "overwrite", "new"),
        ("old", "append", "old. new"),
        ("old.", "append", "old. new"),
        ("old\n", "prepend", "new. old"),
        ("", "append", "new"),
    ],
)
def test_merge_modes(existing: str | None, mode: str, expected: str | None) -> None:
    assert merge_caption(existing, "new", mode) == expected


def test_unknown_mode_names_the_field() -> None:
    with pytest.raises(OptionError) as info:
        OutputOptions(txt=True, mode="merge")
    assert info.value.field == "sidecar_mode" and "skip, overwrite, append, prepend" in str(info.value)


def test_same_stem_images_get_full_names(tmp_path: Path) -> None:
    alone = image(tmp_path / "solo" / "a.jpg")
    assert sidecar_path(alone, ".txt") == tmp_path / "solo" / "a.txt"
    jpg, png = image(tmp_path / "pair" / "a.jpg"), image(tmp_path / "pair" / "a.png")
    (tmp_path / "pair" / "a.txt").write_text("not an image, not a sibling")
    assert sidecar_path(jpg, ".txt") == tmp_path / "pair" / "a.jpg.txt"
    assert sidecar_path(png, ".json") == tmp_path / "pair" / "a.png.json"
    # A twin left behind in the folder an image was moved out of still counts.
    assert sidecar_path(alone, ".txt", also_in=tmp_path / "empty") == tmp_path / "solo" / "a.txt"
    moved = image(tmp_path / "done" / "a.png")
    assert sidecar_path(moved, ".txt", also_in=tmp_path / "pair") == tmp_path / "done" / "a.png.txt"


def test_write_sidecars_keeps_or_merges_existing(tmp_path: Path) -> None:
    picture = image(tmp_path / "p.png")
    (tmp_path / "p.txt").write_text("hand written")
    record = {"caption": "cap\r\nline"}
    assert write_sidecars(
        picture, OutputOptions(txt=True, json=True), caption="cap\r\nline", record=record
    ) == [tmp_path / "p.json"]
    assert (tmp_path / "p.txt").read_text() == "hand written"
    write_sidecars(picture, OutputOptions(txt=True, mode="prepend"), caption="ohwx", record=record)
    assert (tmp_path / "p.txt").read_bytes() == b"ohwx. hand written"
    write_sidecars(picture, OutputOptions(txt=True, mode="overwrite"), caption="cap\r\nline", record=record)
    assert (tmp_path / "p.txt").read_bytes() == b"cap\r\nline"  # written exactly, newlines included
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_finish_moves_keep_relative_paths(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    good = image(inbox / "cats" / "tom.png")
    bad = image(inbox / "cats" / "bad.png")
    options = OutputOptions(
        txt=True, inbox=str(inbox), done_dir=str(tmp_path / "done"), failed_dir=str(tmp_path / "failed")
    )
    moved = finish_done(good, options, caption="a cat", record={})
    assert moved == tmp_path / "done" / "cats" / "tom.png" and moved.exists() and not good.exists()
    assert (tmp_path / "done" / "cats" / "tom.txt").read_text() == "a cat"
    failed = finish_failed(bad, options, reason="broken image: truncated")
    assert failed == tmp_path / "failed" / "cats" / "bad.png"
    assert (tmp_path / "failed" / "cats" / "bad.png.error.txt").read_text() == "broken image: truncated\n"
    # A newcomer with a name already in done/ is numbered, never overwrites.
    again = image(inbox / "cats" / "tom.png")
    assert (
        finish_done(again, options, caption="another cat", record={})
        == tmp_path / "done" / "cats" / "tom.1.png"
    )
