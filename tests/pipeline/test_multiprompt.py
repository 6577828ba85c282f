"""Several captions per image: repeated --prompt, prompt files in mode "all", and the exports that
put one caption column per prompt. Real CLI, Redis, SQLite and one real worker with the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pytest

from joycap_queue.config import Settings
from joycap_queue.errors import OptionError
from joycap_queue.intake.watch.config import load_watch_config
from tests.support.datasets import build_dataset, dataset_service
from tests.support.jobs import all_finished, jobs_in, rows_in
from tests.support.services import Service, wait_until
from tests.support.watching import RunningWatcher, png_bytes, watchers

A = "Describe the colours of this image."
B = "List the shapes in this image."


@pytest.fixture
def start_watcher() -> Iterator[Callable[..., RunningWatcher]]:
    with watchers() as start:
        yield start


def prompts_by_image(database_url: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for job in jobs_in(database_url):
        found[job.content_hash].append(job.prompt)
    return dict(found)


def one_line_error(result: object, *mentions: str) -> str:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 2, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, stderr
    for mention in mentions:
        assert mention in lines[0], stderr
    return lines[0]


def test_two_prompts_give_two_jobs_per_image_and_resubmitting_queues_nothing(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 3)
    service = service_for(sqlite_url)
    first = service.call("submit", str(tmp_path / "in"), "-p", A, "--prompt", B)
    assert "queued 6," in first.stdout and "(3 files, 2 prompts)" in first.stdout, first.stdout
    assert len(first.stdout.strip().splitlines()) == 1, first.stdout
    by_image = prompts_by_image(sqlite_url)
    assert len(by_image) == 3
    assert all(sorted(found) == sorted([A, B]) for found in by_image.values()), by_image
    assert len({job.submission_id for job in jobs_in(sqlite_url)}) == 1

    again = service.call("submit", str(tmp_path / "in"), "-p", A, "-p", B)
    assert "queued 0," in again.stdout and "already queued 6" in again.stdout, again.stdout
    assert len(jobs_in(sqlite_url)) == 6
    # One prompt is a submission as before: the line has no prompt count, and A is known.
    single = service.call("submit", str(tmp_path / "in"), "-p", A)
    assert "already queued 3" in single.stdout and "(3 files)" in single.stdout, single.stdout


def test_prompt_file_in_mode_all_gives_every_prompt_to_every_image(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 2)
    every = tmp_path / "every.json"
    # A weight of 0 would never be drawn: in mode all, weights are ignored.
    every.write_text(json.dumps({"mode": "all", "prompts": [A, {"prompt": B, "weight": 0}]}))
    service = service_for(sqlite_url)
    result = service.call("submit", str(tmp_path / "in"), "--prompt-file", str(every))
    assert "queued 4," in result.stdout and "2 prompts" in result.stdout, result.stdout
    assert all(sorted(p) == sorted([A, B]) for p in prompts_by_image(sqlite_url).values())

    # The object form in mode draw still draws one prompt per image (B has no weight: never B).
    drawn = tmp_path / "draw.json"
    drawn.write_text(
        json.dumps({"mode": "draw", "prompts": ["Caption it briefly.", {"prompt": B, "weight": 0}]})
    )
    result = service.call("submit", str(tmp_path / "in"), "--prompt-file", str(drawn))
    assert "queued 2," in result.stdout and "(2 files)" in result.stdout, result.stdout
    assert all(len(p) == 3 and p[-1] == "Caption it briefly." for p in prompts_by_image(sqlite_url).values())


def test_bad_prompt_files_and_prompt_mixes_are_one_line_errors(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 1)
    service = service_for(sqlite_url)
    cases = {
        '{"mode": "every", "prompts": ["a"]}': ("'every'", "mode"),
        '{"mode": "all"}': ('"prompts"',),
        '{"mode": "all", "prompts": "a"}': ("list",),
        '{"mode": "all", "prompts": ["a"], "weights": [1]}': ("'weights'",),
        '{"mode": "all", "prompts": ["a", 3]}': ("#2",),
    }
    for number, (content, mentions) in enumerate(cases.items()):
        path = tmp_path / f"bad-{number}.json"
        path.write_text(content)
        result = service.cli("submit", str(tmp_path / "in"), "--prompt-file", str(path), check=False)
        one_line_error(result, "--prompt-file", path.name, *mentions)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"mode": "all", "prompts": [A, B]}))
    both = service.cli("submit", str(tmp_path / "in"), "-p", A, "--prompt-file", str(good), check=False)
    one_line_error(both, "not both")
    empty = service.cli("submit", str(tmp_path / "in"), "-p", A, "-p", " ", check=False)
    one_line_error(empty, "--prompt", "#2 is empty")
    moving = service.cli("submit", str(tmp_path / "in"), "-p", A, "-p", B, "--move", check=False)
    one_line_error(moving, "--move")
    retry = service.cli("retry", "-p", A, "-p", B, check=False)
    one_line_error(retry, "one --prompt")
    retry_all = service.cli("retry", "--prompt-file", str(good), check=False)
    one_line_error(retry_all, "draw")
    assert jobs_in(sqlite_url) == []


def test_caption_command_captions_each_image_with_each_prompt(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(2):
        (folder / f"{seed}.png").write_bytes(png_bytes(seed))
    env = {"JOYCAP_MODEL": str(tiny_model), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "joycap_queue", "caption", str(folder), "-p", A, "-p", B, "--json"],
        env={**os.environ, **env, "JOYCAP_MAX_NEW_TOKENS": "6"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 4, result.stdout
    by_path: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_path[record["path"]].append(record["prompt"])
    assert {Path(p).name: sorted(found) for p, found in by_path.items()} == {
        "0.png": sorted([A, B]),
        "1.png": sorted([A, B]),
    }


def test_watch_config_takes_a_list_of_prompts(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    path = tmp_path / "watch.toml"
    path.write_text(f'[[inbox]]\npath = "a"\nprompt = ["{A}", "{B}"]\n')
    config = load_watch_config(path, Settings())
    assert [request.prompt_for("x") for request in config.inboxes[0].requests] == [A, B]
    path.write_text(f'[[inbox]]\npath = "a"\nprompt = "{A}"\n')
    assert [r.prompt_for("x") for r in load_watch_config(path, Settings()).inboxes[0].requests] == [A]
    path.write_text('[[inbox]]\npath = "a"\nprompt = ["a", 3]\n')
    with pytest.raises(OptionError, match="inbox #1: prompt is a string or a list of strings"):
        load_watch_config(path, Settings())


def test_a_watcher_with_two_prompts_queues_two_jobs_per_file(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "before.png").write_bytes(png_bytes(1))
    service = service_for(sqlite_url)
    start_watcher(service, inbox, custom_prompt=(A, B))
    (inbox / "after.png").write_bytes(png_bytes(2))

    def both_queued() -> bool:
        found = prompts_by_image(sqlite_url)
        return len(found) == 2 and all(sorted(p) == sorted([A, B]) for p in found.values())

    wait_until(both_queued, timeout=30, what="two jobs per file")
    assert len(jobs_in(sqlite_url)) == 4


def test_two_prompts_end_to_end_into_caption_columns(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(2):
        (folder / f"img{seed}.png").write_bytes(png_bytes(seed))
    source = tmp_path / "ds"
    rows = [("r0.png", 0, None), ("r1.png", 1, None), ("r2.png", 2, None)]
    build_dataset(rows).save_to_disk(str(source))
    service = dataset_service(service_for, sqlite_url, tmp_path)
    service.start_worker()

    service.call("submit", str(folder), "-p", A, "-p", B, "--greedy")
    wait_until(all_finished(sqlite_url, 4), timeout=180, what="4 jobs to finish")
    jobs = jobs_in(sqlite_url)
    assert all(job.status == "done" and job.caption for job in jobs), [(j.path, j.error) for j in jobs]
    caption = {(Path(job.path).name, job.prompt): job.caption for job in jobs}

    out = tmp_path / "by-image"
    service.call(
        "export", "--format", "hf-dataset", "-o", str(out), "--caption-column", "a", "--caption-column", "b"
    )
    exported = datasets.load_from_disk(str(out))
    assert len(exported) == 2
    assert {"a", "b", "a_prompt", "b_prompt"} <= set(exported.column_names), exported.column_names
    for row in exported:
        assert (row["a_prompt"], row["b_prompt"]) == (A, B)
        assert row["a"] == caption[(row["im_name"], A)] and row["b"] == caption[(row["im_name"], B)]
        assert row["image"] is not None

    named = tmp_path / "named"
    service.call("export", "--format", "hf-dataset", "-o", str(named), "--caption-column", "cap")
    assert {"cap", "cap_2"} <= set(datasets.load_from_disk(str(named)).column_names)
    wrong = service.cli(
        "export",
        "--format",
        "hf-dataset",
        "-o",
        str(tmp_path / "x"),
        "--caption-column",
        "a",
        "--caption-column",
        "b",
        "--caption-column",
        "c",
        check=False,
    )
    one_line_error(wrong, "--caption-column", "2 prompts", "3")

    submitted = service.call("submit-dataset", str(source), "-p", A, "-p", B, "--greedy")
    assert "queued 6" in submitted.stdout and "(3 rows)" in submitted.stdout, submitted.stdout
    wait_until(all_finished(sqlite_url, 10), timeout=180, what="the dataset's 6 jobs to finish")
    by_id = {job.id: job for job in jobs_in(sqlite_url)}
    row_captions: dict[int, dict[str, str | None]] = defaultdict(dict)
    for link in rows_in(sqlite_url):
        job = by_id[link.job_id]
        row_captions[link.row_index][job.prompt] = job.caption
    out2 = tmp_path / "captioned"
    service.call(
        "export",
        "--format",
        "hf-dataset",
        "--source",
        str(source),
        "-o",
        str(out2),
        "--caption-column",
        "a",
        "--caption-column",
        "b",
    )
    captioned = datasets.load_from_disk(str(out2))
    assert captioned.column_names == ["image", "im_name", "character", "a", "b"]
    assert captioned["im_name"] == [name for name, _, _ in rows]
    assert captioned["a"] == [row_captions[i][A] for i in range(3)]
    assert captioned["b"] == [row_captions[i][B] for i in range(3)]
    assert all(captioned["a"]) and all(captioned["b"])
