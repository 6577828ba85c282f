"""Hugging Face datasets built offline for the tests, and the service that reads them."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import datasets
from PIL import Image

from tests.support.services import Service


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", (48 + seed * 8, 40), (seed * 40 % 256, 90, 200 - seed * 20))
    image.putpixel((0, 0), (seed, seed, seed))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def build_dataset(rows: list[tuple[str, int, str | None]]) -> datasets.Dataset:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "im_name": datasets.Value("string"),
            "character": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": image_bytes(seed), "path": None} for _, seed, _ in rows],
            "im_name": [name for name, _, _ in rows],
            "character": [character for _, _, character in rows],
        },
        features=features,
    )


def dataset_service(service_for: Callable[[str], Service], database_url: str, tmp_path: Path) -> Service:
    service = service_for(database_url)
    # The parquet and imagefolder loaders write a cache; keep it out of the home folder.
    service.env["HF_DATASETS_CACHE"] = str(tmp_path / "hf-cache")
    return service
