"""The continuous engine on the real tiny model in float32 on the CPU, against transformers' generate.

Greedy captions must be the same tokens as ``--engine generate`` gives, however images share the
engine: one slot, eight, or images joining while others decode and slots freed and refilled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig

from worker.backends.base import CaptionInput, CaptionOutput, GenerationParams
from worker.engine.continuous import ContinuousEngine
from worker.engine.memory import plan_capacity, slots_that_fit
from worker.engine.sampling import RowControls, uniform_noise
from worker.engine.slotcache import kv_bytes_per_token
from worker.model.captioner import Captioner, PreparedImage

SYSTEM = "You are a helpful assistant and help users with any queries they may have."
GREEDY = GenerationParams(greedy=True, max_new_tokens=40)


@pytest.fixture(scope="module")
def captioner(tiny_model: Path) -> Captioner:
    loaded = Captioner(str(tiny_model), device="cpu", dtype="float32", torch_threads=1)
    loaded.load()
    return loaded


def caption_set(count: int, *, lengths: Sequence[int | None] = ()) -> list[CaptionInput]:
    """Distinct images with prompts of three lengths; optional forced caption lengths."""
    prompts = [
        "Write a long descriptive caption for this image in a formal tone.",
        "Describe.",
        "Write a stable diffusion prompt for this image. Mention the lighting and the colours.",
    ]
    return [
        CaptionInput(
            Image.new("RGB", (50 + 13 * i, 40 + 7 * i), (37 * i % 256, 90 + i, 200 - 9 * i)),
            prompts[i % 3],
            SYSTEM,
            forced_length=lengths[i] if lengths else None,
        )
        for i in range(count)
    ]


def with_generate(captioner: Captioner, items: Sequence[CaptionInput], params: GenerationParams) -> list[str]:
    return [captioner.caption([item], params)[0].caption for item in items]


def engine_for(captioner: Captioner, slots: int, **kwargs: object) -> ContinuousEngine:
    return ContinuousEngine(captioner, slots=slots, max_new_tokens=256, **kwargs).start()  # type: ignore[arg-type]


def stream(
    engine: ContinuousEngine, items: Sequence[CaptionInput], params: GenerationParams
) -> list[CaptionOutput]:
    futures = [engine.submit(engine.captioner.prepare(item), params) for item in items]
    return [future.result(timeout=120) for future in futures]


@pytest.mark.parametrize("slots", [1, 8])
def test_greedy_captions_are_generates_tokens(captioner: Captioner, slots: int) -> None:
    items = caption_set(12)
    expected = with_generate(captioner, items, GREEDY)
    engine = engine_for(captioner, slots)
    try:
        got = [output.caption for output in stream(engine, items, GREEDY)]
    finally:
        engine.close()
    assert got == expected
    assert engine.most_in_flight == slots


def test_generates_own_batches_agree_too(captioner: Captioner) -> None:
    # The reference itself: a left-padded batch of 8 through generate equals the images alone.
    items = caption_set(8)
    assert [o.caption for o in captioner.caption(items, GREEDY)] == with_generate(captioner, items, GREEDY)


def test_images_joining_mid_flight_get_the_same_tokens(captioner: Captioner) -> None:
    """Slots freed by short captions are refilled while long ones decode; nobody's tokens change."""
    lengths = [30, 4, 9, 25, 3, 17, 6, 28, 5, 12, 21, 7]
    items = caption_set(len(lengths), lengths=lengths)
    params = GenerationParams(greedy=True, max_new_tokens=32)
    expected = with_generate(captioner, items, params)
    engine = engine_for(captioner, 4)
    try:
        outputs = stream(engine, items[:6], params)
        # And a second wave submitted while nothing waits: they join running captions at once.
        late = stream(engine, items[6:], params)
    finally:
        engine.close()
    assert [o.caption for o in outputs + late] == expected
    assert [o.output_tokens for o in outputs + late] == lengths
    assert engine.joined_mid_flight >= 4


def test_the_gpu_arithmetic_on_the_cpu_gives_the_same_tokens(captioner: Captioner) -> None:
    """What a CUDA graph captures: library attention, every slot's whole length, parked rows."""
    lengths = [18, 3, 11, 7, 15, 2, 9]
    items = caption_set(len(lengths), lengths=lengths)
    params = GenerationParams(greedy=True, max_new_tokens=20)
    expected = with_generate(captioner, items, params)
    engine = engine_for(captioner, 3, cpu_fast_path=False, prefill_chunk=300)
    try:
        assert [o.caption for o in stream(engine, items, params)] == expected
    finally:
        engine.close()
    assert engine.joined_mid_flight >= 2


def test_a_short_caption_resolves_while_a_long_one_runs(captioner: Captioner) -> None:
    long_item, short_item = caption_set(2, lengths=[200, 3])
    params = GenerationParams(greedy=True, max_new_tokens=220)
    engine = engine_for(captioner, 2)
    try:
        long_future = engine.submit(captioner.prepare(long_item), params)
        short_future = engine.submit(captioner.prepare(short_item), params)
        assert short_future.result(timeout=60).output_tokens == 3
        assert not long_future.done()
        assert long_future.result(timeout=120).output_tokens == 200
    finally:
        engine.close()


def test_chunked_prefill_gives_the_same_tokens(captioner: Captioner) -> None:
    items = caption_set(6, lengths=[20, 5, 14, 8, 11, 3])
    params = GenerationParams(greedy=True, max_new_tokens=24)
    expected = with_generate(captioner, items, params)
    # 100-token chunks: the 760-token prompts take 8 forwards, with decode steps in between.
    engine = engine_for(captioner, 3, prefill_chunk=100)
    try:
        assert [o.caption for o in stream(engine, items, params)] == expected
    finally:
        engine.close()


def test_a_seeded_sample_does_not_depend_on_its_batchmates(captioner: Captioner) -> None:
    target, *others = caption_set(6)
    seeded = GenerationParams(temperature=1.0, top_p=0.95, max_new_tokens=30, seed=1234)
    engine = engine_for(captioner, 4)
    try:
        alone = stream(engine, [target], seeded)[0].caption
        crowd = [GenerationParams(temperature=0.7, max_new_tokens=30, seed=s) for s in range(5)]
        futures = [engine.submit(captioner.prepare(o), p) for o, p in zip(others, crowd, strict=False)]
        together = engine.submit(captioner.prepare(target), seeded).result(timeout=60).caption
        [f.result(timeout=60) for f in futures]
        other_seed = stream(engine, [target], GenerationParams(temperature=1.0, max_new_tokens=30, seed=99))
    finally:
        engine.close()
    assert together == alone
    assert other_seed[0].caption != alone


def test_sampling_noise_is_a_function_of_seed_and_step() -> None:
    a = uniform_noise(torch.tensor([7, 8]), torch.tensor([3, 3]), 500)
    b = uniform_noise(torch.tensor([9, 7]), torch.tensor([0, 3]), 500)
    assert torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert float(a.min()) > 0.0 and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 0.05


def test_top_k_one_samples_the_argmax(captioner: Captioner) -> None:
    items = caption_set(3)
    expected = with_generate(captioner, items, GREEDY)
    engine = engine_for(captioner, 3)
    try:
        sampled = stream(engine, items, GenerationParams(temperature=1.5, top_k=1, max_new_tokens=40, seed=5))
    finally:
        engine.close()
    assert [o.caption for o in sampled] == expected


def test_a_caption_longer_than_a_slot_goes_through_generate(captioner: Captioner) -> None:
    [item] = caption_set(1, lengths=[300])
    params = GenerationParams(greedy=True, max_new_tokens=1200)
    engine = engine_for(captioner, 2)
    try:
        assert len(item_ids(captioner, item)) + params.max_new_tokens > engine.capacity
        [output] = stream(engine, [item], params)
    finally:
        engine.close()
    assert output.caption == with_generate(captioner, [item], params)[0]
    assert output.output_tokens == 300


def item_ids(captioner: Captioner, item: CaptionInput) -> list[int]:
    return captioner.prepare(item).ids


def test_a_broken_image_fails_alone(captioner: Captioner) -> None:
    good = caption_set(3)
    engine = engine_for(captioner, 4)
    try:
        futures = [engine.submit(captioner.prepare(item), GREEDY) for item in good[:2]]
        broken = captioner.prepare(good[2])
        bad = engine.submit(PreparedImage(broken.ids, torch.zeros(3, 5, 5)), GREEDY)
        results = [f.result(timeout=60).caption for f in futures]
        with pytest.raises(RuntimeError):
            bad.result(timeout=60)
        # The engine goes on.
        again = stream(engine, good[:1], GREEDY)
    finally:
        engine.close()
    assert results == with_generate(captioner, good[:2], GREEDY)
    assert again[0].caption == results[0]


def test_hand_back_releases_every_caller(captioner: Captioner) -> None:
    items = caption_set(5, lengths=[200] * 5)
    engine = engine_for(captioner, 2)
    futures = [
        engine.submit(captioner.prepare(item), GenerationParams(greedy=True, max_new_tokens=220))
        for item in items
    ]
    assert engine.hand_back() == 5
    for future in futures:
        with pytest.raises(Exception, match="stopping"):
            future.result(timeout=30)
    engine.close()


def test_auto_slots_from_the_kv_arithmetic() -> None:
    llama_8b = LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    assert kv_bytes_per_token(llama_8b, torch.bfloat16) == 128 * 1024
    capacity = plan_capacity(729, 256)
    assert capacity >= 729 + 256 and capacity % 64 == 0
    gib = 2**30
    # An 80 GB card holding 16.5 GB of weights: a few hundred slots of ~170 MiB, then the cap.
    fits = slots_that_fit(total=80 * gib, free=63.5 * gib, fraction=0.9, per_slot=176 * 2**20)
    assert 280 <= fits <= 330
    # A 24 GB card: far fewer; and none at all when the weights already take the budget.
    assert 10 <= slots_that_fit(total=24 * gib, free=7.5 * gib, fraction=0.95, per_slot=176 * 2**20) <= 40
    assert slots_that_fit(total=16 * gib, free=0.5 * gib, fraction=0.9, per_slot=176 * 2**20) == 0


def test_row_controls_select_views_write_through() -> None:
    controls = RowControls.allocate(4, "cpu")
    controls.select(slice(0, 2)).step.add_(1)
    assert controls.step.tolist() == [1, 1, 0, 0]
