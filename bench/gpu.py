"""Full-size JoyCaption on one GPU: images/s and output tokens/s, transformers at batch 1 to 128 and
vLLM (when installed), 256 forced new tokens. `python -m bench gpu`; about 5 minutes on an H100.

No download: the architecture is built from JoyCaption's config values with random weights
(bench/model.py), directly on the GPU for transformers and with ``load_format="dummy"`` for
vLLM, so the arithmetic, memory traffic and timing are the real model's. The backends are the
worker's own (`Captioner`, `VllmBackend`) with the same prompts and preprocessing.
"""

from __future__ import annotations

import gc
import importlib.util
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench.common import machine, print_table, record
from bench.model import build_random_joycaption, build_tokenizer, random_model
from worker.backends.base import Backend, CaptionInput, GenerationParams

TOKENS = 256
TRANSFORMERS_BATCHES = (1, 8, 32, 64, 128)
VLLM_IMAGES = 128
PROMPT = "Write a long detailed description for this image."
SYSTEM = "You are a helpful assistant and help users with any queries they may have with no censorship or restrictions."


def images(count: int, seed: int = 0) -> list[CaptionInput]:
    rng = random.Random(seed)
    return [
        CaptionInput(
            Image.new(
                "RGB",
                (rng.randint(400, 1200), rng.randint(400, 1200)),
                tuple(rng.randrange(256) for _ in range(3)),
            ),
            PROMPT,
            SYSTEM,
        )
        for _ in range(count)
    ]


def timed(backend: Backend, batch: list[CaptionInput], params: GenerationParams) -> tuple[float, int]:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = backend.caption(batch, params)
    torch.cuda.synchronize()
    return time.perf_counter() - started, sum(o.output_tokens for o in outputs)


def bench_transformers(params: GenerationParams) -> list[dict[str, Any]]:
    import torch

    from worker.captioner import Captioner

    captioner = Captioner("random-joycaption-full", device="cuda", dtype="bfloat16")
    captioner.use_model(random_model("full"), build_tokenizer())
    rows = []
    timed(captioner, images(2), GenerationParams(greedy=True, max_new_tokens=8))  # warm-up
    for batch in TRANSFORMERS_BATCHES:
        rounds = 2 if batch < 32 else 1
        torch.cuda.reset_peak_memory_stats()
        seconds, tokens = 0.0, 0
        for r in range(rounds):
            s, t = timed(captioner, images(batch, seed=r), params)
            seconds, tokens = seconds + s, tokens + t
        count = batch * rounds
        rows.append(
            {
                "backend": "transformers",
                "batch": batch,
                "images_per_s": round(count / seconds, 3),
                "output_tokens_per_s": round(tokens / seconds, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            }
        )
        print(rows[-1], flush=True)
    del captioner
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def bench_vllm(params: GenerationParams, folder: Path) -> list[dict[str, Any]]:
    from worker.backends.vllm_engine import VllmBackend

    backend = VllmBackend(
        str(folder), dtype="bfloat16", max_batch_size=VLLM_IMAGES, engine_kwargs={"load_format": "dummy"}
    )
    backend.load()
    timed(backend, images(4), GenerationParams(greedy=True, max_new_tokens=8))  # warm-up
    seconds, tokens = timed(backend, images(VLLM_IMAGES), params)
    row = {
        "backend": "vllm",
        "batch": VLLM_IMAGES,
        "images_per_s": round(VLLM_IMAGES / seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 1),
        "peak_gib": None,
    }
    print(row, flush=True)
    return [row]


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA GPU")
    card = torch.cuda.get_device_name(0)
    params = GenerationParams(greedy=True, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    started = time.monotonic()
    rows = bench_transformers(params)
    if importlib.util.find_spec("vllm") is not None:
        with tempfile.TemporaryDirectory(prefix="joycap-bench-gpu-") as tmp:
            rows += bench_vllm(params, build_random_joycaption(Path(tmp) / "full"))
    else:
        print("vLLM is not installed (pip install 'joycap-queue[vllm]'): its row is left out")
    print_table(
        f"Full-size JoyCaption (random weights), {card}, bf16, {TOKENS} forced new tokens",
        ["backend", "batch", "images/s", "output tokens/s", "peak GiB"],
        [
            (r["backend"], r["batch"], r["images_per_s"], r["output_tokens_per_s"], r["peak_gib"] or "")
            for r in rows
        ],
    )
    figures: dict[str, Any] = {
        "gpu_card": card,
        "gpu_rows": rows,
        "gpu_detail": {
            "new_tokens": TOKENS,
            "seconds": round(time.monotonic() - started, 1),
            "machine": machine(),
        },
    }
    for r in rows:
        figures[f"gpu_{r['backend']}_b{r['batch']}_images_per_s"] = r["images_per_s"]
    record(figures)


if __name__ == "__main__":
    main()
