"""Hugging Face datasets as a source: a `save_to_disk` folder, Parquet files, an image folder, a hub name.

`resolve_source` names a source without loading anything (the export filter needs only its key);
`load_split` loads it through the `datasets` library, imported only here and only when needed,
so the CLI starts without it. `iter_rows` reads a split in batches, images as raw bytes, never
decoded, so a 100,000-row dataset is read in bounded memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from joycap_queue.errors import JoycapError, OptionError, first_line
from joycap_queue.intake.images import ImageError, file_error_reason

DEFAULT_ID_COLUMN = "im_name"
DEFAULT_IMAGE_COLUMN = "image"
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from; ``key`` is how its rows are recorded in the database."""

    kind: str  # "disk" (save_to_disk), "parquet", "imagefolder" or "hub"
    location: str  # an absolute path, or the hub name

    @property
    def key(self) -> str:
        return f"hub:{self.location}" if self.kind == "hub" else self.location

    @property
    def base_dir(self) -> Path | None:
        """Where relative image paths in the dataset are read from."""
        if self.kind == "hub":
            return None
        path = Path(self.location)
        return path.parent if path.is_file() else path


def resolve_source(text: str) -> DatasetSource:
    """The source a SOURCE argument names; OptionError when it names nothing."""
    path = Path(text).expanduser()
    if path.exists():
        resolved = str(path.resolve())
        if path.is_file():
            if path.suffix.lower() != ".parquet":
                raise OptionError("source", f"{text}: a file source must be a .parquet file")
            return DatasetSource("parquet", resolved)
        if any((path / name).exists() for name in _SAVED_DATASET_FILES):
            return DatasetSource("disk", resolved)
        if next(path.rglob("*.parquet"), None) is not None:
            return DatasetSource("parquet", resolved)
        return DatasetSource("imagefolder", resolved)
    if _HUB_NAME.match(text) and not text.startswith((".", "/", "~")):
        return DatasetSource("hub", text)
    raise OptionError("source", f"no such file or folder: {text}")


def require_datasets() -> ModuleType:
    """The `datasets` library, or one line saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise JoycapError(
            "Hugging Face datasets are not installed: pip install 'joycap-queue[datasets]'"
        ) from None
    # This command draws its own progress bars.
    datasets.disable_progress_bars()
    return datasets


def load_splits(source: DatasetSource) -> dict[str, Any]:
    """Every split of the source: split name → `datasets.Dataset`."""
    datasets = require_datasets()
    loaded = load_source(source)
    if isinstance(loaded, datasets.Dataset):
        return {str(loaded.split or "train"): loaded}
    return {str(name): split for name, split in loaded.items()}


def load_source(source: DatasetSource) -> Any:
    """The source as `datasets` loads it: a `Dataset`, or a `DatasetDict` of splits."""
    datasets = require_datasets()
    try:
        if source.kind == "disk":
            loaded = datasets.load_from_disk(source.location)
        elif source.kind == "parquet":
            files = {"data_files": [source.location]} if Path(source.location).is_file() else {}
            loaded = datasets.load_dataset("parquet", data_dir=None if files else source.location, **files)
        elif source.kind == "imagefolder":
            loaded = datasets.load_dataset("imagefolder", data_dir=source.location)
        else:
            loaded = datasets.load_dataset(source.location)
    except JoycapError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the loader says, it is about the user's data
        where = "from the Hugging Face hub" if source.kind == "hub" else f"({source.kind})"
        reason = first_line(exc)
        raise JoycapError(f"cannot load dataset {source.location} {where}: {reason}") from None
    return loaded


def choose_split(splits: dict[str, Any], split: str | None) -> str:
    if split is not None:
        if split in splits:
            return split
        if len(splits) == 1:
            # A lone Dataset saved without a split name answers to whatever the user calls it.
            return next(iter(splits))
        raise OptionError("split", f"no split {split!r}; this dataset has: {', '.join(sorted(splits))}")
    if "train" in splits or len(splits) == 1:
        return "train" if "train" in splits else next(iter(splits))
    raise OptionError("split", f"choose a split with --split: {', '.join(sorted(splits))}")


def load_split(source: DatasetSource, split: str | None) -> tuple[str, Any]:
    """(split name, `datasets.Dataset`) for the split asked for, or the only or `train` split."""
    splits = load_splits(source)
    name = choose_split(splits, split)
    return name, splits[name]


@dataclass(frozen=True)
class RowColumns:
    image: str
    id: str | None  # None: the image's file name, else the row number
    name: str | None


def choose_columns(
    dataset: Any, *, image_column: str | None, id_column: str | None, name_column: str | None
) -> RowColumns:
    """The columns to read, checked against the dataset; OptionError lists the columns it has."""
    datasets = require_datasets()
    features = dataset.features
    available = ", ".join(features)
    if image_column is None:
        images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        image_column = images[0] if len(images) == 1 else DEFAULT_IMAGE_COLUMN
    for option, column in (
        ("image_column", image_column),
        ("id_column", id_column),
        ("name_column", name_column),
    ):
        if column is not None and column not in features:
            raise OptionError(option, f"no column {column!r}; the dataset has: {available}")
    if id_column is None and DEFAULT_ID_COLUMN in features:
        id_column = DEFAULT_ID_COLUMN
    return RowColumns(image_column, id_column, name_column)


@dataclass
class SourceRow:
    index: int
    key: str
    name: str | None
    image: Any
    base_dir: Path | None

    @property
    def label(self) -> str:
        return f"row {self.index} ({self.key})"

    def image_bytes(self) -> bytes:
        """The row's image file as it is, undecoded; ImageError with the reason if there is none."""
        value = self.image
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str) and value:
            path = Path(value)
            if not path.is_absolute():
                if self.base_dir is None:
                    raise ImageError(f"image path {value!r} is relative and the dataset has no folder")
                path = self.base_dir / path
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ImageError(f"{file_error_reason(exc)}: {path}") from None
        raise ImageError("the row has no image")


def _file_name(image: Any) -> str | None:
    path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
    return Path(path).name if path else None


def iter_rows(
    dataset: Any, columns: RowColumns, *, base_dir: Path | None, batch_size: int = 500
) -> Iterator[list[SourceRow]]:
    """The split's rows in order, in batches, with images as stored (bytes or a path), not decoded."""
    datasets = require_datasets()
    wanted = list(dict.fromkeys(c for c in (columns.image, columns.id, columns.name) if c))
    view = dataset.select_columns(wanted)
    if isinstance(view.features[columns.image], datasets.Image):
        view = view.cast_column(columns.image, datasets.Image(decode=False))
    index = 0
    for batch in view.iter(batch_size=batch_size):
        rows = []
        for position, image in enumerate(batch[columns.image]):
            key = batch[columns.id][position] if columns.id else None
            name = batch[columns.name][position] if columns.name else None
            name = str(name).strip() if name is not None else None
            fallback = _file_name(image) or str(index)
            rows.append(
                SourceRow(index, fallback if key is None else str(key), name or None, image, base_dir)
            )
            index += 1
        yield rows
