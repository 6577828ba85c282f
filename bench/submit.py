"""Submitting a tree of 100,000 small images: files queued per second.

The tree is made here (PNG files of a few hundred bytes, 1,000 to a folder) and submitted with
`enqueue_images`, the path `joycap-queue submit` and the watcher use: discover, hash, read
each header, insert rows 500 at a time into SQLite, send their messages to a real Redis.
"""

from __future__ import annotations

import struct
import tempfile
import time
import zlib
from pathlib import Path

from bench.common import machine, print_table, record, stack
from joycap_queue.captions.prompts import CaptionOptions
from joycap_queue.intake.enqueue import CaptionRequest, enqueue_images

FILES = 100_000
TARGET = 5000.0
MODEL = "bench/submit-model"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_png(index: int, side: int = 8) -> bytes:
    """A valid, distinct ``side`` x ``side`` RGB PNG, written by hand: PIL would take 30x longer."""
    pixel = bytes((index & 255, (index >> 8) & 255, (index >> 16) & 255))
    raw = b"".join(b"\x00" + pixel * side for _ in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def make_tree(root: Path, count: int) -> None:
    for i in range(count):
        folder = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"{i:06d}.png").write_bytes(tiny_png(i))


def main(files: int = FILES) -> None:
    request = CaptionRequest(
        profile="beta-one", model=MODEL, options=CaptionOptions(), gen_params={"max_new_tokens": 256}
    )
    with tempfile.TemporaryDirectory(prefix="joycap-bench-tree-") as tmp, stack(MODEL) as running:
        started = time.perf_counter()
        make_tree(Path(tmp), files)
        made_s = time.perf_counter() - started
        started = time.perf_counter()
        summary = enqueue_images([tmp], request, running.settings())
        submit_s = time.perf_counter() - started
    if summary.queued != files:
        raise RuntimeError(f"queued {summary.queued} of {files}: {summary.rejections[:3]}")
    rate = files / submit_s
    print_table(
        f"Submit: {files:,} small PNG files into SQLite + Redis, {machine()['cores']} cores",
        ["step", "seconds", "files/s"],
        [
            ("make the tree (not counted)", made_s, files / made_s),
            (f"enqueue_images (target >= {TARGET:,.0f}/s)", submit_s, rate),
        ],
    )
    record(
        {
            "submit_files_per_s": round(rate, 1),
            "submit_detail": {
                "files": files,
                "seconds": round(submit_s, 3),
                "target_files_per_s": TARGET,
                "database": "sqlite",
                "machine": machine(),
            },
        }
    )


if __name__ == "__main__":
    main()
