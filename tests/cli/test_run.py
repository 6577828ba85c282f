"""The model commands: `caption` (no queue), `worker` start-up errors, and `make demo`'s script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, wait_until


def test_caption_command_matches_the_worker(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for i, colour in enumerate(("red", "navy", "olive")):
        Image.new("RGB", (64 + i * 30, 48), colour).save(images / f"{i}.png")
    (images / "bad.jpg").write_text("not an image")
    service = service_for(sqlite_url)
    service.start_worker()
    service.cli("submit", str(images), "--greedy", "-t", "Art Critic", "--append", " [end]")
    wait_until(all_finished(sqlite_url, 4), timeout=120, what="jobs to finish")
    queued = {job.path: job.caption for job in jobs_in(sqlite_url) if job.status == "done"}

    result = service.cli(
        "caption",
        str(images),
        "--greedy",
        "-t",
        "Art Critic",
        "--append",
        " [end]",
        "--json",
        "-b",
        "2",
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "bad.jpg: not an image Pillow can read" in result.stderr
    assert "1 of 4 images could not be read" in result.stderr
    assert "random text" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["path"]: r["caption"] for r in records} == queued
    assert all(r["prompt"].startswith("Analyze this image like an art critic") for r in records)


def test_worker_with_a_missing_model_says_so_in_one_line(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    result = service.cli("worker", "--model", str(tmp_path / "no-such-model"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: model folder not found")
    assert "Traceback" not in result.stderr


def test_demo_starts_its_own_redis_when_none_is_reachable(tmp_path: Path, tiny_model: Path) -> None:
    env = dict(os.environ)
    env.update(
        JOYCAP_DEMO_DIR=str(tmp_path / "demo"),
        JOYCAP_BROKER_URL="redis://127.0.0.1:1/0",
        JOYCAP_MODEL=str(tiny_model),
        JOYCAP_MAX_NEW_TOKENS="8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "joycap_queue.ops.demo"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no Redis reachable: started redis-server" in result.stdout
    for name in ("apple.png", "forest.jpg", "logo.png", "portrait.jpg", "skyline.webp", "sunset.jpg"):
        assert f" done {Path(__file__).resolve().parents[2] / 'examples' / 'images'}" in result.stdout
        assert name in result.stdout
    assert "done 6, failed 0" in result.stdout
    assert "random text" in result.stderr


def test_a_seeded_sample_repeats_and_the_engines_agree_when_greedy(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for i, colour in enumerate(("teal", "maroon", "gold")):
        Image.new("RGB", (60 + i * 20, 50), colour).save(images / f"{i}.png")
    service = service_for(sqlite_url)

    def captions(*args: str) -> list[str]:
        result = service.cli("caption", str(images), "--json", "--max-new-tokens", "24", *args)
        return [json.loads(line)["caption"] for line in result.stdout.splitlines()]

    seeded = captions("--sample", "--seed", "7")
    assert captions("--sample", "--seed", "7", "-b", "3") == seeded
    assert captions("--sample", "--seed", "8") != seeded
    assert captions("--greedy") == captions("--greedy", "--engine", "generate")
