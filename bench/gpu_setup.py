"""What every arm of `bench gpu` shares: the run (on the GPU, or a dry run on the CPU), the images
with their forced lengths, and the clock."""

from __future__ import annotations

import gc
import os
import random
import time
from typing import Any

from PIL import Image

from worker.backends.base import CaptionInput, GenerationParams

TOKENS = 256
SHORTEST = 60
LENGTH_SEED = 20261201
# JOYCAP_BENCH_GPU_DRY_RUN=1: the same script on the CPU with the small model and a few images.
DRY_RUN = os.environ.get("JOYCAP_BENCH_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
PROMPT = "Write a long detailed description for this image."
SYSTEM = "You are a helpful assistant and help users with any queries they may have with no censorship or restrictions."


def images(count: int, seed: int = 0, longest: int = TOKENS) -> list[CaptionInput]:
    rng = random.Random(seed)
    lengths = random.Random(LENGTH_SEED + seed)
    return [
        CaptionInput(
            Image.new(
                "RGB",
                (rng.randint(400, 1200), rng.randint(400, 1200)),
                tuple(rng.randrange(256) for _ in range(3)),
            ),
            PROMPT,
            SYSTEM,
            forced_length=lengths.randint(SHORTEST, longest),
        )
        for _ in range(count)
    ]


def _sync() -> None:
    import torch

    if not DRY_RUN:
        torch.cuda.synchronize()


def timed(service: Any, prepared: list[Any], params: GenerationParams) -> dict[str, Any]:
    """Seconds for every prepared image through ``service.submit`` (a Batcher or the engine)."""
    import torch

    _sync()
    if not DRY_RUN:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    outputs = [future.result() for future in [service.submit(item, params) for item in prepared]]
    _sync()
    seconds = time.perf_counter() - started
    if [o.output_tokens for o in outputs] != [item.forced_length for item in prepared]:
        raise RuntimeError("a caption did not end at its forced length")
    tokens = sum(o.output_tokens for o in outputs)
    return {
        "images": len(prepared),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(prepared) / seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "peak_gib": 0.0 if DRY_RUN else round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }


def free_memory() -> None:
    import torch

    gc.collect()
    if not DRY_RUN:
        torch.cuda.empty_cache()
