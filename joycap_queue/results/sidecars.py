"""What a finished job leaves beside its image: `image.txt` / `image.json` sidecars, and moves.

`image.txt` is the convention of kohya's sd-scripts, ai-toolkit and upstream's batch script.
When one folder holds several images with one stem (`a.jpg`, `a.png`), each sidecar takes the
image's full name (`a.jpg.txt`, `a.png.txt`) so that no caption overwrites another.

Every write is atomic (a temporary file in the same folder, then a rename), so a trainer or a
second writer never reads half a caption.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import Engine
from sqlmodel import Session

from joycap_queue.errors import OptionError
from joycap_queue.files import write_atomic
from joycap_queue.intake.images import IMAGE_EXTENSIONS, hash_file
from joycap_queue.store import jobstate
from joycap_queue.store.models import Job, JobPublic, JobStatus

log = logging.getLogger(__name__)

SidecarMode = Literal["skip", "overwrite", "append", "prepend"]
SIDECAR_MODES: tuple[str, ...] = ("skip", "overwrite", "append", "prepend")
SIDECAR_KINDS: tuple[str, ...] = ("txt", "json")


@dataclass(frozen=True)
class OutputOptions:
    """Per-inbox (or per-submission) outputs; stored on each job as JSON."""

    txt: bool = False
    json: bool = False
    mode: str = "skip"
    inbox: str | None = None
    done_dir: str | None = None
    failed_dir: str | None = None
    # --skip-flagged-sidecars: no sidecar for a caption the quality guard flagged.
    skip_flagged: bool = False

    def __post_init__(self) -> None:
        if self.mode not in SIDECAR_MODES:
            raise OptionError(
                "sidecar_mode",
                f"unknown sidecar mode {self.mode!r}; choose one of: skip, overwrite, append, prepend",
            )

    @property
    def active(self) -> bool:
        return self.txt or self.json or bool(self.done_dir) or bool(self.failed_dir)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) if self.active else "{}"

    @classmethod
    def from_json(cls, text: str | None) -> OutputOptions:
        data = json.loads(text or "{}")
        return cls(**data) if data else cls()

    def for_caption(self, quality: str | None) -> OutputOptions:
        """These options for a caption of this quality: no sidecars for a flagged one if asked."""
        if self.skip_flagged and is_flagged(quality):
            # The image still moves to done/: it was captioned; only the caption is held back.
            return replace(self, txt=False, json=False)
        return self


def is_flagged(quality: str | None) -> bool:
    """Whether the quality guard flagged the caption (None: stored before the guard, never flagged)."""
    return quality is not None and quality != "ok"


def _has_stem_sibling(folder: Path, image: Path) -> bool:
    try:
        return any(
            entry.stem == image.stem and entry.name != image.name and entry.suffix.lower() in IMAGE_EXTENSIONS
            for entry in folder.iterdir()
        )
    except OSError:
        return False


def sidecar_path(image: Path, suffix: str, *, also_in: Path | None = None) -> Path:
    """`a.txt` beside `a.jpg`, or `a.jpg.txt` when another image there shares the stem.

    ``also_in`` is the folder an image was just moved out of: its twins still there count too.
    """
    folders = [image.parent, *([also_in] if also_in is not None else [])]
    return sidecar_named(image, suffix, full_name=any(_has_stem_sibling(folder, image) for folder in folders))


def sidecar_named(image: Path, suffix: str, *, full_name: bool) -> Path:
    """`a.txt` for `a.jpg`; `a.jpg.txt` with ``full_name`` (another image there shares the stem)."""
    return image.with_name(image.name + suffix) if full_name else image.with_suffix(suffix)


def _joined(first: str, second: str) -> str:
    # Upstream's append/prepend: the earlier text ends with ". " before the next one starts.
    first = first.strip()
    if not first:
        return second
    if not first.endswith("."):
        first += "."
    return f"{first} {second}"


def merge_caption(existing: str | None, caption: str, mode: str) -> str | None:
    """The new text of a `.txt` sidecar, or None to leave the existing file as it is.

    A sidecar that already holds the caption where the mode puts it is left alone: writing it
    again (a restarted watcher giving a copy its sidecar, a repeated export, a repair) must not
    add the caption a second time.
    """
    if existing is None:
        return caption
    if mode == "skip" or existing == caption:
        return None
    if mode == "overwrite":
        return caption
    if mode == "append":
        # What `_joined` leaves: the earlier text, ". ", the caption.
        return None if existing.endswith(". " + caption) else _joined(existing, caption)
    return None if existing.startswith(_joined(caption, "")) else _joined(caption, existing.strip())


def write_sidecars(
    image: Path, options: OutputOptions, *, caption: str, record: dict[str, Any], also_in: Path | None = None
) -> list[Path]:
    """Write the sidecars this job asks for; returns the files written."""
    written = []
    if options.txt:
        target = sidecar_path(image, ".txt", also_in=also_in)
        existing = target.read_bytes().decode("utf-8", errors="replace") if target.exists() else None
        text = merge_caption(existing, caption, options.mode)
        if text is not None:
            write_atomic(target, text)
            written.append(target)
    if options.json:
        target = sidecar_path(image, ".json", also_in=also_in)
        text = json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n"
        if not target.exists() or (options.mode != "skip" and target.read_bytes() != text.encode()):
            write_atomic(target, text)
            written.append(target)
    return written


def _relative_target(image: Path, inbox: str | None, tree: str) -> Path:
    base = Path(inbox) if inbox else image.parent
    try:
        relative = image.relative_to(base)
    except ValueError:
        relative = Path(image.name)
    return Path(tree) / relative


def already_moved(image: Path, inbox: str | None, tree: str | None) -> bool:
    """Whether the image is already where a move to ``tree`` puts images.

    A move is repeated by a second finisher of one job or by a repair of a dead worker's outputs;
    moving `done/album/a.png` again would nest it as `done/done/album/a.png`. A tree that holds
    the inbox (`--done-dir ~` for `~/inbox`) holds every image: there, only what lies outside
    the inbox has been moved.
    """
    if not tree:
        return False
    target = Path(tree)
    if not inbox:
        return image.parent == target
    if not image.is_relative_to(target):
        return False
    return target.is_relative_to(inbox) or not image.is_relative_to(inbox)


def _move(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # Never overwrite earlier work with a same-named newcomer: number the newcomer.
        for n in range(1, 10_000):
            candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
            if not candidate.exists():
                target = candidate
                break
    # A rename where it can be one; a copy and delete across file systems.
    shutil.move(str(source), str(target))
    return target


def finish_done(image: Path, options: OutputOptions, *, caption: str, record: dict[str, Any]) -> Path:
    """Sidecars for a captioned image, moved to the done tree first if asked; the image's new path.

    An image that is no longer where its row says was moved or deleted by someone else (or by a
    second finisher of the same job): no caption is written beside nothing.
    """
    if not image.exists():
        return image
    if not options.done_dir or already_moved(image, options.inbox, options.done_dir):
        write_sidecars(image, options, caption=caption, record=record)
        return image
    moved = _move(image, _relative_target(image, options.inbox, options.done_dir))
    write_sidecars(moved, options, caption=caption, record=record, also_in=image.parent)
    return moved


def finish_failed(image: Path, options: OutputOptions, *, reason: str) -> Path:
    """Move a failed image to the failed tree with `name.error.txt` giving the reason, if asked."""
    if not options.failed_dir or not image.exists():
        return image
    if already_moved(image, options.inbox, options.failed_dir):
        moved = image
    else:
        moved = _move(image, _relative_target(image, options.inbox, options.failed_dir))
    write_atomic(moved.with_name(moved.name + ".error.txt"), reason + "\n")
    return moved


def sidecar_record(job: JobPublic) -> dict[str, Any]:
    """What `image.json` holds: the caption with everything that produced it, and its timings."""
    seconds = None
    if job.started_at is not None and job.finished_at is not None:
        seconds = round((job.finished_at - job.started_at).total_seconds(), 3)
    return {
        "image": Path(job.path).name,
        "caption": job.caption,
        "prompt": job.prompt,
        "profile": job.profile,
        "caption_type": job.caption_type,
        "caption_length": job.caption_length,
        "extra_options": job.extra_option_list(),
        "name": job.name,
        "model": job.model,
        "quantize": job.quantize,
        "adapter": job.adapter or None,
        "adapter_hash": job.adapter_hash or None,
        "parameters": json.loads(job.gen_params or "{}"),
        "prepend": job.prepend,
        "append": job.append,
        "prompt_tokens": job.prompt_tokens,
        "output_tokens": job.output_tokens,
        "quality": job.quality,
        "caption_attempts": job.caption_attempts,
        "queued_at": job.queued_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "seconds": seconds,
        "worker": job.worker,
        "job_id": job.id,
        "content_hash": job.content_hash,
    }


def has_sidecar(image: Path, suffix: str) -> bool:
    """Whether the image has its `suffix` sidecar, under either name: one written while a twin of
    the same stem shared the folder (the folder it was moved out of, perhaps) has the full name."""
    return sidecar_named(image, suffix, full_name=True).exists() or sidecar_path(image, suffix).exists()


def _tree_for(status: str, options: OutputOptions) -> str | None:
    if status == JobStatus.done.value:
        return options.done_dir
    return options.failed_dir if status == JobStatus.failed.value else None


def _moved_copy(image: Path, options: OutputOptions, tree: str | None, content_hash: str) -> Path | None:
    """Where a move to ``tree`` put the image, when a finisher died after moving it and before
    recording its new path; None unless the file found there is this image (same content)."""
    if not tree or image.exists():
        return None
    target = _relative_target(image, options.inbox, tree)
    try:
        return target if hash_file(target)[0] == content_hash else None
    except OSError:
        return None


def outputs_missing(engine: Engine, job_id: int) -> bool:
    """Whether a finished job's outputs were never written: a sidecar it asks for is absent, its
    image still waits where a move would have taken it from, or its move went unrecorded.

    An image already in the done or failed tree has been moved: moving it again would nest it
    (`done/done/album/a.png`), so only its sidecars are looked at.
    """
    with Session(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            return False
        options = OutputOptions.from_json(job.outputs).for_caption(job.quality)
        image, status, content_hash = Path(job.path), job.status, job.content_hash
    tree = _tree_for(status, options)
    if _moved_copy(image, options, tree, content_hash) is not None:
        return True
    if not image.exists():
        return False
    if tree and not already_moved(image, options.inbox, tree):
        return True
    if status == JobStatus.done.value:
        return (options.txt and not has_sidecar(image, ".txt")) or (
            options.json and not has_sidecar(image, ".json")
        )
    return bool(tree) and not image.with_name(image.name + ".error.txt").exists()


def finish_job_outputs(engine: Engine, job_id: int) -> Path | None:
    """Write the sidecars or move the image, as the finished job asks; its image's path after.

    Called by the worker right after it stores the result, and by the repairs of a dead worker's
    outputs (`liveness.finish_outputs_of_dead`, the watcher's rescan), so the files follow the
    database. Calling it again changes nothing: an image already moved stays where it is, and
    a sidecar that holds its caption is not written twice.
    """
    with Session(engine) as session:
        row = session.get(Job, job_id)
        if row is None:
            return None
        job = JobPublic.model_validate(row)
    options = OutputOptions.from_json(job.outputs)
    image = Path(job.path)
    if not options.active:
        return image
    where = _moved_copy(image, options, _tree_for(job.status, options), job.content_hash) or image
    if job.status == JobStatus.done.value and job.caption is not None:
        kept = options.for_caption(job.quality)
        if kept is not options and (options.txt or options.json):
            log.info(
                "job %s: no sidecar for %s, its caption is flagged %s (--skip-flagged-sidecars)",
                job.id,
                image.name,
                job.quality,
            )
        moved = finish_done(where, kept, caption=job.caption, record=sidecar_record(job))
    elif job.status == JobStatus.failed.value:
        moved = finish_failed(where, options, reason=job.error or "failed")
    else:
        return image
    if moved != image:
        with Session(engine) as session:
            jobstate.set_job_path(session, job_id, str(moved))
            session.commit()
    return moved
