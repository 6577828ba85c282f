"""Full-size JoyCaption on one GPU: the continuous engine against transformers' generate, side by side.

`python -m bench gpu` (one prepared script, about 5 minutes on an H100). No download: the
architecture is built from JoyCaption's config values with random weights (bench/model.py),
directly on the GPU, so the arithmetic, memory traffic and timing are the real model's. Every
arm captions the same images with the same prompt, and each image ends at its own length, drawn
once from 60-256 new tokens with a fixed seed (a forced end token at that step), as real captions
vary. The arms, in one run:

- ``--engine generate`` at batch 8 (the call upstream's batch script makes, what its users run);
- ``--engine generate`` at batch 128;
- the continuous engine at ``-b auto`` (slots from the KV arithmetic, CUDA graphs);
- vLLM at 128, when it is installed (it is not on the machines we could measure on);
- with ``JOYCAP_BENCH_GPU_QUANTIZED=1``, then ``--quantize 8bit`` and ``--quantize nf4``: the
  continuous engine at ``-b auto`` on the card the memory table (``worker/model/memory_table.py``)
  says each mode fits first (8bit: 16 GB, nf4: 12 GB), emulated with ``kv_memory_fraction``, 32
  images of 60-128 new tokens each; images/s, peak memory, and the weights and slots measured
  against the table's. About 3 more minutes (a 17 GB save and two quantized loads), so opt-in;
  ``JOYCAP_BENCH_GPU_QUANTIZED=only`` runs these rows alone.

Images are prepared (resized, tokenized) before each arm's clock starts, as the worker's task
threads do it beside the model.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, print_table, record
from bench.gpu_quantized import quantized_figures
from bench.gpu_setup import DEVICE, DRY_RUN, LENGTH_SEED, SHORTEST, TOKENS, free_memory, images, timed
from bench.model import build_random_joycaption, build_tokenizer, random_model
from worker.backends.base import GenerationParams

GENERATE_ARMS = ((8, 16), (128, 128))  # (batch size, images)
ENGINE_ROUNDS = 3  # images = rounds x slots, so the stream runs well past its ramp-up
VLLM_IMAGES = 128
TARGET_IMAGES_PER_S = {"H100": 20.0, "H200": 25.0}
TARGET_VS_GENERATE = 4.0
# JOYCAP_BENCH_GPU_DRY_RUN=1 (`gpu_setup.DRY_RUN`): the same script on the CPU with the small
# model and a few images, so a change to it is tried here before it spends a lent GPU's minutes.
# Records nothing.
if DRY_RUN:
    GENERATE_ARMS = ((2, 4), (4, 4))
    ENGINE_ROUNDS = 1
# "1": the quantized rows after the others (`bench.gpu_quantized`); "only": those rows alone (a
# short device check).
QUANTIZED = os.environ.get("JOYCAP_BENCH_GPU_QUANTIZED", "")


def bench_transformers(params: GenerationParams) -> list[dict[str, Any]]:
    import torch

    from worker.batcher import Batcher
    from worker.engine.continuous import ContinuousEngine
    from worker.model.captioner import Captioner

    captioner = Captioner("random-joycaption-full", device=DEVICE, dtype="bfloat16")
    if DRY_RUN:
        captioner.use_model(random_model("small", device="cpu", dtype=torch.float32), build_tokenizer())
    else:
        captioner.use_model(random_model("full"), build_tokenizer())
    rows = []
    for batch, count in GENERATE_ARMS:
        batcher = Batcher(captioner, max_batch_size=batch, wait_ms=0).start()
        timed(batcher, [captioner.prepare(i) for i in images(2, seed=99)], params)  # warm-up
        row = {
            "engine": "generate",
            "batch": batch,
            **timed(batcher, [captioner.prepare(i) for i in images(count)], params),
        }
        batcher.close()
        rows.append(row)
        print(row, flush=True)
        free_memory()
    started = time.monotonic()
    engine = ContinuousEngine(captioner, slots=4 if DRY_RUN else 0, max_new_tokens=TOKENS).start()
    warm_up_s = time.monotonic() - started
    timed(engine, [captioner.prepare(i) for i in images(4, seed=99)], params)
    prepared = [captioner.prepare(i) for i in images(engine.slots * ENGINE_ROUNDS)]
    row = {
        "engine": "continuous",
        "batch": f"auto ({engine.slots})",
        **timed(engine, prepared, params),
        "warm_up_s": round(warm_up_s, 1),
        "described": engine.describe(),
    }
    engine.close()
    rows.append(row)
    print(row, flush=True)
    del engine, captioner
    free_memory()
    return rows


def bench_vllm(params: GenerationParams, folder: Path) -> list[dict[str, Any]]:
    from worker.backends.vllm_engine import VllmBackend

    backend = VllmBackend(
        str(folder), dtype="bfloat16", max_batch_size=VLLM_IMAGES, engine_kwargs={"load_format": "dummy"}
    )
    backend.load()
    backend.caption(images(4), GenerationParams(greedy=True, max_new_tokens=8))  # warm-up
    batch = images(VLLM_IMAGES)
    started = time.perf_counter()
    outputs = backend.caption(batch, params)
    seconds = time.perf_counter() - started
    row = {
        "engine": "vllm",
        "batch": VLLM_IMAGES,
        "images": VLLM_IMAGES,
        "seconds": round(seconds, 2),
        "images_per_s": round(VLLM_IMAGES / seconds, 3),
        "output_tokens_per_s": round(sum(o.output_tokens for o in outputs) / seconds, 1),
        "peak_gib": None,
    }
    print(row, flush=True)
    return [row]


def main() -> None:
    import torch

    if not DRY_RUN and not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA GPU")
    if QUANTIZED not in ("", "0", "1", "only"):
        raise SystemExit(f"JOYCAP_BENCH_GPU_QUANTIZED={QUANTIZED!r}: use 1 or only")
    card = "dry run on the CPU" if DRY_RUN else torch.cuda.get_device_name(0)
    # Greedy: the vLLM arm and the others draw the same way; lengths are forced per image.
    params = GenerationParams(greedy=True, max_new_tokens=TOKENS)
    started = time.monotonic()
    figures: dict[str, Any] = {"gpu_card": card}
    if QUANTIZED != "only":
        figures.update(bench_bf16(params, card))
    if QUANTIZED in ("1", "only"):
        figures.update(quantized_figures(card))
    else:
        print("quantized rows skipped (JOYCAP_BENCH_GPU_QUANTIZED=1 adds them, =only runs them alone)")
    print(f"bench gpu: {time.monotonic() - started:.0f} s", flush=True)
    if not DRY_RUN:
        record(figures)


def bench_bf16(params: GenerationParams, card: str) -> dict[str, Any]:
    import torch
    import transformers

    started = time.monotonic()
    rows = bench_transformers(params)
    if importlib.util.find_spec("vllm") is not None and not DRY_RUN:
        with tempfile.TemporaryDirectory(prefix="joycap-bench-gpu-") as tmp:
            rows += bench_vllm(params, build_random_joycaption(Path(tmp) / "full"))
    else:
        print("vLLM is not installed (pip install 'joycap-queue[vllm]'): its row is unmeasured")
    print_table(
        f"Full-size JoyCaption (random weights), {card}, bf16, lengths {SHORTEST}-{TOKENS} per image",
        ["engine", "batch", "images", "images/s", "output tokens/s", "peak GiB"],
        [
            (
                r["engine"],
                r["batch"],
                r["images"],
                r["images_per_s"],
                r["output_tokens_per_s"],
                r["peak_gib"] or "",
            )
            for r in rows
        ],
    )
    by_engine = {(r["engine"], r["batch"]): r["images_per_s"] for r in rows}
    smallest = GENERATE_ARMS[0][0]
    engine_ips = next(r["images_per_s"] for r in rows if r["engine"] == "continuous")
    generate_best = max(v for (e, _), v in by_engine.items() if e == "generate")
    target = next((t for name, t in TARGET_IMAGES_PER_S.items() if name in card), None)
    print(
        f"continuous engine: {engine_ips:.2f} images/s (target {target or '?'}), "
        f"{engine_ips / generate_best:.2f}x the best generate arm (target >= {TARGET_VS_GENERATE}), "
        f"{engine_ips / by_engine[('generate', smallest)]:.1f}x generate at batch {smallest}"
    )
    return {
        "gpu_rows": rows,
        "gpu_engine_images_per_s": engine_ips,
        "gpu_engine_vs_generate": round(engine_ips / generate_best, 3),
        "gpu_engine_vs_generate_b8": round(engine_ips / by_engine[("generate", smallest)], 3),
        "gpu_detail": {
            "lengths": f"{SHORTEST}-{TOKENS} new tokens per image, seed {LENGTH_SEED}",
            "seconds": round(time.monotonic() - started, 1),
            "software": f"torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}",
            "vllm": "measured" if importlib.util.find_spec("vllm") else "unmeasured: not installed",
            "machine": machine(),
        },
    }


if __name__ == "__main__":
    main()
