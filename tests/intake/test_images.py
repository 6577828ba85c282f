from __future__ import annotations

import errno
import hashlib
import io
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from joycap_queue.intake.images import (
    ImageError,
    decodes_completely,
    discover,
    file_error_reason,
    hash_file,
    open_image_rgb,
    probe_image,
)
from joycap_queue.intake.imagestore import store_image
from tests.support.hostile_images import CAPTIONED_DESPITE_EXIF, REFUSED_AT_DECODE, REFUSED_BY_HEADER

LIMIT = 50_000_000


def save(image: Image.Image, path: Path, fmt: str, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)
    return path


def test_discover_walks_folders_once_in_order_and_flags_non_images(tmp_path: Path) -> None:
    save(Image.new("RGB", (4, 4)), tmp_path / "b.PNG", "PNG")
    save(Image.new("RGB", (4, 4)), tmp_path / "sub" / "a.jpg", "JPEG")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    found = list(discover([tmp_path, tmp_path / "b.PNG"]))
    names = [(f.path.name, f.is_image) for f in found]
    assert names == [("b.PNG", True), ("readme.txt", False), ("a.jpg", True)]
    assert [f.path.name for f in discover([tmp_path], recursive=False)] == ["b.PNG", "readme.txt"]


def test_hash_and_probe(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (40, 30), "red"), tmp_path / "x.png", "PNG")
    digest, size = hash_file(path, chunk_size=7)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert size == path.stat().st_size
    assert probe_image(path) == (40, 30)
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        probe_image(bad)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (0, 0, 255, 0), (255, 255, 255)),  # fully transparent → white background
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
        ("LA", (0, 0), (255, 255, 255)),
        ("L", 128, (128, 128, 128)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ],
)
def test_modes_become_rgb(tmp_path: Path, mode: str, colour: object, expected: tuple[int, int, int]) -> None:
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    path = save(Image.new(mode, (8, 8), colour), tmp_path / f"x.{fmt.lower()}", fmt)  # type: ignore[arg-type]
    image = open_image_rgb(path, max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == expected


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = save(Image.new("I;16", (8, 8), 32768), tmp_path / "g16.png", "PNG")
    pixel = open_image_rgb(path, max_pixels=LIMIT).getpixel((0, 0))
    assert isinstance(pixel, tuple) and 120 <= pixel[0] <= 136


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 1
    path = save(image, tmp_path / "p.png", "PNG", transparency=1)
    assert open_image_rgb(path, max_pixels=LIMIT).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (60, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = save(image, tmp_path / "rot.jpg", "JPEG", exif=exif)
    assert open_image_rgb(path, max_pixels=LIMIT).size == (20, 60)


def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert open_image_rgb(path, max_pixels=LIMIT).getpixel((5, 5)) == (255, 0, 0)


def test_failures_are_one_line_reasons(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "trunc.jpg"
    data = io.BytesIO()
    Image.new("RGB", (200, 200), "green").save(data, "JPEG")
    truncated.write_bytes(data.getvalue()[:300])
    big = save(Image.new("L", (300, 300)), tmp_path / "big.png", "PNG")
    locked = save(Image.new("RGB", (4, 4)), tmp_path / "locked.png", "PNG")
    locked.chmod(0)
    cases = {
        empty: "not an image",
        truncated: "broken image",
        big: "image too large: 300x300",
        tmp_path / "missing.png": "file not found",
    }
    if os.geteuid() != 0:  # root reads anything
        cases[locked] = "permission denied"
    for path, reason in cases.items():
        with pytest.raises(ImageError) as info:
            open_image_rgb(path, max_pixels=300 * 299)
        assert reason in str(info.value)
        assert "\n" not in str(info.value)


def test_read_verified_refuses_changed_or_missing_files(tmp_path: Path) -> None:
    from joycap_queue.intake.images import read_verified

    path = save(Image.new("RGB", (4, 4), "red"), tmp_path / "x.png", "PNG")
    digest, _ = hash_file(path)
    assert read_verified(path, digest) == path.read_bytes()
    save(Image.new("RGB", (4, 4), "blue"), path, "PNG")
    with pytest.raises(ImageError, match="file changed after submit"):
        read_verified(path, digest)
    path.unlink()
    with pytest.raises(ImageError, match="file not found"):
        read_verified(path, digest)
    with pytest.raises(ImageError, match="is a directory"):
        read_verified(tmp_path, digest)


def first_reason(*calls: Callable[[], object]) -> str | None:
    """The ImageError message of the first call that refuses; None when every call succeeds."""
    for call in calls:
        try:
            call()
        except ImageError as exc:
            return str(exc)
    return None


@pytest.mark.parametrize("name", sorted({**REFUSED_BY_HEADER, **REFUSED_AT_DECODE}))
def test_hostile_files_become_one_line_reasons_never_other_exceptions(tmp_path: Path, name: str) -> None:
    make, reason = {**REFUSED_BY_HEADER, **REFUSED_AT_DECODE}[name]
    path = tmp_path / name
    path.write_bytes(make())
    probed = first_reason(lambda: probe_image(path))
    # Refused by the header at intake, or else by the worker's decode (from a path and from bytes,
    # as the worker reads them); anything but ImageError escaping fails the test.
    assert (probed is not None) == (name in REFUSED_BY_HEADER), probed
    for decoded in (
        first_reason(lambda: open_image_rgb(path, max_pixels=LIMIT)),
        first_reason(lambda: open_image_rgb(io.BytesIO(path.read_bytes()), max_pixels=LIMIT)),
    ):
        for message in (probed or decoded, decoded):
            assert message is not None and reason in message, (name, message)
            assert "\n" not in message and len(message) <= 300
    assert first_reason(lambda: store_image(tmp_path / "store", path.read_bytes())) == probed
    if "header" in name:
        # The watcher takes it as complete (to be refused with its reason), not as half-written.
        assert decodes_completely(path, max_pixels=LIMIT)


@pytest.mark.parametrize("name", sorted(CAPTIONED_DESPITE_EXIF))
def test_a_broken_exif_costs_the_orientation_at_most_never_the_image(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(CAPTIONED_DESPITE_EXIF[name]())
    image = open_image_rgb(path, max_pixels=LIMIT)
    # The JPEGs' orientation (6) is still readable beside the broken tag: turned upright.
    assert image.mode == "RGB" and image.size == ((60, 20) if name.endswith(".webp") else (20, 60))
    assert probe_image(path) == (60, 20)
    assert decodes_completely(path, max_pixels=LIMIT)


def test_every_kind_of_failure_has_its_one_line_reason() -> None:
    cases: list[tuple[BaseException, str]] = [
        (FileNotFoundError(errno.ENOENT, "No such file"), "file not found"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EIO, "Input/output error"), "cannot read file: Input/output error"),
        (OSError("image file is truncated (3 bytes not processed)"), "broken image: image file is truncated"),
        (SyntaxError("broken PNG file"), "broken image: broken PNG file"),
        (struct.error("unpack requires a buffer of 4 bytes"), "broken image: struct.error: unpack requires"),
        (TypeError("bad operand type"), "broken image: TypeError: bad operand type"),
        (EOFError(), "broken image: EOFError"),
        (ZeroDivisionError("division by zero"), "broken image: ZeroDivisionError"),
        (MemoryError(), "image too large"),
        (ValueError("line one\nline two"), "broken image: line one"),
    ]
    for exc, reason in cases:
        message = file_error_reason(exc)
        assert message.startswith(reason), (exc, message)
        assert "\n" not in message
