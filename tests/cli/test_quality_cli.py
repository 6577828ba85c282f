"""The quality guard's user side: `--quality` on results, export and retry, `export --raw`, the
status line, and `--skip-flagged-sidecars`, on real databases through the command line.

Job rows are inserted as a worker would have left them, with known quality values, so what is
tested is which rows each command picks, not what the guard decides (tests/captions/test_quality.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlmodel import Session, select

from joycap_queue.cli.inspect import quality_line
from joycap_queue.results.sidecars import OutputOptions, finish_job_outputs, outputs_missing, sidecar_record
from joycap_queue.store import engines
from joycap_queue.store.models import Job, Submission, utcnow
from tests.support.services import Service, message_count

# name → (submission, status, quality, caption, raw caption); "a2" is a second prompt of a.jpg.
ROWS: dict[str, tuple[int, str, str | None, str | None, str | None]] = {
    "a": (1, "done", "ok", "cap a", None),
    "b": (1, "done", "truncated", "cap b", "This image shows cap b"),
    "c": (1, "done", "repetitive,truncated", "cap c", None),
    "d": (1, "done", None, "cap d", None),
    "e": (1, "failed", None, None, None),
    "a2": (1, "done", "ok", "cap a second", None),
    "f": (2, "done", "junk", "cap f", None),
}


def job_row(path: Path, *, model: str, key: str, **fields: Any) -> Job:
    done = fields.get("status") == "done"
    return Job(
        path=str(path),
        content_hash=key.ljust(64, "0")[:64],
        profile="beta-one",
        caption_type="Descriptive",
        caption_length="short",
        prompt=f"Write a short description of this image. ({key})",
        model=model,
        dedup_key=f"dedup-{key}",
        attempts=1,
        caption_attempts=1 if done else 0,
        quality_flags=json.dumps([fields["quality"].split(",")]) if fields.get("quality") else "[]",
        started_at=utcnow(),
        finished_at=utcnow(),
        error="broken image" if fields.get("status") == "failed" else None,
        **fields,
    )


def insert_rows(service: Service, folder: Path) -> dict[str, int]:
    """The ROWS as job rows of two submissions; name → job id."""
    settings = service.settings()
    engine = engines.get_engine(settings.effective_database_url)
    ids = {}
    with Session(engine) as session:
        for _ in range(2):
            session.add(Submission(source="[]", options="{}", model=settings.model))
        session.commit()
        for name, (submission, status, quality, caption, raw) in ROWS.items():
            image = folder / f"{name.rstrip('2')}.jpg"
            job = job_row(
                image,
                model=settings.model,
                key=name,
                submission_id=submission,
                status=status,
                quality=quality,
                caption=caption,
                raw_caption=raw,
            )
            session.add(job)
            session.commit()
            assert job.id is not None
            ids[name] = job.id
    return ids


def listed(service: Service, *args: str) -> list[int]:
    return [record["id"] for record in json.loads(service.call("results", "--json", *args).stdout)]


def test_quality_filters_on_results_and_export(
    database_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(database_url)
    ids = insert_rows(service, tmp_path / "images")
    by_id = {job_id: name for name, job_id in ids.items()}

    def names(found: list[int]) -> list[str]:
        return [by_id[job_id] for job_id in found]

    # ok: passed, or stored before the guard (d); never the failed job without a caption (e).
    assert names(listed(service, "--quality", "ok")) == ["a", "d", "a2"]
    assert names(listed(service, "--quality", "flagged")) == ["b", "c", "f"]
    assert names(listed(service, "--quality", "truncated")) == ["b", "c"]
    assert names(listed(service, "--quality", "repetitive")) == ["c"]
    assert names(listed(service, "--quality", "junk", "--submission", "1")) == []
    assert names(listed(service, "--quality", "flagged", "--submission", "2")) == ["f"]

    bad = service.cli("results", "--quality", "bogus", check=False)
    assert bad.returncode == 2
    assert "'bogus' is not one of 'ok', 'flagged', 'junk', 'empty', 'repetitive'" in bad.stderr, bad.stderr

    out = tmp_path / "flagged.jsonl"
    exported = service.call("export", "--quality", "flagged", "-o", str(out))
    assert "exported 3 rows" in exported.stderr, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["im_name"], line["quality"]) for line in lines] == [
        ("b.jpg", "truncated"),
        ("c.jpg", "repetitive,truncated"),
        ("f.jpg", "junk"),
    ]
    # By path, so a.jpg's two prompts come together (ids a, d, a2 would put d between them).
    ok = tmp_path / "ok.jsonl"
    service.call("export", "--quality", "ok", "-o", str(ok))
    assert [json.loads(line)["id"] for line in ok.read_text().splitlines()] == [ids["a"], ids["a2"], ids["d"]]


def csv_captions(text: str) -> dict[str, str]:
    return {row["im_name"]: row["joy-caption"] for row in csv.DictReader(io.StringIO(text))}


def test_export_raw_gives_the_caption_before_clean_up(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    insert_rows(service, tmp_path / "images")
    cleaned = csv_captions(service.call("export", "--quality", "truncated").stdout)
    assert cleaned == {"b.jpg": "cap b", "c.jpg": "cap c"}
    raw = csv_captions(service.call("export", "--quality", "truncated", "--raw").stdout)
    # b kept its raw text; c had no rule set (no raw caption), so its caption is what there is.
    assert raw == {"b.jpg": "This image shows cap b", "c.jpg": "cap c"}
    out = tmp_path / "raw.jsonl"
    service.call("export", "--raw", "--quality", "truncated", "-o", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["caption"] for line in lines] == ["This image shows cap b", "cap c"]
    parquet = tmp_path / "raw.parquet"
    service.call("export", "--raw", "--quality", "truncated", "-o", str(parquet))
    import pyarrow.parquet as pq

    table = pq.read_table(parquet).to_pylist()
    assert [(row["caption"], row["caption_attempts"]) for row in table] == [
        ("This image shows cap b", 1),
        ("cap c", 1),
    ]


def test_status_counts_captions_by_flag(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    insert_rows(service, tmp_path / "images")
    everything = service.call("status").stdout
    assert (
        "quality: 3 ok (1 from before the quality guard), 3 flagged (truncated 2, junk 1, repetitive 1)"
        in everything.splitlines()
    ), everything
    first = service.call("status", "--submission", "1").stdout
    assert (
        "quality: 3 ok (1 from before the quality guard), 2 flagged (truncated 2, repetitive 1)"
        in first.splitlines()
    ), first


def test_quality_line_counts_a_caption_under_each_of_its_flags() -> None:
    assert quality_line({"ok": 120, "truncated": 2, "repetitive,truncated": 1, "repetitive": 0}) == (
        "quality: 120 ok, 3 flagged (truncated 3, repetitive 1)"
    )
    assert quality_line({"ok": 5}) == "quality: 5 ok, 0 flagged"
    assert quality_line({None: 4}) == "quality: 4 ok (4 from before the quality guard), 0 flagged"


def rows_by_name(service: Service, ids: dict[str, int]) -> dict[str, Job]:
    with Session(engines.get_engine(service.settings().effective_database_url)) as session:
        jobs = {job.id: job for job in session.exec(select(Job))}
        for job in jobs.values():
            session.expunge(job)
    return {name: jobs[job_id] for name, job_id in ids.items()}


def test_retry_quality_captions_flagged_done_jobs_again(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    ids = insert_rows(service, tmp_path / "images")
    before = rows_by_name(service, ids)

    mixed = service.cli("retry", "--quality", "flagged", "--state", "failed", check=False)
    assert mixed.returncode == 2 and "leave out --state" in mixed.stderr, mixed.stderr
    assert service.cli("retry", "--quality", "ok", check=False).returncode == 2  # not a choice

    retried = service.call("retry", "--quality", "flagged", "--submission", "1")
    assert "queued 2 jobs again" in retried.stdout, retried.stdout
    assert message_count(service.settings()) == 2
    after = rows_by_name(service, ids)
    for name in ("b", "c"):
        job = after[name]
        assert (job.status, job.attempts, job.caption, job.raw_caption, job.error) == (
            "queued",
            0,
            None,
            None,
            None,
        )
        assert (job.quality, job.caption_attempts, job.quality_flags) == (None, 0, "[]")
        assert job.dedup_key == before[name].dedup_key  # no option changed: the same request
    for name in ("a", "d", "e", "a2", "f"):
        assert (after[name].status, after[name].quality, after[name].caption) == (
            before[name].status,
            before[name].quality,
            before[name].caption,
        )

    # With a changed option, each flagged job gets the new request in its own row.
    changed = service.call("retry", "--quality", "junk", "--temperature", "0.3")
    assert "queued 1 jobs again with the new options" in changed.stdout, changed.stdout
    assert message_count(service.settings()) == 3
    f = rows_by_name(service, ids)["f"]
    assert (f.status, f.quality, f.caption) == ("queued", None, None)
    assert json.loads(f.gen_params)["temperature"] == 0.3 and f.dedup_key != before["f"].dedup_key


def done_image_job(
    service: Service, image: Path, *, quality: str | None, outputs: OutputOptions, key: str
) -> int:
    Image.new("RGB", (20, 16), (10, 200, 30)).save(image)
    engine = engines.get_engine(service.settings().effective_database_url)
    with Session(engine) as session:
        job = job_row(
            image,
            model=service.settings().model,
            key=key,
            status="done",
            quality=quality,
            caption=f"caption of {key}",
            outputs=outputs.to_json(),
        )
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


@pytest.mark.parametrize("skip_flagged", [False, True])
def test_flagged_captions_get_no_sidecar_when_asked(
    skip_flagged: bool,
    sqlite_url: str,
    service_for: Callable[[str], Service],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = service_for(sqlite_url)
    engine = engines.get_engine(sqlite_url)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    plain = OutputOptions(txt=True, json=True, skip_flagged=skip_flagged)
    flagged = done_image_job(service, inbox / "flagged.png", quality="truncated", outputs=plain, key="x")
    passed = done_image_job(service, inbox / "passed.png", quality="ok", outputs=plain, key="y")
    old = done_image_job(service, inbox / "old.png", quality=None, outputs=plain, key="z")
    with caplog.at_level(logging.INFO, logger="joycap_queue.results.sidecars"):
        for job_id in (flagged, passed, old):
            finish_job_outputs(engine, job_id)
    assert (inbox / "flagged.txt").exists() is not skip_flagged
    assert (inbox / "flagged.json").exists() is not skip_flagged
    assert ("its caption is flagged truncated" in caplog.text) is skip_flagged
    assert (inbox / "passed.txt").read_text() == "caption of y"
    assert (inbox / "old.txt").read_text() == "caption of z"  # before the guard: never flagged
    # A skipped sidecar is not a missing one: the repairs of dead workers' outputs leave it be.
    assert not outputs_missing(engine, flagged)
    record = json.loads((inbox / "passed.json").read_text())
    assert (record["quality"], record["caption_attempts"]) == ("ok", 1)

    # Moving to done/ still happens, sidecar or not.
    moving = OutputOptions(
        txt=True, inbox=str(inbox), done_dir=str(inbox / "done"), skip_flagged=skip_flagged
    )
    moved_id = done_image_job(service, inbox / "moved.png", quality="junk", outputs=moving, key="w")
    moved = finish_job_outputs(engine, moved_id)
    assert moved == inbox / "done" / "moved.png" and moved.exists()
    assert (inbox / "done" / "moved.txt").exists() is not skip_flagged


def test_skip_flagged_sidecars_is_offered_where_outputs_are() -> None:
    from click.testing import CliRunner

    from joycap_queue.cli.submit import submit
    from joycap_queue.cli.watch import watch

    for command in (submit, watch):
        shown = CliRunner().invoke(command, ["--help"])
        assert "--skip-flagged-sidecars" in shown.output, shown.output
    assert OutputOptions.from_json(OutputOptions(txt=True, skip_flagged=True).to_json()).skip_flagged


def test_sidecar_record_carries_the_quality(tmp_path: Path) -> None:
    from joycap_queue.store.models import JobPublic

    job = job_row(tmp_path / "a.png", model="m", key="r", status="done", quality="empty", caption="")
    job.id = 7
    record = sidecar_record(JobPublic.model_validate(job))
    assert (record["quality"], record["caption_attempts"]) == ("empty", 1)
