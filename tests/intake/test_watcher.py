"""Watch folders with real observers on real folders, a real Redis and a real worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from joycap_queue.results.sidecars import sidecar_path
from tests.support.hostile_images import write_hostile
from tests.support.services import Service, wait_until
from tests.support.watching import (
    RunningWatcher,
    all_done,
    assert_captioned_once,
    jobs,
    png_bytes,
    watchers,
)


@pytest.fixture
def start_watcher() -> Iterator[Callable[..., RunningWatcher]]:
    with watchers() as start:
        yield start


def test_only_finished_files_are_taken_and_each_once(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    service = service_for(sqlite_url)
    service.start_worker()
    running = start_watcher(service, inbox)

    source = tmp_path / "source.png"
    source.write_bytes(png_bytes(1))
    shutil.copy(source, inbox / "copied.png")

    part = inbox / "renamed.png.part"
    part.write_bytes(png_bytes(2))
    # Looked at by a whole rescan, and a temporary name: not even settling, let alone taken.
    running.wait_for_rescan()
    assert running.verdict(part) == "unseen"
    assert not [job.path for job in jobs(sqlite_url) if job.path.endswith(".part")]
    os.rename(part, inbox / "sub" / "renamed.png")

    data = png_bytes(3, (400, 300))
    chunks = [data[i : i + len(data) // 6] for i in range(0, len(data), len(data) // 6)]
    with (inbox / "slow-writer.png").open("wb") as handle:  # one open, written over 3 s
        for chunk in chunks:
            handle.write(chunk)
            handle.flush()
            time.sleep(0.5)
    data = png_bytes(4, (400, 300))
    for i in range(0, len(data), len(data) // 5):  # reopened for every chunk: a close each time
        with (inbox / "appender.png").open("ab") as handle:
            handle.write(data[i : i + len(data) // 5])
        time.sleep(0.4)

    (inbox / "notes.txt").write_text("not an image")
    (inbox / ".hidden.png").write_bytes(png_bytes(5))
    never = inbox / "never-finished.png"
    never.write_bytes(png_bytes(6)[:300])

    expected = [
        inbox / "copied.png",
        inbox / "sub" / "renamed.png",
        inbox / "slow-writer.png",
        inbox / "appender.png",
    ]
    wait_until(all_done(sqlite_url, 4), timeout=60, what="the four images")
    # Settled, decoded and refused: it waits for a change (or `incomplete_after`), unqueued.
    wait_until(lambda: running.verdict(never) not in ("unseen", "settling"), timeout=30, what="a verdict")
    assert running.verdict(never) == "incomplete"
    running.wait_for_rescan()  # the hidden file and the text file have been looked at too
    assert running.verdict(inbox / ".hidden.png") == "unseen"
    assert_captioned_once(sqlite_url, expected)


def test_files_present_before_start_and_a_restart_mid_stream(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    early = []
    for i in range(10):
        early.append(inbox / f"early-{i}.png")
        early[-1].write_bytes(png_bytes(100 + i))
    service = service_for(sqlite_url)
    service.start_worker()
    first = start_watcher(service, inbox)
    stream = []
    for i in range(10):
        stream.append(inbox / f"stream-{i}.png")
        stream[-1].write_bytes(png_bytes(200 + i))
        if i == 4:
            first.stop()  # mid-stream: files 5..9 arrive while no watcher runs
    second = start_watcher(service, inbox)
    wait_until(all_done(sqlite_url, 20), timeout=90, what="20 images")
    second.stop()
    third = start_watcher(service, inbox)  # a restart with nothing new: nothing queued
    # Every file taken means each went through intake, which found its job done; stopping waits
    # for that intake to return.
    wait_until(
        lambda: third.alive() and all(third.verdict(p) == "taken" for p in early + stream),
        timeout=30,
        what="the restarted watcher to look at every file",
    )
    third.stop()
    assert_captioned_once(sqlite_url, early + stream)


def test_burst_of_a_thousand_files(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = service_for(sqlite_url)
    service.env["JOYCAP_MAX_NEW_TOKENS"] = "1"
    service.start_worker("--concurrency", "8")
    start_watcher(service, inbox, sidecar=("none",))
    images = []
    for i in range(1000):
        images.append(inbox / f"{i // 100:02d}" / f"burst-{i:04d}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i % 256, i // 256, 3)).save(images[-1])
    wait_until(all_done(sqlite_url, 1000), timeout=300, interval=1, what="1000 images")
    assert_captioned_once(sqlite_url, images, sidecars=False)


def test_polling_mode(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = service_for(sqlite_url)
    service.start_worker()
    handle = start_watcher(service, inbox, polling=True, sidecar=("txt", "json"))
    images = []
    for i in range(3):
        images.append(inbox / f"polled-{i}.png")
        images[-1].write_bytes(png_bytes(300 + i))
    half = inbox / "half.png"
    half.write_bytes(png_bytes(399)[:200])
    wait_until(all_done(sqlite_url, 3), timeout=60, what="polled images")
    wait_until(lambda: handle.verdict(half) not in ("unseen", "settling"), timeout=30, what="a verdict")
    assert handle.verdict(half) == "incomplete"
    assert_captioned_once(sqlite_url, images)
    import json

    wait_until(sidecar_path(images[0], ".json").exists, timeout=30, what="the JSON sidecar")
    record = json.loads(sidecar_path(images[0], ".json").read_text())
    assert record["caption"] == sidecar_path(images[0], ".txt").read_bytes().decode("utf-8")
    assert record["prompt"] == "Write a short detailed description for this image."


def test_move_done_and_failed_and_same_stem(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "album").mkdir(parents=True)
    # Both images of one stem are there when their captions are written: each sidecar takes
    # its image's full name, and neither overwrites the other.
    (inbox / "album" / "a.png").write_bytes(png_bytes(400))
    Image.new("RGB", (30, 20), "teal").save(inbox / "album" / "a.jpg")
    service = service_for(sqlite_url)
    service.start_worker()
    start_watcher(service, inbox, move=True, incomplete_after=3)
    (inbox / "album" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"not really a jpeg" * 10)
    # broken.jpg never decodes: after `incomplete_after` unchanged it is queued, and fails.
    wait_until(all_done(sqlite_url, 3), timeout=60, what="three jobs")

    def moved() -> bool:  # the row's path follows its file right after the status is stored
        return all("/done/" in job.path or "/failed/" in job.path for job in jobs(sqlite_url))

    wait_until(moved, timeout=10, what="the moves to be recorded")
    done = {Path(job.path).name: job for job in jobs(sqlite_url)}
    assert done["a.png"].path == str(inbox / "done" / "album" / "a.png")
    assert done["a.jpg"].path == str(inbox / "done" / "album" / "a.jpg")
    assert (inbox / "done" / "album" / "a.png.txt").read_bytes().decode() == done["a.png"].caption
    assert (inbox / "done" / "album" / "a.jpg.txt").read_bytes().decode() == done["a.jpg"].caption
    assert done["broken.jpg"].status == "failed"
    assert done["broken.jpg"].path == str(inbox / "failed" / "album" / "broken.jpg")
    assert (inbox / "failed" / "album" / "broken.jpg.error.txt").read_text().strip() == done[
        "broken.jpg"
    ].error
    assert sorted(p.name for p in (inbox / "album").iterdir()) == []


def test_a_missing_sidecar_is_written_once_its_job_is_past_the_grace(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(png_bytes(11))
    service = service_for(sqlite_url)
    service.start_worker()
    handle = start_watcher(service, inbox, sidecar_grace=3600)
    wait_until(all_done(sqlite_url, 1), timeout=60, what="the image")
    sidecar = inbox / "a.txt"
    wait_until(sidecar.exists, timeout=10, what="the worker's sidecar")
    # As if the worker had died between storing the caption and writing the file.
    sidecar.unlink()
    handle.wait_for_rescan()  # within the grace the worker may still be writing: left alone
    assert not sidecar.exists()
    handle.watcher.sidecar_grace = 0
    wait_until(sidecar.exists, timeout=10, what="the rescan to write the sidecar")
    [job] = jobs(sqlite_url)
    assert sidecar.read_bytes().decode() == job.caption
    assert job.path == str(inbox / "a.png")


def test_second_watcher_is_refused_and_status_shows_the_first(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = service_for(sqlite_url)
    running = start_watcher(service, inbox)
    (inbox / "one.png").write_bytes(png_bytes(500))
    wait_until(lambda: len(jobs(sqlite_url)) == 1, timeout=30, what="one job")
    running.watcher.heartbeat()
    second = subprocess.run(
        [sys.executable, "-m", "joycap_queue", "watch", str(inbox)],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"another watcher is already active on {inbox}" in second.stderr
    assert "Traceback" not in second.stderr
    status = service.cli("status")
    assert f"{inbox}: seen 1, queued 1" in status.stdout, status.stdout


def test_watch_command_with_a_config_file_stops_cleanly_on_sigterm(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "watch.toml"
    config.write_text(
        'settle_seconds = 1\n[[inbox]]\npath = "inbox"\ncaption_type = "MidJourney"\nlength = "any"\n'
    )
    service = service_for(sqlite_url)
    service.start_worker()
    log = (tmp_path / "watch.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "joycap_queue", "watch", "--config", str(config)],
        env=service.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: "watching" in (tmp_path / "watch.log").read_text(), timeout=30, what="the watcher")
        (inbox / "cli.png").write_bytes(png_bytes(600))
        wait_until(all_done(sqlite_url, 1), timeout=60, what="the dropped image")
        assert_captioned_once(sqlite_url, [inbox / "cli.png"])
        assert jobs(sqlite_url)[0].prompt == "Write a MidJourney prompt for this image."
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    assert "watcher stopped" in (tmp_path / "watch.log").read_text()
    assert "watchers:" not in service.cli("status").stdout  # the lock row went with it


def test_hostile_files_fail_with_their_reasons_and_the_watcher_goes_on(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    limit = 20_000_000
    service = service_for(sqlite_url)
    service.env["JOYCAP_MAX_IMAGE_PIXELS"] = str(limit)
    service.start_worker()
    # A header claiming billions of pixels used to count as half-written, then, queued as broken
    # after `incomplete_after`, to end the watcher with DecompressionBombError.
    handle = start_watcher(service, inbox, incomplete_after=3, max_image_pixels=limit)
    must_fail, captioned = write_hostile(inbox)
    good = inbox / "good.png"
    good.write_bytes(png_bytes(700))
    total = len(must_fail) + len(captioned) + 1
    wait_until(lambda: handle.alive() and all_done(sqlite_url, total)(), timeout=120, what="every file")
    by_name = {Path(job.path).name: job for job in jobs(sqlite_url)}
    for name, reason in must_fail.items():
        job = by_name[name]
        assert job.status == "failed" and job.error is not None and reason in job.error, (name, job.error)
        assert "\n" not in job.error
    for path in [good, *captioned]:
        assert by_name[path.name].status == "done", (path.name, by_name[path.name].error)
    (inbox / "after.png").write_bytes(png_bytes(701))  # and it still takes new files
    wait_until(lambda: handle.alive() and all_done(sqlite_url, total + 1)(), timeout=60, what="a new file")


def test_a_copy_of_a_known_image_gets_its_caption_once_across_restarts(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    original = inbox / "original.png"
    original.write_bytes(png_bytes(800))
    service = service_for(sqlite_url)
    service.start_worker()
    first = start_watcher(service, inbox, sidecar_mode="append")
    wait_until(all_done(sqlite_url, 1), timeout=60, what="the original")
    wait_until((inbox / "original.txt").exists, timeout=30, what="the original's sidecar")
    # A copy under another name, with tags of its own: it gets the known caption appended.
    copy_txt = inbox / "copy.txt"
    copy_txt.write_text("hand tags")
    shutil.copy(original, inbox / "copy.png")
    wait_until(lambda: copy_txt.read_text() != "hand tags", timeout=30, what="the copy's caption")
    [job] = jobs(sqlite_url)
    expected = f"hand tags. {job.caption}"
    assert copy_txt.read_bytes().decode() == expected
    first.stop()

    second = start_watcher(service, inbox, sidecar_mode="append")
    wait_until(
        lambda: second.alive() and second.verdict(inbox / "copy.png") == "taken",
        timeout=30,
        what="the restarted watcher to take the copy again",
    )
    second.wait_for_rescan()  # the intake that found the copy, and its sidecars, have returned
    assert copy_txt.read_bytes().decode() == expected
    assert (inbox / "original.txt").read_bytes().decode() == job.caption
    assert len(jobs(sqlite_url)) == 1
