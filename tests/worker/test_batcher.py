"""Dynamic batching over the real tiny model: merging, isolation of failures, out-of-memory splits."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from worker.backends.base import Backend, CaptionInput, CaptionOutput, GenerationParams
from worker.backends.null import NULL_CAPTION, NullBackend
from worker.batcher import Batcher, is_out_of_memory
from worker.model.captioner import Captioner, PreparedImage

SYSTEM = "You are a helpful image captioner."
GREEDY = GenerationParams(greedy=True, max_new_tokens=8)


@pytest.fixture(scope="module")
def captioner(tiny_model: Path) -> Captioner:
    loaded = Captioner(str(tiny_model), device="cpu", dtype="float32")
    loaded.load()
    return loaded


def items(count: int) -> list[CaptionInput]:
    """Distinct images with prompts of different lengths, so a merged batch is left-padded."""
    return [
        CaptionInput(
            Image.new("RGB", (60 + 20 * i, 40 + 10 * i), (40 * i % 256, 90, 200 - 10 * i)),
            "Describe it." + " Mention the colours." * (i % 3),
            SYSTEM,
        )
        for i in range(count)
    ]


def alone(
    captioner: Captioner, batch: Sequence[CaptionInput], params: GenerationParams
) -> list[CaptionOutput]:
    return [captioner.caption([item], params)[0] for item in batch]


def run_together(
    batcher: Batcher, batch: Sequence[CaptionInput], params: Sequence[GenerationParams]
) -> list[Any]:
    """Every item from its own thread, all in flight at once, as the worker's task threads are."""
    with ThreadPoolExecutor(len(batch)) as pool:
        futures = [pool.submit(batcher.caption_one, item, p) for item, p in zip(batch, params, strict=True)]
        return [future.result(timeout=120) for future in futures]


def test_requests_in_flight_share_one_generate_call(captioner: Captioner) -> None:
    batch = items(4)
    batcher = Batcher(captioner, max_batch_size=4, wait_ms=5000).start()
    try:
        outputs = run_together(batcher, batch, [GREEDY] * 4)
    finally:
        batcher.close()
    assert batcher.batches_run == 1 and batcher.largest_batch == 4
    # Greedy decoding: a merged, left-padded batch gives each image what it gets alone.
    assert outputs == alone(captioner, batch, GREEDY)


def test_batches_never_exceed_the_batch_size(captioner: Captioner) -> None:
    batcher = Batcher(captioner, max_batch_size=2, wait_ms=5000).start()
    try:
        outputs = run_together(batcher, items(5), [GREEDY] * 5)
    finally:
        batcher.close()
    assert len(outputs) == 5
    assert batcher.largest_batch == 2 and batcher.batches_run == 3


def test_different_generation_parameters_never_share_a_batch(captioner: Captioner) -> None:
    short, longer = (
        GenerationParams(greedy=True, max_new_tokens=3),
        GenerationParams(greedy=True, max_new_tokens=9),
    )
    batch = items(4)
    params = [short, longer, short, longer]
    batcher = Batcher(captioner, max_batch_size=4, wait_ms=300).start()
    try:
        outputs = run_together(batcher, batch, params)
    finally:
        batcher.close()
    assert batcher.batches_run == 2
    assert [o.output_tokens <= p.max_new_tokens for o, p in zip(outputs, params, strict=True)] == [True] * 4
    assert outputs == [alone(captioner, [item], p)[0] for item, p in zip(batch, params, strict=True)]


def test_a_lone_request_runs_after_the_wait(captioner: Captioner) -> None:
    batcher = Batcher(captioner, max_batch_size=8, wait_ms=20).start()
    try:
        [item] = items(1)
        output = batcher.caption_one(item, GREEDY)
    finally:
        batcher.close()
    assert output == alone(captioner, [item], GREEDY)[0]
    assert batcher.batches_run == 1 and batcher.largest_batch == 1


def test_an_input_the_model_rejects_fails_alone(captioner: Captioner) -> None:
    batch = items(3)
    good = [captioner.prepare(item) for item in batch]
    # Pixels of the wrong shape: torch.stack refuses the whole batch, as a real engine error would.
    bad = PreparedImage(ids=good[0].ids, pixels=torch.zeros(3, 10, 10))
    batcher = Batcher(captioner, max_batch_size=4, wait_ms=5000)
    futures = [batcher.submit(p, GREEDY) for p in (good[0], bad, good[1], good[2])]
    try:
        results = [f.exception(timeout=120) or f.result() for f in futures]
    finally:
        batcher.close()
    assert isinstance(results[1], RuntimeError)
    assert [results[0], results[2], results[3]] == alone(captioner, batch, GREEDY)


class Workspace:
    def __init__(self, images: int) -> None:
        self.images = images


class MemoryLimited(Backend):
    """The real tiny model behind a memory budget of ``fits`` images per batch.

    A CPU has no GPU memory to run out of, so the limit is the only simulated part: a larger
    batch raises the exception class CUDA raises (``torch.OutOfMemoryError``), and every
    batch that fits runs on the real model. The real thing is tests/worker/test_gpus.py's gpu test.

    Like CUDA memory, what a failed attempt allocated counts against the budget for as long as
    anything (its frames, through a traceback) still holds it.
    """

    name = "memory-limited"

    def __init__(self, inner: Captioner, fits: int) -> None:
        self.inner, self.fits, self.model_id = inner, fits, inner.model_id
        self.refused: list[int] = []
        self.released = 0
        self._workspaces: list[weakref.ref[Workspace]] = []

    def _in_use(self) -> int:
        return sum(w.images for ref in self._workspaces if (w := ref()) is not None)

    def load(self) -> None:
        self.inner.load()

    def prepare(self, item: CaptionInput) -> PreparedImage:
        return self.inner.prepare(item)

    def generate(self, batch: Sequence[PreparedImage], params: GenerationParams) -> list[CaptionOutput]:
        workspace = Workspace(len(batch))  # a local: the frame holds it, as generate's do
        if len(batch) + self._in_use() > self.fits:
            self._workspaces.append(weakref.ref(workspace))
            self.refused.append(len(batch))
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(batch)} images")
        return self.inner.generate(batch, params)

    def release_memory(self) -> None:
        self.released += 1


def test_out_of_memory_splits_the_batch_and_remembers_the_size(captioner: Captioner) -> None:
    backend = MemoryLimited(captioner, fits=3)
    batch = items(8)
    batcher = Batcher(backend, max_batch_size=8, wait_ms=5000)
    try:
        futures = [batcher.submit(backend.prepare(item), GREEDY) for item in batch]
        outputs = [f.result(timeout=120) for f in futures]
        assert outputs == alone(captioner, batch, GREEDY)
        assert backend.refused == [8, 4] and backend.released == 2
        assert batcher.max_batch_size == 2
        # Remembered: the next full load goes out in batches that fit, without a new failure.
        again = [batcher.submit(backend.prepare(item), GREEDY) for item in batch[:6]]
        assert [f.result(timeout=120) for f in again] == outputs[:6]
        assert backend.refused == [8, 4]
    finally:
        batcher.close()


def test_out_of_memory_is_recognised_without_torch_names() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("the prompt holds 2 image tokens"))


def test_null_backend_through_the_batcher() -> None:
    batcher = Batcher(NullBackend("some/model"), max_batch_size=4, wait_ms=1000).start()
    try:
        outputs = run_together(batcher, items(4), [GREEDY] * 4)
    finally:
        batcher.close()
    assert [o.caption for o in outputs] == [NULL_CAPTION] * 4
    assert batcher.batches_run == 1
    assert batcher.model_id == "some/model"


def test_a_closed_batcher_refuses_new_requests() -> None:
    batcher = Batcher(NullBackend("m"), max_batch_size=2).start()
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(None, GREEDY)
    with pytest.raises(ValueError):
        Batcher(NullBackend("m"), max_batch_size=0)


def test_the_generate_thread_is_one_thread(captioner: Captioner) -> None:
    seen: set[int] = set()

    class Recording(MemoryLimited):
        def generate(self, batch: Sequence[PreparedImage], params: GenerationParams) -> list[CaptionOutput]:
            seen.add(threading.get_ident())
            return super().generate(batch, params)

    batcher = Batcher(Recording(captioner, fits=8), max_batch_size=2, wait_ms=10).start()
    try:
        run_together(batcher, items(6), [GREEDY] * 6)
    finally:
        batcher.close()
    assert len(seen) == 1 and threading.get_ident() not in seen
