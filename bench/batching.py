"""Dynamic batching on the tiny model, on the CPU: images/s through the queue against a plain loop.

The plain loop is upstream's batch script in spirit: one process, the same model, the images
decoded and captioned ``batch`` at a time. The queue path is `joycap-queue worker -b N` fed by
`enqueue_images`, timed from the first file submitted to the last row done. Both generate
exactly ``TOKENS`` new tokens per image (greedy, forced length), so a batch is the same work
however the worker happened to group it; the tiny model's random weights would otherwise
stop at random places.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

from bench.common import machine, make_images, print_table, record, stack
from joycap_queue.captions.prompts import CaptionOptions, system_prompt
from joycap_queue.intake.enqueue import CaptionRequest, enqueue_images
from joycap_queue.intake.images import open_image_rgb
from worker.backends.base import CaptionInput, GenerationParams
from worker.model.captioner import Captioner
from worker.model.tiny import build_tiny_model

# Enough for 8 full batches at 16: the first batch waits for its images to be claimed and decoded,
# a one-off ramp that a short run would overweight.
IMAGES = 128
TOKENS = 256
BATCH_SIZES = (1, 4, 8, 16)
# Both sides use the worker's default: every core but one for torch (see `joycap-queue worker`).
# With every core, a loop on this shared 2-core machine swung 5x from run to run: one busy core
# stalls torch's other thread at every barrier.
THREADS = max(1, (os.cpu_count() or 2) - 1)
# Best of this many runs per figure, on both sides alike: neighbours on the machine only slow runs.
RUNS = 3


def loop_images_per_s(captioner: Captioner, paths: list[Path], request: CaptionRequest, batch: int) -> float:
    params = GenerationParams(**request.gen_params)
    prompt, system = request.prompt_for(""), system_prompt(request.profile)
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        images = [
            open_image_rgb(io.BytesIO(p.read_bytes()), max_pixels=1 << 28)
            for p in paths[start : start + batch]
        ]
        captioner.caption([CaptionInput(image, prompt, system) for image in images], params)
    return len(paths) / (time.perf_counter() - started)


def queue_images_per_s(running: object, folder: Path, request: CaptionRequest, batch: int) -> float:
    from bench.common import Stack

    assert isinstance(running, Stack)
    running.fresh_queue()
    running.start_worker("--batch-size", str(batch))
    started = time.monotonic()
    summary = enqueue_images([folder], request, running.settings())
    ended = running.wait_finished(IMAGES, timeout=900)
    if summary.queued != IMAGES or running.failed():
        raise RuntimeError(f"queued {summary.queued}; failed: {running.failed()[:3]}")
    running.stop_workers()
    return IMAGES / (ended - started)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="joycap-bench-batching-") as tmp:
        root = Path(tmp)
        model = str(build_tiny_model(root / "tiny"))
        paths = make_images(root / "images", IMAGES, size=(512, 384), fmt="JPEG")
        request = CaptionRequest(
            profile="beta-one",
            model=model,
            options=CaptionOptions(),
            gen_params={"greedy": True, "max_new_tokens": TOKENS, "min_new_tokens": TOKENS},
        )
        captioner = Captioner(model, device="cpu", dtype="float32", torch_threads=THREADS)
        captioner.load()
        loop_images_per_s(captioner, paths[:4], request, 4)  # warm-up: first calls allocate
        rows = []
        with stack(model) as running:
            for batch in BATCH_SIZES:
                loops, queues = [], []
                for _ in range(RUNS):  # alternating, so both sides meet the same neighbours
                    loops.append(loop_images_per_s(captioner, paths, request, batch))
                    queues.append(queue_images_per_s(running, root / "images", request, batch))
                loop, queued = max(loops), max(queues)
                rows.append((batch, loop, queued, queued / loop))
    by_batch = {batch: (loop, queued, ratio) for batch, loop, queued, ratio in rows}
    speedup = by_batch[8][1] / by_batch[1][1]
    print_table(
        f"Tiny model on the CPU ({THREADS} torch thread(s)), {IMAGES} images, {TOKENS} forced new tokens, "
        f"images/s, best of {RUNS}",
        ["batch", "plain loop", "queue", "queue/loop"],
        [(b, loop, queued, f"{ratio:.2f}") for b, loop, queued, ratio in rows],
    )
    print(
        f"batch 8 vs batch 1 through the queue: {speedup:.2f}x (target >= 3x); queue/loop at 8: {by_batch[8][2]:.2f} (target >= 0.9)"
    )
    record(
        {
            "batching_speedup_b8_vs_b1": round(speedup, 3),
            "queue_vs_loop_ratio_b8": round(by_batch[8][2], 3),
            "batching_detail": {
                "images": IMAGES,
                "new_tokens": TOKENS,
                "torch_threads": THREADS,
                "best_of": RUNS,
                "images_per_s": {
                    str(b): {"loop": round(loop, 2), "queue": round(queued, 2), "ratio": round(ratio, 3)}
                    for b, loop, queued, ratio in rows
                },
                "loop_speedup_b8_vs_b1": round(by_batch[8][0] / by_batch[1][0], 3),
                "machine": machine(),
            },
        }
    )


if __name__ == "__main__":
    main()
