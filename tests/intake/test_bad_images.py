"""Odd and broken images through a real worker: each ends captioned or failed with a one-line
reason, the rest of its batch is unaffected, and the worker keeps going."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tests.support.hostile_images import REFUSED_BY_HEADER
from tests.support.images import make_odd_images
from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, wait_until

# Refused at intake, before any worker: zero bytes, text, and the headers of tests/support/hostile_images.py.
REJECTED_AT_INTAKE = 2 + len(REFUSED_BY_HEADER)


def test_odd_images_end_captioned_or_failed_with_their_reason(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    must_fail, good = make_odd_images(tmp_path / "odd")
    (tmp_path / "odd" / "loop").symlink_to(tmp_path / "odd", target_is_directory=True)
    service = service_for(sqlite_url)
    service.env["JOYCAP_MAX_IMAGE_PIXELS"] = str(20_000_000)
    result = service.cli("submit", str(tmp_path / "odd"))
    (tmp_path / "odd" / "deleted-after-submit.png").unlink()
    Image.new("RGB", (20, 20), "black").save(tmp_path / "odd" / "replaced-after-submit.png")
    total = len(must_fail) + len(good)
    # One bad header used to end the submit in a traceback with nothing queued: now every good
    # image is queued, each bad one is a row with its reason, and Pillow's warnings stay quiet.
    assert f"queued {total - REJECTED_AT_INTAKE}," in result.stdout, result.stdout
    assert f"rejected {REJECTED_AT_INTAKE}" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
    worker = service.start_worker("--batch-size", "4")
    wait_until(all_finished(sqlite_url, total), timeout=180, what="every odd image")

    jobs = {Path(job.path).name: job for job in jobs_in(sqlite_url)}
    assert set(jobs) == set(must_fail) | {p.name for p in good}
    for name, reason in must_fail.items():
        job = jobs[name]
        assert job.status == "failed", name
        assert job.error is not None and reason in job.error, (name, job.error)
        assert "\n" not in job.error
    for path in good:
        job = jobs[path.name]
        assert job.status == "done", (path.name, job.error)
        assert job.caption, (path.name, job.quality)
    assert worker.process.poll() is None, "the worker must keep running"
    assert os.path.islink(tmp_path / "odd" / "loop")
