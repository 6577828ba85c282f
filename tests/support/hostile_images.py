"""Image files crafted to break readers: headers that claim billions of pixels, broken EXIF.

Each is built byte by byte from a real file's structure (valid chunks, valid checksums), so it
is what an attacker or a broken camera would hand us, not a random blob. Fuzzing headers of real
PNG, JPEG, GIF, WebP, TIFF, BMP and ICO files (Pillow 13) found these ways out of Pillow besides
OSError: DecompressionBombError at open (BMP, TIFF, GIF, PNG, JPEG headers past twice its pixel
limit), ValueError (truncated IHDR, impossible dimensions, tiles outside the image), SyntaxError
(broken PNG chunks, a WebP EXIF that is not TIFF) and, from EXIF rewriting in
ImageOps.exif_transpose, TypeError and struct.error.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

ORIENTATION, X_RESOLUTION, RESOLUTION_UNIT = 0x0112, 0x011A, 0x0128
ASCII, BYTE, SHORT = 2, 1, 3


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR says ``width``×``height`` (8-bit grey) with one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real baseline JPEG whose SOF0 is rewritten to say ``width``×``height``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "grey").save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("P", (4, 4)).save(out, "GIF")
    data = bytearray(out.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    image = data.index(b",")  # the image descriptor
    data[image + 5 : image + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, "BMP")
    data = bytearray(out.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header says ``width``×``height`` (14 bits each, at most 16384)."""
    out = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(out, "WEBP", lossless=True)
    data = bytearray(out.getvalue())
    start = data.index(b"VP8L") + 9  # chunk id, size, the 0x2f signature
    bits = int.from_bytes(data[start : start + 4], "little") & ~((1 << 28) - 1)
    bits |= (width - 1) | (height - 1) << 14
    data[start : start + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    """A TIFF whose ImageWidth and ImageLength tags say ``width``×``height``."""
    out = io.BytesIO()
    Image.new("L", (4, 4)).save(out, "TIFF")
    data = bytearray(out.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    for n in range(count):
        entry = ifd + 2 + 12 * n
        tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: rewritten as LONG
            value = width if tag == 256 else height
            data[entry + 2 : entry + 12] = struct.pack(order + "HII", 4, 1, value)
    return bytes(data)


def tiff_ifd(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A big-endian TIFF header and one IFD of (tag, type, count, value) entries, values inline."""
    out = b"MM\x00\x2a" + struct.pack(">IH", 8, len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\x00")
    return out + b"\x00\x00\x00\x00"


def jpeg_with_exif(exif: bytes, size: tuple[int, int] = (60, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "JPEG", exif=b"Exif\x00\x00" + exif)
    return out.getvalue()


def exif_rational_as_byte() -> bytes:
    """Turned 90° (orientation 6), XResolution stored as BYTE: rewriting the EXIF raises TypeError."""
    return jpeg_with_exif(
        tiff_ifd([(ORIENTATION, SHORT, 1, struct.pack(">H", 6)), (X_RESOLUTION, BYTE, 1, b"\x48")])
    )


def exif_short_as_ascii() -> bytes:
    """Turned 90°, ResolutionUnit stored as text: rewriting the EXIF raises struct.error."""
    return jpeg_with_exif(
        tiff_ifd([(ORIENTATION, SHORT, 1, struct.pack(">H", 6)), (RESOLUTION_UNIT, ASCII, 4, b"abc\x00")])
    )


def webp_with_exif_not_tiff() -> bytes:
    """A WebP whose EXIF chunk is not TIFF: reading its EXIF raises SyntaxError."""
    out = io.BytesIO()
    Image.new("RGB", (60, 20), "blue").save(out, "WEBP", exif=b"\x00M\x00*\x00\x00\x00\x08" + b"\x00" * 8)
    return out.getvalue()


def png_truncated_ihdr() -> bytes:
    """A PNG whose IHDR chunk is 4 bytes long: Pillow raises ValueError at open."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", b"\x00\x00\x00\x10") + _chunk(b"IEND", b"")


def png_broken_chunk() -> bytes:
    """A PNG whose pixel data is cut by a chunk of garbage type and length: SyntaxError at load.

    The header reads fine (the first IDAT is whole), so it passes intake and fails in the worker.
    """
    rows = b"".join(b"\x00" + bytes(range(48)) for _ in range(48))  # 48x48 grey, filter 0
    pixels = zlib.compress(rows)
    header = struct.pack(">IIBBBBB", 48, 48, 8, 0, 0, 0, 0)
    half = len(pixels) // 2
    garbage = b"\x00\x00\x00\x10\xe4\xe4\x84\xc3" + b"\x00" * 20
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels[:half])
        + garbage
        + _chunk(b"IDAT", pixels[half:])
        + _chunk(b"IEND", b"")
    )


Maker = Callable[[], bytes]

# Refused by their header alone, at intake (submit, watch, dataset intake): name → (bytes, reason).
REFUSED_BY_HEADER: dict[str, tuple[Maker, str]] = {
    "header-30000x30000.png": (lambda: png_claiming(30000, 30000), "image too large"),
    "header-100000x100000.png": (lambda: png_claiming(100000, 100000), "image too large"),
    "header-65000x65000.jpg": (lambda: jpeg_claiming(65000, 65000), "image too large"),
    "header-65000x65000.gif": (lambda: gif_claiming(65000, 65000), "image too large"),
    "header-16383x16383.webp": (lambda: webp_claiming(16383, 16383), "image too large"),
    "header-huge.bmp": (lambda: bmp_claiming(200000, 200000), "image too large"),
    "header-huge.tiff": (lambda: tiff_claiming(100000, 100000), "image too large"),
    "truncated-ihdr.png": (png_truncated_ihdr, "broken image"),
}
# Headers that read, refused by the worker's decode.
REFUSED_AT_DECODE: dict[str, tuple[Maker, str]] = {
    # Between Pillow's limit and twice it: only a warning from Pillow, refused by our limit.
    "header-12000x12000.png": (lambda: png_claiming(12000, 12000), "image too large: 12000x12000"),
    "broken-chunk.png": (png_broken_chunk, "broken image: broken PNG file"),
}
# Fine pixels, broken EXIF: captioned (upright where the orientation can still be read).
CAPTIONED_DESPITE_EXIF: dict[str, Maker] = {
    "exif-rational-as-byte.jpg": exif_rational_as_byte,
    "exif-short-as-ascii.jpg": exif_short_as_ascii,
    "exif-not-tiff.webp": webp_with_exif_not_tiff,
}


def write_hostile(root: Path) -> tuple[dict[str, str], list[Path]]:
    """All of them in ``root``: (name → the reason it must fail with, the files to caption)."""
    root.mkdir(parents=True, exist_ok=True)
    must_fail = {}
    for name, (make, reason) in {**REFUSED_BY_HEADER, **REFUSED_AT_DECODE}.items():
        (root / name).write_bytes(make())
        must_fail[name] = reason
    captioned = []
    for name, make_good in CAPTIONED_DESPITE_EXIF.items():
        (root / name).write_bytes(make_good())
        captioned.append(root / name)
    return must_fail, captioned
