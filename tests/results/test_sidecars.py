"""Sidecar files and moves: modes, names, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sqlmodel import Session

from joycap_queue.errors import OptionError
from joycap_queue.intake.images import hash_file
from joycap_queue.results.sidecars import (
    OutputOptions,
    finish_done,
    finish_failed,
    finish_job_outputs,
    merge_caption,
    outputs_missing,
    sidecar_path,
    write_sidecars,
)
from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import Job


def image(path: Path, color: str = "black") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
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
        # Already there where the mode puts it: left alone, never added twice.
        ("new", "append", None),
        ("old. new", "append", None),
        ("new. old", "prepend", None),
        ("new", "overwrite", None),
        # Only the caption as a whole counts, not a word that ends or starts the text.
        ("a renewed", "append", "a renewed. new"),
        ("newer things", "prepend", "new. newer things"),
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


def test_finishing_an_image_already_moved_moves_it_no_further(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    options = OutputOptions(
        txt=True, inbox=str(inbox), done_dir=str(inbox / "done"), failed_dir=str(inbox / "failed")
    )
    moved = finish_done(image(inbox / "album" / "a.png"), options, caption="a cat", record={})
    assert moved == inbox / "done" / "album" / "a.png"
    # A second finisher of the job, or a repair of a dead worker's outputs, finds it moved.
    assert finish_done(moved, options, caption="a cat", record={}) == moved
    failed = finish_failed(image(inbox / "album" / "b.png"), options, reason="broken")
    assert finish_failed(failed, options, reason="broken") == failed == inbox / "failed" / "album" / "b.png"
    assert not (inbox / "done" / "done").exists() and not (inbox / "failed" / "failed").exists()
    assert (inbox / "done" / "album" / "a.txt").read_text() == "a cat"
    # A done tree that holds the inbox holds every image: those in the inbox still move.
    wide = OutputOptions(txt=True, inbox=str(inbox), done_dir=str(tmp_path))
    still = finish_done(image(inbox / "c.png"), wide, caption="a dog", record={})
    assert still == tmp_path / "c.png"
    assert finish_done(still, wide, caption="a dog", record={}) == still


def _done_job(url: str, picture: Path, options: OutputOptions, caption: str) -> int:
    engine = engines.get_engine(url)
    content_hash, size = hash_file(picture)
    with Session(engine) as session:
        row = {
            "path": str(picture),
            "content_hash": content_hash,
            "size_bytes": size,
            "profile": "beta-one",
            "prompt": "Write a short detailed description for this image.",
            "model": "m",
            "dedup_key": content_hash,
            "outputs": options.to_json(),
        }
        [job_id] = jobstate.insert_jobs(session, [row]).values()
        session.commit()
    assert jobstate.claim_job(engine, job_id, worker="w", max_attempts=3).job is not None
    assert jobstate.complete_job(engine, job_id, caption=caption, prompt_tokens=1, output_tokens=1)
    return job_id


def test_repairing_a_finished_jobs_outputs_twice_changes_nothing(sqlite_url: str, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    engine = engines.get_engine(sqlite_url)
    options = OutputOptions(txt=True, mode="append", inbox=str(inbox), done_dir=str(inbox / "done"))
    job_id = _done_job(sqlite_url, image(inbox / "album" / "a.png"), options, "a cat")
    moved = inbox / "done" / "album" / "a.png"
    assert outputs_missing(engine, job_id)
    assert finish_job_outputs(engine, job_id) == moved
    assert not outputs_missing(engine, job_id)
    assert finish_job_outputs(engine, job_id) == moved
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.path == str(moved)
    assert (inbox / "done" / "album" / "a.txt").read_text() == "a cat"
    assert not (inbox / "done" / "done").exists()


def test_a_move_its_finisher_died_before_recording_is_found_and_recorded(
    sqlite_url: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    engine = engines.get_engine(sqlite_url)
    options = OutputOptions(txt=True, inbox=str(inbox), done_dir=str(inbox / "done"))
    original = image(inbox / "album" / "a.png")
    job_id = _done_job(sqlite_url, original, options, "a cat")
    # The worker moved the image and died before writing its sidecar and its new path.
    moved = inbox / "done" / "album" / "a.png"
    moved.parent.mkdir(parents=True)
    original.rename(moved)
    assert outputs_missing(engine, job_id)
    assert finish_job_outputs(engine, job_id) == moved
    assert (inbox / "done" / "album" / "a.txt").read_text() == "a cat"
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.path == str(moved)
    assert not outputs_missing(engine, job_id)
    # Another file under that name is not this image: nothing is claimed for it.
    other = _done_job(sqlite_url, image(inbox / "album" / "b.png", "white"), options, "a dog")
    (inbox / "album" / "b.png").unlink()
    Image.new("RGB", (5, 5), "red").save(inbox / "done" / "album" / "b.png")
    assert not outputs_missing(engine, other)
    assert finish_job_outputs(engine, other) == inbox / "album" / "b.png"
