"""The content-addressed image store: where dataset images become files a worker can read.

A dataset holds its images inside Arrow or Parquet files that a worker on another machine cannot
open by path, so `submit-dataset` writes each image once to ``STORE/ab/abcdef….png``, named by the
SHA-256 of its bytes, which is also the job's content hash. The same image in two rows, two
datasets or two submits is one file; a file is never rewritten, so a worker never reads half of one.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from joycap_queue.config import Settings
from joycap_queue.files import write_atomic
from joycap_queue.intake.images import ImageError, file_error_reason

# Pillow's format name → the extension discovery and the worker know. Other formats Pillow reads
# (AVIF, ICO, PPM, JPEG 2000 …) are stored as PNG, so every stored file is one the pipeline takes.
FORMAT_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tiff",
}


@dataclass(frozen=True)
class StoredImage:
    path: Path
    content_hash: str


def store_root(settings: Settings) -> Path:
    """JOYCAP_IMAGE_STORE, or ``images`` in the data dir."""
    return Path(settings.image_store or settings.data_dir / "images").expanduser().resolve()


def _format_of(data: bytes) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return str(image.format or "")
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the row gets its reason
        raise ImageError(file_error_reason(exc)) from None


def _as_png(data: bytes) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)
            out = io.BytesIO()
            image.save(out, "PNG")
            return out.getvalue()
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the row gets its reason
        raise ImageError(f"cannot convert image to PNG: {file_error_reason(exc)}") from None


def store_image(root: Path, data: bytes) -> StoredImage:
    """The stored file for these image bytes, written now unless it is already there.

    ImageError when the bytes are not an image Pillow can read.
    """
    extension = FORMAT_EXTENSIONS.get(_format_of(data))
    if extension is None:
        data, extension = _as_png(data), ".png"
    digest = hashlib.sha256(data).hexdigest()
    path = root / digest[:2] / f"{digest}{extension}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Two submitters storing one image at once both rename onto the same name: same bytes.
        write_atomic(path, data)
    return StoredImage(path, digest)
