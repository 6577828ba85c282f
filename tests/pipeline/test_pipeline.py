"""End to end: `submit` → Redis → a real worker process with the tiny model → the database."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from joycap_queue.captions import prompts
from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, wait_until


def test_submit_folder_end_to_end(
    database_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    images = image_factory(tmp_path / "in", 20)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    service = service_for(database_url)
    worker = service.start_worker()

    args = ["submit", str(tmp_path / "in"), "-t", "Straightforward", "-l", "40", "--extra", "2", "lighting"]
    result = service.cli(*args, "--extra", "0", "--name", "Alice", "--prepend", "pre: ")
    assert "queued 20" in result.stdout and "skipped 1" in result.stdout, result.stdout
    wait_until(all_finished(database_url, 20), timeout=180, what="20 jobs to finish")

    expected_prompt = (
        prompts.vocabulary()["beta-one"]["caption_types"]["Straightforward"][1].format(word_count="40")
        + " Include information about lighting."
        + " If there is a person/character in the image you must refer to them as Alice."
    )
    jobs = jobs_in(database_url)
    assert sorted(job.path for job in jobs) == sorted(str(p.resolve()) for p in images)
    for job in jobs:
        assert job.status == "done", (job.path, job.error, worker.log()[-3000:])
        assert job.prompt == expected_prompt
        assert job.caption is not None and job.caption.startswith("pre: ")
        assert job.attempts == 1
        assert job.output_tokens is not None and 0 < job.output_tokens <= 12
        assert job.prompt_tokens is not None and job.prompt_tokens > 729
        assert job.worker is not None and job.worker.startswith("w1@")
        assert job.started_at is not None and job.finished_at is not None
        assert json.loads(job.extra_options) == [2, 0]
        assert job.width and job.height

    # The same images with the same request: nothing new.
    again = service.cli(*args, "--extra", "0", "--name", "Alice", "--prepend", "pre: ")
    assert "queued 0" in again.stdout and "already done 20" in again.stdout, again.stdout
    assert len(jobs_in(database_url)) == 20

    # --force queues them again, into the same rows, which are captioned a second time.
    before = {job.id: job.finished_at for job in jobs}
    forced = service.cli(*args, "--extra", "0", "--name", "Alice", "--prepend", "pre: ", "--force")
    assert "queued 20" in forced.stdout, forced.stdout

    def recaptioned() -> bool:
        current = jobs_in(database_url)
        return all(j.status == "done" and j.finished_at != before[j.id] for j in current)

    wait_until(recaptioned, timeout=180, what="forced jobs to be captioned again")
    assert len(jobs_in(database_url)) == 20

    status = service.cli("status")
    assert "done 20" in status.stdout
    assert "rate: 0.0" not in status.stdout
    assert "random text" in status.stderr


def test_other_request_is_a_new_job_and_bad_files_fail_as_data(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    tmp_path: Path,
    image_factory: Callable[..., list[Path]],
) -> None:
    image_factory(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"this is not a jpeg")
    service = service_for(sqlite_url)
    service.start_worker()
    first = service.cli("submit", str(tmp_path / "in"), "--greedy")
    assert "queued 2" in first.stdout and "rejected 1" in first.stdout, first.stdout
    assert "broken.jpg: not an image" in first.stderr
    second = service.cli("submit", str(tmp_path / "in"), "--greedy", "-t", "MidJourney")
    assert "queued 2" in second.stdout, second.stdout
    # broken.jpg is a failed row per request: failures are data, listed with their reason.
    wait_until(all_finished(sqlite_url, 6), timeout=120, what="jobs to finish")

    jobs = jobs_in(sqlite_url)
    failed = [job for job in jobs if job.status == "failed"]
    assert [Path(job.path).name for job in failed] == ["broken.jpg", "broken.jpg"]
    assert {job.error for job in failed} == {"not an image Pillow can read"}
    done = [job for job in jobs if job.status == "done"]
    assert len(done) == 4
    # Greedy decoding is deterministic: one image, one prompt → one caption, whichever job ran it.
    by_hash: dict[tuple[str, str], set[str | None]] = {}
    for job in done:
        by_hash.setdefault((job.content_hash, job.prompt), set()).add(job.caption)
    assert all(len(captions) == 1 for captions in by_hash.values())

    listed = service.cli("results", "--state", "failed", "--jsonl")
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["error"] for r in records] == ["not an image Pillow can read"] * 2
