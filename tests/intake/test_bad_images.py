"""Odd and broken images through a real worker: each ends captioned or failed with a one-line
reason, the rest of its batch is unaffected, and the worker keeps going."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from tests.conftest import Service, wait_until
from tests.pipeline.test_pipeline import all_finished, jobs_in
from tests.support.hostile_images import REFUSED_BY_HEADER, write_hostile

# Refused at intake, before any worker: zero bytes, text, and the headers of tests/support/hostile_images.py.
REJECTED_AT_INTAKE = 2 + len(REFUSED_BY_HEADER)


def jpeg(image: Image.Image, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **kwargs)
    return out.getvalue()


def png(image: Image.Image, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **kwargs)
    return out.getvalue()


def make_odd_images(root: Path) -> tuple[dict[str, str], list[Path]]:
    """Files that must fail (name → expected reason) and files that must be captioned."""
    root.mkdir(parents=True)
    must_fail = {
        "zero-bytes.jpg": "not an image",
        "text-named.jpg": "not an image",
        "truncated.jpg": "broken image",
        "truncated.png": "broken image",
        "bomb.png": "image too large",
        "deleted-after-submit.png": "file not found",
        "replaced-after-submit.png": "file changed after submit",
    }
    (root / "zero-bytes.jpg").write_bytes(b"")
    (root / "text-named.jpg").write_text("hello, I am text\n")
    (root / "truncated.jpg").write_bytes(jpeg(Image.effect_noise((300, 200), 60).convert("RGB"))[:2000])
    (root / "truncated.png").write_bytes(png(Image.effect_noise((300, 200), 60).convert("RGB"))[:3000])
    Image.new("L", (5000, 5000)).save(root / "bomb.png")  # over the test limit of 20 MP, tiny on disk
    Image.new("RGB", (20, 20), "red").save(root / "deleted-after-submit.png")
    Image.new("RGB", (20, 20), "blue").save(root / "replaced-after-submit.png")

    good = []

    def keep(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)
        good.append(root / name)

    keep("very wide.png", png(Image.new("RGB", (4000, 8), "green")))
    keep("very-tall.png", png(Image.new("RGB", (8, 4000), "purple")))
    keep("cmyk.jpg", jpeg(Image.new("CMYK", (64, 48), (0, 255, 255, 0))))
    keep("sixteen-bit.png", png(Image.new("I;16", (64, 48), 40000)))
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    keep("palette-transparent.png", png(palette, transparency=1))
    keep("grey-alpha.png", png(Image.new("LA", (40, 40), (90, 128))))
    keep("rgba.png", png(Image.new("RGBA", (40, 40), (0, 0, 255, 100))))
    exif = Image.Exif()
    exif[0x0112] = 6
    keep("rotated.jpg", jpeg(Image.new("RGB", (80, 30), "yellow"), exif=exif))
    frames = [Image.new("RGB", (30, 30), colour) for colour in ("red", "blue", "green")]
    for name, fmt in (("animated.gif", "GIF"), ("animated.webp", "WEBP")):
        out = io.BytesIO()
        frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=80, loop=0)
        keep(name, out.getvalue())
    keep("ünïcödé name ✓.png", png(Image.new("RGB", (30, 30), "orange")))
    keep("new\nline.png", png(Image.new("RGB", (30, 30), "pink")))
    # Headers claiming billions of pixels, broken chunks, broken EXIF: crafted, see the module.
    hostile_fail, hostile_good = write_hostile(root)
    return {**must_fail, **hostile_fail}, good + hostile_good


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
        assert job.caption
    assert worker.process.poll() is None, "the worker must keep running"
    assert os.path.islink(tmp_path / "odd" / "loop")
