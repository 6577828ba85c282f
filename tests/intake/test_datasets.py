"""Hugging Face datasets in, datasets with captions out: real datasets built offline, a real Redis,
a real worker with the tiny model, SQLite and PostgreSQL."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import pandas as pd
import pytest
from PIL import Image

from tests.support.datasets import build_dataset, dataset_service, image_bytes
from tests.support.hostile_images import jpeg_claiming, png_claiming
from tests.support.jobs import all_finished, jobs_in, rows_in
from tests.support.services import Service, wait_until

# Rows 1 and 4 hold the same image with the same name: one job captions both rows. The ids are
# not in sorted order, so an export that sorted by name instead of keeping the row order shows.
ROWS = [
    ("zeta.png", 0, "Alice"),
    ("alpha.png", 1, "Bob"),
    ("mid.png", 2, None),
    ("beta.png", 3, "Alice"),
    ("alpha-copy.png", 1, "Bob"),
    ("omega.png", 5, ""),
]


def test_dataset_in_captioned_dataset_out(
    database_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    source = tmp_path / "ds"
    build_dataset(ROWS).save_to_disk(str(source))
    service = dataset_service(service_for, database_url, tmp_path)
    service.start_worker()

    first = service.call(
        "submit-dataset", str(source), "--name-column", "character", "--greedy", "-l", "short"
    )
    assert "queued 5" in first.stdout and "(6 rows)" in first.stdout, first.stdout
    wait_until(all_finished(database_url, 5), timeout=180, what="5 jobs to finish")

    jobs = jobs_in(database_url)
    assert all(job.status == "done" and job.caption for job in jobs), [(j.path, j.error) for j in jobs]
    store = Path(service.env["JOYCAP_DATA_DIR"]) / "images"
    assert all(Path(job.path).is_relative_to(store) and Path(job.path).is_file() for job in jobs)
    # The name column fills the name option per row; rows without a name use the plain request.
    by_row = {row.row_index: row for row in rows_in(database_url)}
    prompts = {job.id: job.prompt for job in jobs}
    assert "refer to them as Alice" in prompts[by_row[0].job_id]
    assert "refer to them as Bob" in prompts[by_row[1].job_id]
    assert "refer to them" not in prompts[by_row[2].job_id]
    assert by_row[1].job_id == by_row[4].job_id
    assert [by_row[i].row_key for i in range(6)] == [name for name, _, _ in ROWS]

    out = tmp_path / "captioned"
    service.call("export", "--format", "hf-dataset", "--source", str(source), "-o", str(out))
    captioned = datasets.load_from_disk(str(out))
    assert captioned.column_names == ["image", "im_name", "character", "joy-caption"]
    assert captioned["im_name"] == [name for name, _, _ in ROWS]
    assert captioned["character"] == [character for _, _, character in ROWS]
    captions = {job.id: job.caption for job in jobs}
    assert captioned["joy-caption"] == [captions[by_row[i].job_id] for i in range(6)]
    assert captioned[2]["image"].size == Image.open(io.BytesIO(image_bytes(2))).size

    csv_path = tmp_path / "captions.csv"
    service.call("export", "--source", str(source), "-o", str(csv_path), "--columns", "prompt,model")
    exported = pd.read_csv(csv_path, keep_default_na=False)
    assert list(exported.columns) == ["im_name", "joy-caption", "prompt", "model"]
    joined = (
        build_dataset(ROWS).remove_columns(["image"]).to_pandas().merge(exported, on="im_name", how="left")
    )
    assert len(joined) == len(ROWS)
    assert (joined["joy-caption"].str.len() > 0).all(), joined
    assert list(exported["im_name"]) == [name for name, _, _ in ROWS]

    # Submitting again queues nothing; two new rows are all that a grown dataset queues.
    again = service.call(
        "submit-dataset", str(source), "--name-column", "character", "--greedy", "-l", "short"
    )
    assert "queued 0" in again.stdout and "already captioned 6" in again.stdout, again.stdout
    grown = ROWS + [("new-1.png", 7, "Alice"), ("new-2.png", 8, None)]
    shutil.rmtree(source)
    build_dataset(grown).save_to_disk(str(source))
    more = service.call(
        "submit-dataset", str(source), "--name-column", "character", "--greedy", "-l", "short"
    )
    assert "queued 2" in more.stdout and "already captioned 6" in more.stdout, more.stdout
    wait_until(all_finished(database_url, 7), timeout=120, what="the new rows to be captioned")
    out2 = tmp_path / "captioned-2"
    service.call("export", "--format", "hf-dataset", "--source", str(source), "-o", str(out2))
    regrown = datasets.load_from_disk(str(out2))
    assert regrown["im_name"] == [name for name, _, _ in grown]
    assert all(regrown["joy-caption"])


def test_parquet_and_image_folder_sources(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    """No worker: what is queued, and in which order export lists it."""
    service = dataset_service(service_for, sqlite_url, tmp_path)
    parquet = tmp_path / "train.parquet"
    build_dataset(ROWS).to_parquet(str(parquet))
    result = service.call("submit-dataset", str(parquet), "-t", "Straightforward")
    assert "queued 5" in result.stdout and "(6 rows)" in result.stdout, result.stdout
    listed = service.call("export", "--source", str(parquet), "--state", "queued", "--format", "csv")
    exported = pd.read_csv(io.StringIO(listed.stdout), keep_default_na=False)
    assert list(exported["im_name"]) == [name for name, _, _ in ROWS]

    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in (11, 12, 13):
        (folder / f"photo-{seed}.jpg").write_bytes(image_bytes(seed, "JPEG"))
    (folder / "metadata.csv").write_text("file_name,who\nphoto-11.jpg,Ann\nphoto-12.jpg,\nphoto-13.jpg,Cy\n")
    result = service.call("submit-dataset", str(folder), "--name-column", "who")
    assert "queued 3" in result.stdout, result.stdout
    listed = service.call("export", "--source", str(folder), "--state", "queued", "--columns", "name")
    exported = pd.read_csv(io.StringIO(listed.stdout), keep_default_na=False)
    # Without an im_name column, rows are named by their image's file name.
    assert sorted(zip(exported["im_name"], exported["name"], strict=True)) == [
        ("photo-11.jpg", "Ann"),
        ("photo-12.jpg", ""),
        ("photo-13.jpg", "Cy"),
    ]


def test_bad_rows_are_rejected_with_reasons(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = dataset_service(service_for, sqlite_url, tmp_path)
    source = tmp_path / "ds"
    features = datasets.Features({"picture": datasets.Image(), "im_name": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {
            "picture": [
                {"bytes": image_bytes(1), "path": None},
                {"bytes": b"not an image", "path": None},
                None,
                # Headers claiming billions of pixels used to end the whole submit in a traceback.
                {"bytes": png_claiming(30000, 30000), "path": None},
                {"bytes": jpeg_claiming(65000, 65000), "path": None},
                {"bytes": image_bytes(2), "path": None},
            ],
            "im_name": ["good", "garbage", "empty", "huge-png", "huge-jpeg", "also-good"],
        },
        features=features,
    ).save_to_disk(str(source))
    result = service.call("submit-dataset", str(source))
    assert "queued 2" in result.stdout and "rejected 4" in result.stdout, result.stdout
    assert "row 1 (garbage): not an image Pillow can read" in result.stderr
    assert "row 2 (empty): the row has no image" in result.stderr
    assert "row 3 (huge-png): image too large: Image size (900000000 pixels)" in result.stderr
    assert "row 4 (huge-jpeg): image too large: Image size (4225000000 pixels)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-column", "nope"], "no column 'nope'; the dataset has: image, im_name, character"),
        (["--split", "test"], "no split 'test'"),
        (["-t", "Nonsense"], "unknown caption type"),
    ],
)
def test_option_errors_are_one_line(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    service = dataset_service(service_for, sqlite_url, tmp_path)
    source = tmp_path / "ds"
    datasets.DatasetDict(
        {"train": build_dataset(ROWS[:2]), "validation": build_dataset(ROWS[2:3])}
    ).save_to_disk(str(source))
    result = service.cli("submit-dataset", str(source), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert jobs_in(sqlite_url) == []


def test_sources_that_cannot_be_loaded(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = dataset_service(service_for, sqlite_url, tmp_path)
    missing = service.cli("submit-dataset", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode != 0 and "no such file or folder" in missing.stderr
    # The hub path exists for online users; offline (as here) it fails in one line.
    hub = service.cli("submit-dataset", "someone/some-dataset", check=False)
    assert hub.returncode != 0, hub.stdout
    assert "cannot load dataset someone/some-dataset from the Hugging Face hub" in hub.stderr, hub.stderr
    assert "Traceback" not in missing.stderr + hub.stderr
