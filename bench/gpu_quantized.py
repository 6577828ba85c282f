"""`bench gpu`'s quantized rows: the continuous engine with ``--quantize 8bit`` and ``nf4`` at
``-b auto`` on the card the memory table says each mode fits first, emulated on the big one
(``JOYCAP_BENCH_GPU_QUANTIZED=1``; see `bench.gpu`)."""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import print_table
from bench.gpu_setup import DEVICE, DRY_RUN, LENGTH_SEED, SHORTEST, free_memory, images, timed
from bench.model import build_random_joycaption, random_model
from joycap_queue.errors import first_line
from worker.backends.base import GenerationParams
from worker.model import memory_table, sizes

QUANTIZED_MODES = ("8bit", "nf4")
QUANTIZED_IMAGES = 4 if DRY_RUN else 32
QUANTIZED_TOKENS = 128
# The smallest card of the memory table each mode fits with slots to spare, emulated on the big
# card: the engine's fraction of its memory is set so that -b auto has what it would have there.
EMULATED_CARD_GIB = {"8bit": 16, "nf4": 12}


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
    free_memory()
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
    converted = sizes.quantized_modules(captioner.model)
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
        "weights_gib_predicted": round(sizes.weights_gib(mode, config), 2),
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
    free_memory()
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
                free_memory()
    return rows


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
