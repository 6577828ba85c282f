"""`export` and `results --search` on real databases, through the command line.

Jobs are queued through `intake.enqueue_images` into a real Redis and database, then finished with
the same `claim_job` / `complete_job` calls a worker makes, with captions chosen here: what is
tested is what comes out, so the captions must be known.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sqlalchemy import text
from sqlmodel import Session

from joycap_queue.captions.request import RequestOptions, build_request
from joycap_queue.intake.enqueue import enqueue_images
from joycap_queue.results.export import RECORD_FIELDS
from joycap_queue.results.sidecars import sidecar_path
from joycap_queue.store import engines, jobstate, queries
from joycap_queue.store.models import JobPublic
from tests.support.services import Service


def make_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", (24 + seed, 16), (seed * 30 % 256, 60, 90))
    picture.save(path)
    return path


def captioned(
    service: Service, images: list[Path], captions: list[str], **options: Any
) -> tuple[int | None, list[int]]:
    """Queue the images with these caption options, then store the captions as a worker would."""
    settings = service.settings()
    params = {"caption_type": "Descriptive", "length": "short", **options}
    summary = enqueue_images(
        images, build_request(settings, RequestOptions.from_params(params)), settings, recursive=False
    )
    engine = engines.get_engine(settings.effective_database_url)
    by_path = {}
    with Session(engine) as session:
        for job in queries.list_jobs(session, submission_id=summary.submission_id):
            by_path[job.path] = job.id
    ids = []
    for image, caption in zip(images, captions, strict=True):
        job_id = by_path[str(image.resolve())]
        assert jobstate.claim_job(engine, job_id, worker="test", max_attempts=3).job is not None
        assert jobstate.complete_job(engine, job_id, caption=caption, prompt_tokens=10, output_tokens=5)
        ids.append(job_id)
    return summary.submission_id, ids


def test_sidecar_export_in_each_mode(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    folder = tmp_path / "lora"
    images = [
        make_image(folder / "a.jpg", 1),
        make_image(folder / "b.png", 2),
        make_image(folder / "c.jpg", 3),
        make_image(folder / "c.png", 4),
    ]
    (folder / "b.txt").write_text("old caption")
    captioned(service, images, ["cap a", "cap b", "cap c jpg", "cap c png"])
    txt = {name: folder / name for name in ("a.txt", "b.txt", "c.jpg.txt", "c.png.txt")}

    def export(*args: str) -> str:
        return service.cli("export", "--format", "txt", "--path", f"{folder}/*", *args).stderr

    assert "wrote 3, kept 1 existing" in export()
    assert {name: path.read_text() for name, path in txt.items()} == {
        "a.txt": "cap a",
        "b.txt": "old caption",
        "c.jpg.txt": "cap c jpg",
        "c.png.txt": "cap c png",
    }
    # The export names sidecars as the watcher does: a.txt, or a.jpg.txt when a stem is shared.
    assert sorted(str(sidecar_path(image, ".txt")) for image in images) == sorted(
        str(p) for p in txt.values()
    )

    assert "wrote 4" in export("--sidecar-mode", "overwrite", "--prepend", "ohwx, ")
    assert txt["b.txt"].read_text() == "ohwx, cap b"
    export("--sidecar-mode", "append", "--append", " END")
    assert txt["b.txt"].read_text() == "ohwx, cap b. cap b END"
    export("--sidecar-mode", "prepend", "--path", str(folder / "a.jpg"))
    assert txt["a.txt"].read_text() == "cap a. ohwx, cap a. cap a END"
    assert txt["c.jpg.txt"].read_text() == "ohwx, cap c jpg. cap c jpg END"


ALL_CAPTIONS = sorted(["a cat, sitting", "a cat\nwith a newline", 'a "quoted" cat', "a dog", "another dog"])


def test_file_formats_and_filters(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    cats = [make_image(tmp_path / "cats" / f"cat{i}.png", i) for i in range(3)]
    dogs = [make_image(tmp_path / "dogs" / f"dog{i}.png", 10 + i) for i in range(2)]
    cat_submission, _ = captioned(
        service, cats, ["a cat, sitting", "a cat\nwith a newline", 'a "quoted" cat']
    )
    captioned(service, dogs, ["a dog", "another dog"], caption_type="Straightforward", extra=("lighting",))
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    settings = service.settings()
    request = build_request(settings, RequestOptions(caption_type="Descriptive", length="short"))
    enqueue_images([tmp_path / "dogs" / "broken.png"], request, settings)

    out = tmp_path / "out"
    service.call("export", "-o", str(out / "all.csv"))
    frame = pd.read_csv(out / "all.csv", keep_default_na=False)
    assert list(frame.columns) == ["im_name", "joy-caption"]
    assert dict(zip(frame["im_name"], frame["joy-caption"], strict=True)) == {
        "cat0.png": "a cat, sitting",
        "cat1.png": "a cat\nwith a newline",
        "cat2.png": 'a "quoted" cat',
        "dog0.png": "a dog",
        "dog1.png": "another dog",
    }

    def names(*args: str) -> list[str]:
        result = service.call("export", "--name-column", "file", "--caption-column", "text", *args)
        return sorted(pd.read_csv(io.StringIO(result.stdout), keep_default_na=False)["file"])

    assert names("--caption-type", "straightforward") == ["dog0.png", "dog1.png"]
    assert names("--path", "*/cats/*") == ["cat0.png", "cat1.png", "cat2.png"]
    assert names("--submission", str(cat_submission)) == ["cat0.png", "cat1.png", "cat2.png"]
    assert names("--model", settings.model) == ["cat0.png", "cat1.png", "cat2.png", "dog0.png", "dog1.png"]
    assert names("--model", "someone/other-model") == []
    assert names("--search", "dog") == ["dog0.png", "dog1.png"]
    assert names("--state", "failed") == ["broken.png"]

    with_columns = service.call(
        "export", "--path", "*/dogs/*", "--columns", "prompt,status", "--columns", "extra_options"
    )
    frame = pd.read_csv(io.StringIO(with_columns.stdout), keep_default_na=False)
    assert list(frame.columns) == ["im_name", "joy-caption", "prompt", "status", "extra_options"]
    assert set(frame["status"]) == {"done"} and set(frame["extra_options"]) == {"[2]"}

    service.call("export", "-o", str(out / "all.jsonl"), "--state", "done", "--state", "failed")
    records = [json.loads(line) for line in (out / "all.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert set(records[0]) == {"im_name", *RECORD_FIELDS}
    assert set(JobPublic.model_fields) <= set(records[0])
    failed = [r for r in records if r["status"] == "failed"]
    assert [r["error"] for r in failed] == ["not an image Pillow can read"]

    service.call("export", "-o", str(out / "all.parquet"))
    table = pq.read_table(out / "all.parquet")
    assert table.num_rows == 5
    assert str(table.schema.field("finished_at").type) == "timestamp[us, tz=UTC]"
    extra_type = table.schema.field("extra_options").type
    assert pa.types.is_list(extra_type) and extra_type.value_type == pa.int64()
    assert sorted(table.column("caption").to_pylist()) == ALL_CAPTIONS
    assert table.column("im_name").to_pylist()[0] == "cat0.png"

    service.call("export", "--format", "hf-dataset", "-o", str(out / "hf"))
    dataset = datasets.load_from_disk(str(out / "hf"))
    assert dataset.column_names == [
        "image",
        "im_name",
        "joy-caption",
        "prompt",
        "model",
        "quantize",
        "adapter",
    ]
    assert sorted(dataset["joy-caption"]) == ALL_CAPTIONS
    assert dataset[0]["image"].size == Image.open(cats[0]).size

    bad = service.cli("export", "--columns", "nonsense", check=False)
    assert bad.returncode == 2 and "unknown column 'nonsense'" in bad.stderr and "Traceback" not in bad.stderr
    taken = service.cli("export", "--format", "hf-dataset", "-o", str(out / "hf"), check=False)
    assert taken.returncode != 0 and "is not an empty folder" in taken.stderr


SEARCH_CAPTIONS = [
    "A red car parked on a quiet street.",
    "A red carpet event with photographers.",
    "A blue car and a RED bicycle.",
    "redcar is one word here",
]


def test_results_search_uses_the_full_text_index(
    database_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(database_url)
    images = [make_image(tmp_path / f"s{i}.png", 40 + i) for i in range(len(SEARCH_CAPTIONS))]
    _, ids = captioned(service, images, SEARCH_CAPTIONS)

    def found(query: str) -> list[str]:
        result = service.call("results", "--search", query, "--jsonl")
        return [json.loads(line)["caption"] for line in result.stdout.splitlines()]

    # A phrase, case-insensitive, the last word also as the start of a longer one.
    assert found("red car") == SEARCH_CAPTIONS[:2]
    assert found("RED CAR,") == SEARCH_CAPTIONS[:2]
    assert found("car") == SEARCH_CAPTIONS[:3]
    assert found("red bicycle") == [SEARCH_CAPTIONS[2]]
    assert found("quiet street") == [SEARCH_CAPTIONS[0]]
    assert found("street quiet") == []
    empty = service.cli("results", "--search", "!!", check=False)
    assert empty.returncode == 2 and "give at least one word" in empty.stderr

    # The index follows the rows: a caption taken away (a --force resubmit) is no longer found.
    engine = engines.get_engine(database_url)
    with Session(engine) as session:
        jobstate.reset_jobs(session, [ids[0]], submission_id=None)
        session.commit()
    assert found("red car") == [SEARCH_CAPTIONS[1]]

    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = conn.execute(
                text("EXPLAIN QUERY PLAN SELECT rowid FROM job_fts WHERE job_fts MATCH '\"red car\"*'")
            ).all()
            assert any("VIRTUAL TABLE INDEX" in str(step) for step in plan), plan
        else:
            conn.execute(text("SET enable_seqscan = off"))
            plan = conn.execute(
                text(
                    "EXPLAIN SELECT id FROM job WHERE to_tsvector('simple'::regconfig, coalesce(job.caption, ''::text))"
                    " @@ to_tsquery('simple', 'red <-> car:*')"
                )
            ).all()
            assert any("ix_job_caption_fts" in str(step) for step in plan), plan


FILL_COLUMNS = (
    "path, content_hash, size_bytes, profile, extra_options, prompt, model, gen_params, prepend, append, "
    "outputs, status, attempts, caption, queued_at, dedup_key"
)
CAPTION_WORDS = "a red car parked near the old stone bridge under soft evening light with long shadows "
# Generated inside the database: 100,000 inserts from Python take 20 s on PostgreSQL, this 5.
FILL_SQL = {
    "postgresql": f"""INSERT INTO job ({FILL_COLUMNS})
        SELECT '/data/set/img' || lpad(i::text, 6, '0') || '.jpg', lpad(to_hex(i), 64, '0'), 0, 'beta-one', '[]',
          'Write a long detailed description for this image.', 'm', '{{}}', '', '', '{{}}', 'done', 1,
          repeat('{CAPTION_WORDS}', 6) || i, now(), 'k' || lpad(to_hex(i), 63, '0')
        FROM generate_series(:start, :stop - 1) AS i""",
    "sqlite": f"""WITH RECURSIVE n(i) AS (SELECT :start UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :stop)
        INSERT INTO job ({FILL_COLUMNS})
        SELECT '/data/set/img' || printf('%06d', i) || '.jpg', printf('%064x', i), 0, 'beta-one', '[]',
          'Write a long detailed description for this image.', 'm', '{{}}', '', '', '{{}}', 'done', 1,
          replace(printf('%.6c', 'x'), 'x', '{CAPTION_WORDS}') || i, CURRENT_TIMESTAMP, printf('k%063x', i)
        FROM n""",
}


def fill_jobs(database_url: str, start: int, stop: int) -> None:
    """Synthetic done jobs with 500-character captions (the full-text index takes them in too)."""
    engine = engines.get_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text(FILL_SQL[engine.dialect.name]), {"start": start, "stop": stop})


def peak_rss_mb(args: list[str], env: dict[str, str]) -> float:
    """Peak resident memory of one `joycap-queue` run, measured from a fresh parent process."""
    code = (
        "import resource, subprocess, sys;"
        "r = subprocess.run(sys.argv[1:]);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "joycap_queue", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def test_export_of_100k_rows_streams_in_bounded_memory(
    database_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    """Peak memory with 100,000 rows stays within 40 MB of the peak with 10,000 rows.

    Holding the rows instead (as `results` does) takes about 700 MB for these 100,000 rows, so
    anything that stops streaming fails here; measured on this project's machine, each export
    peaks at about 85 MB (CSV, JSONL) and 200 MB (Parquet, pyarrow loaded) at either size.
    """
    service = service_for(database_url)
    # What differs on PostgreSQL is the cursor (server-side, or every row at once): one format shows it.
    formats = ("csv", "jsonl", "parquet") if database_url.startswith("sqlite") else ("csv",)
    fill_jobs(database_url, 0, 10_000)
    small = {
        fmt: peak_rss_mb(["export", "-o", str(tmp_path / f"small.{fmt}")], service.env) for fmt in formats
    }
    fill_jobs(database_url, 10_000, 100_000)
    for fmt in formats:
        output = tmp_path / f"big.{fmt}"
        big = peak_rss_mb(["export", "-o", str(output)], service.env)
        assert big - small[fmt] < 40, (fmt, small[fmt], big)
    if "jsonl" in formats:
        assert sum(1 for _ in (tmp_path / "big.jsonl").open()) == 100_000
        assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_rows == 100_000
    frame = pd.read_csv(tmp_path / "big.csv")
    assert len(frame) == 100_000 and frame["im_name"].is_unique
