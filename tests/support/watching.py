"""Watchers for the tests: a FolderWatcher run in a thread, and what the tests ask of the database."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from sqlmodel import Session, select

from joycap_queue.captions.request import RequestOptions
from joycap_queue.intake.images import hash_file
from joycap_queue.intake.watch.config import inbox_config
from joycap_queue.intake.watch.watcher import FolderWatcher
from joycap_queue.results.sidecars import sidecar_path
from joycap_queue.store import engines
from joycap_queue.store.models import Job, Submission
from tests.support.services import Service, wait_until

SETTLE = 1.0


def png_bytes(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    image = Image.effect_noise(size, 40 + seed % 50).convert("RGB")
    image.putpixel((0, 0), (seed % 256, seed // 256 % 256, 7))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class RunningWatcher:
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.watcher.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self.watcher.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error

    def alive(self) -> bool:
        """True while it watches; what killed it, raised, once it died."""
        if self.error is not None:
            raise self.error
        return self.thread.is_alive()

    def verdict(self, path: Path) -> str:
        return self.watcher.states[0].verdict(path)

    def wait_for_rescan(self) -> None:
        """Wait until a rescan that began after this call has completed.

        A completed rescan has observed every file present when it began (`FolderWatcher.rescan`),
        so a file it left alone was looked at and refused: what a sleep of "long enough" only
        hopes, and on a slow machine passes even when the watcher is broken.
        """
        target = self.watcher.rescans + 2  # the next one may have begun before this call
        wait_until(lambda: self.alive() and self.watcher.rescans >= target, timeout=30, what="a rescan")


@contextmanager
def watchers() -> Iterator[Callable[..., RunningWatcher]]:
    """A function that starts watchers in threads; those still running are stopped on leaving."""
    running: list[RunningWatcher] = []

    def start(
        service: Service,
        inbox: Path,
        *,
        polling: bool = False,
        incomplete_after: float = 600,
        sidecar_grace: float = 60,
        max_image_pixels: int | None = None,
        **params: object,
    ) -> RunningWatcher:
        settings = service.settings()
        if max_image_pixels is not None:
            settings = settings.model_copy(update={"max_image_pixels": max_image_pixels})
        defaults: dict[str, object] = {"caption_type": "Descriptive", "length": "short", "sidecar": ("txt",)}
        config = inbox_config(inbox, settings, RequestOptions.from_params({**defaults, **params}))
        watcher = FolderWatcher(
            [config],
            settings,
            settle_seconds=SETTLE,
            rescan_seconds=2,
            polling=polling,
            incomplete_after=incomplete_after,
            sidecar_grace=sidecar_grace,
        )
        handle = RunningWatcher(watcher)
        handle.thread.start()
        wait_until(
            lambda: watcher.observer is not None or handle.error is not None, timeout=20, what="watcher"
        )
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if handle.thread.is_alive():
            handle.stop()


def jobs(database_url: str) -> list[Job]:
    with Session(engines.get_engine(database_url)) as session:
        return list(session.exec(select(Job).order_by(Job.id)))


def sent_messages(database_url: str) -> int:
    """How many caption messages intake sent: the sum of every submission's queued count."""
    with Session(engines.get_engine(database_url)) as session:
        return sum(s.queued for s in session.exec(select(Submission)))


def assert_captioned_once(database_url: str, images: list[Path], *, sidecars: bool = True) -> None:
    if sidecars:
        # The worker writes them right after it stores the caption, so a done row comes first.
        wait_until(lambda: all(sidecar_path(p, ".txt").exists() for p in images), timeout=30, what="sidecars")
    rows = jobs(database_url)
    by_path: dict[str, list[Job]] = {}
    for job in rows:
        by_path.setdefault(job.path, []).append(job)
    assert sorted(by_path) == sorted(str(p) for p in images)
    for image in images:
        assert len(by_path[str(image)]) == 1, f"{image} has {len(by_path[str(image)])} jobs"
        [job] = by_path[str(image)]
        assert job.status == "done", (image, job.error)
        assert job.content_hash == hash_file(image)[0], f"{image} was queued before it was complete"
        if sidecars:
            # Bytes, not read_text: universal newlines would turn a caption's \r into \n.
            assert sidecar_path(image, ".txt").read_bytes().decode("utf-8") == job.caption
    assert sent_messages(database_url) == len(images)


def all_done(database_url: str, count: int) -> Callable[[], bool]:
    def check() -> bool:
        rows = jobs(database_url)
        return len(rows) >= count and all(job.status in ("done", "failed") for job in rows)

    return check
