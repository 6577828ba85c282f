"""Finding images, hashing their content and opening them safely.

Light side: Pillow only. The submitter reads just the header (size, format); the worker opens the
whole image through `open_image_rgb`, which is where every odd file becomes an RGB picture or a
one-line reason.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import ExifTags, Image, ImageSequence, UnidentifiedImageError

from joycap_queue.errors import first_line

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Transparent pixels are composited onto white: training sets usually show transparent
# artwork (logos, stickers, cut-outs) on white, and black would read as a dark background.
ALPHA_BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """The file is not an image we can caption; the message is the one-line reason."""


@dataclass(frozen=True)
class Discovered:
    """A file found under a submitted path: an image candidate, or skipped for its extension."""

    path: Path
    is_image: bool


def discover(paths: Iterable[str | Path], *, recursive: bool = True) -> Iterator[Discovered]:
    """Walk files and folders; yield every regular file once, in a stable (sorted) order.

    Symlinked folders are not followed, which also keeps a symlink loop from recursing forever.
    """
    seen: set[Path] = set()
    for given in paths:
        root = Path(given).expanduser()
        walker = _walk(root, recursive=recursive) if root.is_dir() else iter([root])
        for path in walker:
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            yield Discovered(resolved, resolved.suffix.lower() in IMAGE_EXTENSIONS)


def _walk(root: Path, *, recursive: bool) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    yield from _walk(Path(entry.path), recursive=recursive)
            elif entry.is_file():
                yield Path(entry.path)
        except OSError:
            continue


def hash_file(path: Path, *, chunk_size: int = 1 << 20) -> tuple[str, int]:
    """SHA-256 of the content and its size in bytes."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def probe_image(path: Path) -> tuple[int, int]:
    """Width and height from the header alone (no decoding); ImageError if it is no image."""
    try:
        with warnings.catch_warnings():
            # Between Pillow's limit and twice it Pillow only warns: noise on `submit`'s stderr.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the file gets its reason
        raise ImageError(file_error_reason(exc)) from None


def decodes_completely(path: Path, *, max_pixels: int) -> bool:
    """True when every frame decodes: how the watcher tells a finished file from a half-written one.

    An image over the pixel limit counts as complete without decoding: the worker refuses it
    with the reason, and decoding it here is the very cost the limit exists to avoid.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return True
                for frame in ImageSequence.Iterator(image):
                    frame.load()
        return True
    except Image.DecompressionBombError:
        # A header past twice Pillow's limit is refused at open, before its size can be asked:
        # as over the limit, and as final, since waiting for it to change gains nothing.
        return True
    except Exception:  # noqa: BLE001 - any other failure means "not a whole image yet"
        return False


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def has_end_marker(path: Path) -> bool:
    """Whether the file ends the way its format ends (PNG IEND, JPEG EOI, GIF trailer, RIFF size).

    Decoding alone passes a file that lacks only its last bytes (a PNG without IEND decodes), so
    a file taken the moment its writer closes it must also end properly; formats without an end
    marker (TIFF) pass.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 16))
            tail = handle.read()
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return tail.endswith(PNG_END)
    if head.startswith(b"\xff\xd8"):
        return tail.rstrip(b"\x00").endswith(b"\xff\xd9")
    if head.startswith((b"GIF87a", b"GIF89a")):
        return tail.endswith(b";")
    if head.startswith(b"RIFF"):
        return size >= int.from_bytes(head[4:8], "little") + 8
    if head.startswith(b"BM"):
        return size >= int.from_bytes(head[2:6], "little")
    return True


def open_image_rgb(source: Path | IO[bytes], *, max_pixels: int) -> Image.Image:
    """Decode the first frame, upright (EXIF orientation), as RGB; ImageError with the reason if not."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice its limit; we refuse at our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"image too large: {width}x{height} = {width * height} pixels "
                        f"(limit {max_pixels}, JOYCAP_MAX_IMAGE_PIXELS)"
                    )
                image.seek(0)
                image.load()
                return to_rgb(upright(image))
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the file gets its reason
        raise ImageError(file_error_reason(exc)) from None


# EXIF orientation → the turn that shows the image upright (as ImageOps.exif_transpose maps it).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as stored when its EXIF cannot be read.

    Not ImageOps.exif_transpose: it also rewrites the EXIF block, and a malformed one makes that
    raise TypeError or struct.error for pixels that are fine. The model never sees the EXIF, and a
    camera's broken maker note should not cost the image its caption.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the orientation is unknown, not an error
        return image
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image


MAX_REASON = 300


def file_error_reason(exc: BaseException) -> str:
    """The one-line reason for a file that cannot be read as an image, whatever raised.

    The one place every path (submit, watch, dataset intake, the worker) turns a failure into a
    reason. Pillow says "bad file" with more than OSError: DecompressionBombError (an Exception)
    for a header claiming too many pixels, SyntaxError for a broken PNG chunk, ValueError for
    impossible dimensions, and TypeError, struct.error, EOFError and others from its parsers.
    """
    if isinstance(exc, ImageError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "file not found (moved or deleted after submit)"
    if isinstance(exc, PermissionError):
        return "permission denied reading the file"
    if isinstance(exc, IsADirectoryError):
        return "path is a directory, not an image"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(exc, Image.DecompressionBombError):
        return _one_line(f"image too large: {exc}")
    if isinstance(exc, MemoryError):
        return "image too large: out of memory decoding it"
    if isinstance(exc, OSError) and exc.errno is not None:
        # From the operating system (EIO, a stale NFS handle), not Pillow's "truncated" kind.
        return _one_line(f"cannot read file: {exc.strerror or exc}")
    detail = str(exc) or type(exc).__name__
    if not isinstance(exc, (OSError, SyntaxError, ValueError)):
        # Not how Pillow means to report a bad file: the type says more than the message.
        kind = type(exc)
        name = (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        )
        detail = f"{name}: {detail}"
    return _one_line(f"broken image: {detail}")


def _one_line(reason: str) -> str:
    first = first_line(reason)
    return first if len(first) <= MAX_REASON else first[: MAX_REASON - 1] + "…"


def check_allowed(path: Path, roots: list[str]) -> None:
    """ImageError unless the real path (symlinks and .. resolved) lies below one of ``roots``."""
    if not roots:
        return
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise ImageError("path is outside the allowed roots (JOYCAP_ALLOWED_ROOTS); not read")


def read_verified(path: Path, content_hash: str) -> bytes:
    """The file's bytes, provided they are still the bytes that were submitted."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(file_error_reason(exc)) from None
    if hashlib.sha256(data).hexdigest() != content_hash:
        raise ImageError("file changed after submit (content differs); submit it again")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on `ALPHA_BACKGROUND`; 16-bit and CMYK modes converted."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
