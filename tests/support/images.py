"""Image files for the tests: a folder of ordinary images of mixed formats, and a folder of odd and
broken ones with the reasons they must fail."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

from tests.support.hostile_images import write_hostile

FORMATS = [
    ("jpg", "JPEG"),
    ("png", "PNG"),
    ("webp", "WEBP"),
    ("bmp", "BMP"),
    ("gif", "GIF"),
    ("tiff", "TIFF"),
]


def make_images(root: Path, count: int, *, seed: int = 0) -> list[Path]:
    """`count` distinct images of mixed formats, sizes and modes, some in nested folders."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        ext, fmt = FORMATS[i % len(FORMATS)]
        folder = root / ("nested/deeper" if i % 5 == 0 else "nested" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        size = (rng.randint(16, 700), rng.randint(16, 500))
        image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        image.putpixel((0, 0), (i % 256, (i * 7) % 256, (i * 13) % 256))
        if fmt == "PNG" and i % 2 == 0:
            image = image.convert("RGBA")
        path = folder / f"image {i:03d}.{ext}"
        image.save(path, fmt)
        paths.append(path)
    return paths


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
