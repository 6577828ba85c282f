"""The continuous engine against ``--engine generate``, side by side, on the tiny model on the CPU.

128 images, at most 16 in flight on both arms. Each image ends at its own length, drawn once
from 60-256 new tokens with a fixed seed (a forced end token at that step, the same in both
arms), as real captions vary; a second pair of runs forces every length to 256. The generate arm
is the worker's batcher over transformers' ``generate`` (batches of 16, each until its longest
caption ends); the engine arm streams the same prepared images through 16 slots. Images are
prepared before the clock starts on both arms: this measures the engines, not the decoding.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import machine, make_images, print_table, record
from joycap_queue.captions.prompts import CaptionOptions, build_prompt, system_prompt
from joycap_queue.intake.images import open_image_rgb
from worker.backends.base import CaptionInput, GenerationParams
from worker.batcher import Batcher
from worker.engine.continuous import ContinuousEngine
from worker.model.captioner import Captioner, PreparedImage
from worker.model.tiny import build_tiny_model

IMAGES = 128
IN_FLIGHT = 16
SHORTEST, LONGEST = 60, 256
SEED = 20261201
RUNS = 3  # best of, alternating arms, so both meet the same neighbours on this shared machine
TARGET_VARIED, TARGET_FORCED = 1.8, 1.25
PARAMS = GenerationParams(greedy=True, max_new_tokens=LONGEST)


def prepared_images(
    captioner: Captioner, paths: Sequence[Path], lengths: Sequence[int]
) -> list[PreparedImage]:
    prompt = build_prompt("beta-one", CaptionOptions())
    system = system_prompt("beta-one")
    return [
        captioner.prepare(
            CaptionInput(open_image_rgb(path, max_pixels=1 << 28), prompt, system, forced_length=length)
        )
        for path, length in zip(paths, lengths, strict=True)
    ]


def images_per_s(service: Batcher | ContinuousEngine, items: Sequence[PreparedImage]) -> float:
    started = time.perf_counter()
    futures = [service.submit(item, PARAMS) for item in items]
    outputs = [future.result() for future in futures]
    elapsed = time.perf_counter() - started
    expected = [item.forced_length for item in items]
    if [o.output_tokens for o in outputs] != expected:
        raise RuntimeError("an arm did not stop each caption at its forced length")
    return len(items) / elapsed


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="joycap-bench-engine-") as tmp:
        root = Path(tmp)
        model = str(build_tiny_model(root / "tiny"))
        paths = make_images(root / "images", IMAGES, size=(512, 384), fmt="JPEG")
        draw = random.Random(SEED)
        varied = [draw.randint(SHORTEST, LONGEST) for _ in paths]
        captioner = Captioner(model, device="cpu", dtype="float32", torch_threads=1)
        captioner.load()
        mixes = {"varied": prepared_images(captioner, paths, varied)}
        mixes["forced"] = prepared_images(captioner, paths, [LONGEST] * IMAGES)
        batcher = Batcher(captioner, max_batch_size=IN_FLIGHT, wait_ms=0).start()
        engine = ContinuousEngine(captioner, slots=IN_FLIGHT, max_new_tokens=LONGEST).start()
        images_per_s(engine, mixes["forced"][:IN_FLIGHT])  # warm-up: first calls allocate
        images_per_s(batcher, mixes["forced"][:IN_FLIGHT])
        figures: dict[str, tuple[float, float]] = {}
        for mix, items in mixes.items():
            generate_runs, engine_runs = [], []
            for _ in range(RUNS):
                generate_runs.append(images_per_s(batcher, items))
                engine_runs.append(images_per_s(engine, items))
            figures[mix] = (max(generate_runs), max(engine_runs))
        batcher.close()
        engine.close()
    rows = [(mix, gen, eng, f"{eng / gen:.2f}x") for mix, (gen, eng) in figures.items()]
    print_table(
        f"Tiny model on the CPU (1 torch thread), {IMAGES} images, at most {IN_FLIGHT} in flight, "
        f"images/s, best of {RUNS}",
        ["lengths", "--engine generate", "continuous engine", "speedup"],
        rows,
    )
    varied_x = figures["varied"][1] / figures["varied"][0]
    forced_x = figures["forced"][1] / figures["forced"][0]
    print(
        f"speedup with varied lengths {varied_x:.2f}x (target >= {TARGET_VARIED}), "
        f"all at {LONGEST}: {forced_x:.2f}x (target >= {TARGET_FORCED})"
    )
    record(
        {
            "engine_speedup_varied_b16": round(varied_x, 3),
            "engine_speedup_forced_b16": round(forced_x, 3),
            "engine_detail": {
                "images": IMAGES,
                "in_flight": IN_FLIGHT,
                "lengths": f"{SHORTEST}-{LONGEST} drawn with seed {SEED}, mean {sum(varied) / len(varied):.0f}",
                "best_of": RUNS,
                "images_per_s": {
                    mix: {"generate": round(gen, 2), "engine": round(eng, 2)}
                    for mix, (gen, eng) in figures.items()
                },
                "machine": machine(),
            },
        }
    )


if __name__ == "__main__":
    main()
