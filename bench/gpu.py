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

import gc
import importlib.metadata
import importlib.util
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench.common import machine, print_table, record
from bench.model import build_random_joycaption, build_tokenizer, random_model
from joycap_queue.errors import first_line
from worker.backends.base import CaptionInput, GenerationParams
from worker.model import memory_table

TOKENS = 256
SHORTEST = 60
LENGTH_SEED = 20261201
GENERATE_ARMS = ((8, 16), (128, 128))  # (batch size, images)
ENGINE_ROUNDS = 3  # images = rounds x slots, so the stream runs well past its ramp-up
VLLM_IMAGES = 128
TARGET_IMAGES_PER_S = {"H100": 20.0, "H200": 25.0}
TARGET_VS_GENERATE = 4.0
# JOYCAP_BENCH_GPU_DRY_RUN=1: the same script on the CPU with the small model and a few images,
# so a change to it is tried here before it spends a lent GPU's minutes. Records nothing.
DRY_RUN = os.environ.get("JOYCAP_BENCH_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
# "1": the quantized rows after the others; "only": those rows alone (a short device check).
QUANTIZED = os.environ.get("JOYCAP_BENCH_GPU_QUANTIZED", "")
QUANTIZED_MODES = ("8bit", "nf4")
QUANTIZED_IMAGES = 32
QUANTIZED_TOKENS = 128
# The smallest card of the memory table each mode fits with slots to spare, emulated on the big
# card: the engine's fraction of its memory is set so that -b auto has what it would have there.
EMULATED_CARD_GIB = {"8bit": 16, "nf4": 12}
if DRY_RUN:
    GENERATE_ARMS = ((2, 4), (4, 4))
    ENGINE_ROUNDS = 1
    QUANTIZED_IMAGES = 4
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


def _free_memory() -> None:
    import torch

    gc.collect()
    if not DRY_RUN:
        torch.cuda.empty_cache()


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
        _free_memory()
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
    _free_memory()
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


def quantized_folder(root: Path) -> Path:
    """A checkpoint folder of random weights for ``Captioner(folder, quantize=...)`` to load.

    bitsandbytes quantizes while transformers loads a checkpoint, so the random model is written
    out once (17 GB in bf16 on the GPU machine; the small model in the dry run) and each mode
    loads it through the worker's own path. Quantizing the module tree in memory instead would
    lean on transformers' internal bitsandbytes helpers, which changed in every 5.x release, and
    would not test the path ``--quantize`` takes.
    """
    import torch

    if DRY_RUN:
        return build_random_joycaption(root / "small", size="small")
    started = time.monotonic()
    model = random_model("full", dtype=torch.bfloat16)
    model.save_pretrained(root / "full")
    del model
    _free_memory()
    build_random_joycaption(root / "full", size="full", with_weights=False)  # tokenizer, configs
    print(f"random full-size checkpoint written in {time.monotonic() - started:.0f} s", flush=True)
    return root / "full"


def load_quantized(folder: Path, mode: str) -> tuple[Any, str]:
    """The captioner for ``mode``, through the worker's own ``--quantize`` path."""
    from worker.model.captioner import Captioner

    captioner = Captioner(str(folder), device=DEVICE, dtype="bfloat16", quantize=mode)
    captioner.load()
    return captioner, f"Captioner(quantize={mode!r})"


def _allocated() -> int:
    """Bytes of live tensors on the GPU (0 in the dry run)."""
    import torch

    return 0 if DRY_RUN else int(torch.cuda.memory_allocated())


def quantized_row(folder: Path, mode: str, params: GenerationParams) -> dict[str, Any]:
    import torch

    from worker.engine.continuous import ContinuousEngine

    gib = 2**30
    card = EMULATED_CARD_GIB[mode]
    fraction = memory_table.DEFAULT_FRACTION
    before = _allocated()
    if not DRY_RUN:
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()  # the CUDA context and the driver's
        # Of this card, the share a fresh `card` GiB one gives -b auto at the default fraction.
        fraction = min(1.0, memory_table.DEFAULT_FRACTION * card * gib / total)
    started = time.monotonic()
    captioner, loader = load_quantized(folder, mode)
    load_s = time.monotonic() - started
    weights = _allocated() - before
    config = captioner.model.config.to_dict()  # the table's arithmetic on this very model
    converted = memory_table.quantized_modules(captioner.model)
    outside = [name for name in converted if ".language_model.layers." not in name]
    engine = ContinuousEngine(
        captioner, slots=4 if DRY_RUN else 0, kv_memory_fraction=fraction, max_new_tokens=QUANTIZED_TOKENS
    ).start()
    start_peak = 0.0 if DRY_RUN else torch.cuda.max_memory_reserved() / gib
    timed(engine, [captioner.prepare(i) for i in images(2, seed=99, longest=QUANTIZED_TOKENS)], params)
    prepared = [captioner.prepare(i) for i in images(QUANTIZED_IMAGES, longest=QUANTIZED_TOKENS)]
    measured = timed(engine, prepared, params)
    run_peak = 0.0 if DRY_RUN else torch.cuda.max_memory_reserved() / gib
    row: dict[str, Any] = {
        "engine": "continuous",
        "quantize": mode,
        "batch": f"auto ({engine.slots})",
        **measured,
        "card_gib": card,
        "kv_memory_fraction": round(fraction, 4),
        "slots_predicted": memory_table.slots_on_card(
            card, mode, config=config, max_new_tokens=QUANTIZED_TOKENS
        ),
        "weights_gib_predicted": round(memory_table.weights_gib(mode, config), 2),
        "weights_gib_measured": round(weights / gib, 2),
        # Parameters and buffers as stored, without bitsandbytes' scales (the dry run's figure).
        "footprint_gib": round(captioner.model.get_memory_footprint() / gib, 3),
        "load_s": round(load_s, 1),
        "loader": loader,
        "quantized_linears": len(converted),
        "quantized_outside_language_model": len(outside),
        "described": engine.describe(),
    }
    if not DRY_RUN:
        # What a card of `card` GiB would have needed: the context plus the allocator's peak.
        row["context_gib_measured"] = round(context / gib, 2)
        row["card_peak_gib"] = round(context / gib + max(start_peak, run_peak), 2)
        row["fits_card"] = row["card_peak_gib"] <= card
    engine.close()
    del engine, captioner
    _free_memory()
    print(row, flush=True)
    return row


def bench_quantized() -> list[dict[str, Any]]:
    """The continuous engine with ``--quantize 8bit`` and ``nf4``; a failed mode is a row with its error."""
    if DRY_RUN:
        print("(dry run: bitsandbytes on the CPU with the small model)", flush=True)
    # LLM.int8 logs a warning on every bf16 matmul (224 a decode step): thousands of lines a row.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    params = GenerationParams(greedy=True, max_new_tokens=QUANTIZED_TOKENS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="joycap-bench-gpu-quantized-") as tmp:
        folder = quantized_folder(Path(tmp))
        for mode in QUANTIZED_MODES:
            try:
                rows.append(quantized_row(folder, mode, params))
            except Exception as exc:  # noqa: BLE001 - the other rows still count
                error = f"{type(exc).__name__}: {first_line(exc)}"
                row = {"engine": "continuous", "quantize": mode, "error": error}
                print(row, flush=True)
                rows.append(row)
                _free_memory()
    return rows


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


def quantized_figures(card: str) -> dict[str, Any]:
    import torch
    import transformers

    started = time.monotonic()
    rows = bench_quantized()
    done = [r for r in rows if "error" not in r]
    print_table(
        f"Full-size JoyCaption (random weights), {card}, quantized, continuous engine at -b auto on an "
        f"emulated card, lengths {SHORTEST}-{QUANTIZED_TOKENS} per image",
        [
            "quantize",
            "card GiB",
            "slots (table)",
            "images",
            "images/s",
            "weights GiB (table)",
            "card peak GiB",
        ],
        [
            (
                r["quantize"],
                r["card_gib"],
                f"{r['batch']} ({r['slots_predicted']})",
                r["images"],
                r["images_per_s"],
                f"{r['weights_gib_measured']} ({r['weights_gib_predicted']})",
                r.get("card_peak_gib", ""),
            )
            for r in done
        ],
    )
    for r in rows:
        if "error" in r:
            print(f"--quantize {r['quantize']} failed: {r['error']}")
    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = "not installed"
    return {
        "gpu_quantized": rows,
        "gpu_quantized_images_per_s": {r["quantize"]: r["images_per_s"] for r in done},
        "gpu_quantized_detail": {
            "arm": "continuous engine, -b auto with kv_memory_fraction set to what the card_gib card "
            "would give at 0.9; images_per_s over the run, peak from torch.cuda.max_memory_reserved",
            "lengths": f"{SHORTEST}-{QUANTIZED_TOKENS} new tokens per image, seed {LENGTH_SEED}",
            "seconds": round(time.monotonic() - started, 1),
            "software": f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"bitsandbytes {bnb}, CUDA {torch.version.cuda}",
        },
    }


if __name__ == "__main__":
    main()
