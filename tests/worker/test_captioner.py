"""The captioner on the tiny random model: the real transformers code path, structure not wording."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.model.captioner import (
    Captioner,
    CaptionInput,
    GenerationParams,
    ModelLoadError,
    preprocess_image,
    resolve_device,
    resolve_dtype,
)
from worker.model.tiny import BOS, EOT, IMAGE_TOKEN, build_tiny_model

SYSTEM = "You are a helpful image captioner."
GREEDY = GenerationParams(greedy=True, max_new_tokens=12)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def captioner(tiny_dir: Path) -> Captioner:
    loaded = Captioner(str(tiny_dir), device="cpu", dtype="float32")
    loaded.load()
    return loaded


def two_colour(size: tuple[int, int] = (100, 50)) -> Image.Image:
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def inputs() -> list[CaptionInput]:
    """Three images with prompts of different lengths, so the batch is left-padded."""
    return [
        CaptionInput(two_colour(), "Write a short caption.", SYSTEM),
        CaptionInput(Image.new("RGB", (384, 384), (20, 200, 40)), "Describe.", SYSTEM),
        CaptionInput(
            Image.new("RGB", (640, 480), (250, 250, 250)),
            "Write a very long descriptive caption for this image in a formal tone, "
            "and mention the lighting and the camera angle.",
            SYSTEM,
        ),
    ]


# preprocessing


def test_preprocess_shape_and_range() -> None:
    pixels = preprocess_image(two_colour((333, 517)), 384)
    assert pixels.shape == (3, 384, 384)
    assert pixels.dtype == torch.float32
    assert float(pixels.min()) >= -1.0
    assert float(pixels.max()) <= 1.0


def test_preprocess_white_is_one() -> None:
    assert torch.equal(preprocess_image(Image.new("RGB", (50, 70), "white"), 384), torch.ones(3, 384, 384))


def test_preprocess_squishes_not_pads() -> None:
    pixels = preprocess_image(two_colour((100, 50)), 384)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    # Corners and edges keep the image's colours: nothing was padded or cropped.
    for y in (0, 192, 383):
        assert torch.allclose(pixels[:, y, 0], red, atol=0.02)
        assert torch.allclose(pixels[:, y, 383], blue, atol=0.02)


def test_preprocess_converts_to_rgb() -> None:
    pixels = preprocess_image(Image.new("L", (384, 384), 0), 384)
    assert torch.equal(pixels, -torch.ones(3, 384, 384))
    rgba = preprocess_image(Image.new("RGBA", (10, 10), (255, 255, 255, 0)), 384)
    assert rgba.shape == (3, 384, 384)


# settings


def test_resolve_device_and_dtype() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") in {"cpu", "cuda"}
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_dtype("int8", "cpu")


def test_generation_params() -> None:
    params = GenerationParams()
    assert params.to_dict() == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": None,
        "max_new_tokens": 256,
        "greedy": False,
    }
    assert GenerationParams(**params.to_dict()) == params
    sampled = params.generate_kwargs()
    # "top_k off" must be explicit: an omitted top_k becomes transformers' default of 50.
    assert sampled == {"do_sample": True, "max_new_tokens": 256, "temperature": 0.6, "top_k": 0, "top_p": 0.9}
    assert GenerationParams(top_p=None, top_k=40).generate_kwargs()["top_p"] == 1.0
    assert GenerationParams(top_p=None, top_k=40).generate_kwargs()["top_k"] == 40
    for greedy in (GenerationParams(greedy=True), GenerationParams(temperature=0.0)):
        assert greedy.generate_kwargs() == {"do_sample": False, "max_new_tokens": 256}
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=0)


# loading


def test_load_reads_the_config(captioner: Captioner) -> None:
    assert captioner.is_loaded
    assert captioner.device == "cpu"
    assert captioner.dtype == torch.float32
    assert captioner.image_size == 384
    assert captioner.image_seq_length == 729


def test_load_twice_is_a_no_op(captioner: Captioner) -> None:
    model, tokenizer = captioner.model, captioner.tokenizer
    captioner.load()
    assert captioner.model is model
    assert captioner.tokenizer is tokenizer


def test_missing_folder_raises_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        Captioner(str(tmp_path / "nowhere"), device="cpu").load()
    assert "\n" not in str(caught.value)
    assert "nowhere" in str(caught.value)


def test_uncached_hub_model_raises_one_line() -> None:
    captioner = Captioner("joycap-queue-tests/no-such-model", device="cpu")
    with pytest.raises(ModelLoadError) as caught:
        captioner.load()
    assert "\n" not in str(caught.value)
    assert "no-such-model" in str(caught.value)
    assert not captioner.is_loaded


def test_folder_without_a_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        Captioner(str(tmp_path), device="cpu").load()


# prompt


def test_encode_prompt_layout(captioner: Captioner) -> None:
    tokenizer = captioner.tokenizer
    ids = captioner.encode_prompt("  Write a short caption.  ", SYSTEM)
    bos, image = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids[0] == bos
    assert ids.count(bos) == 1
    assert ids.count(image) == 729
    first = ids.index(image)
    assert ids[first : first + 729] == [image] * 729
    header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    assert ids[-len(header) :] == header
    assert ids[first + 729 : first + 729 + 2] != [image, image]
    text = tokenizer.decode(ids)
    assert "Write a short caption." + EOT in text
    assert SYSTEM in text


def test_encode_prompt_repairs_templates(tiny_dir: Path) -> None:
    captioner = Captioner(str(tiny_dir), device="cpu")
    tokenizer = captioner.tokenizer
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # A template that writes BOS twice and leaves the image out.
    tokenizer.chat_template = (
        "{{ bos_token }}{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    ids = captioner.encode_prompt("Describe.", SYSTEM)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids.count(image) == 729
    # The image opens the user's content.
    user = tokenizer.encode("user<|end_header_id|>\n\n", add_special_tokens=False)
    at = ids.index(image)
    assert ids[at - len(user) : at] == user
    # That template has no BOS at all: one is prepended.
    tokenizer.chat_template = tokenizer.chat_template.replace("{{ bos_token }}", "")
    ids = captioner.encode_prompt("Describe.", SYSTEM)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # A template that writes the image token but keeps the one the user typed gives two.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{ m['content'] }}", "{% if m['role'] == 'user' %}" + IMAGE_TOKEN + "{% endif %}{{ m['content'] }}"
    )
    assert captioner.encode_prompt("Describe.", SYSTEM).count(image) == 729
    with pytest.raises(ValueError, match="2 image tokens"):
        captioner.encode_prompt(f"{IMAGE_TOKEN} Describe.", SYSTEM)


def test_encode_prompt_keeps_one_image_token_the_user_typed(captioner: Captioner) -> None:
    ids = captioner.encode_prompt(f"{IMAGE_TOKEN}Describe {IMAGE_TOKEN}.", SYSTEM)
    assert ids.count(captioner.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 729


# captioning


def test_caption_batch_structure(captioner: Captioner) -> None:
    batch = inputs()
    outputs = captioner.caption(batch, GREEDY)
    assert len(outputs) == 3
    for item, output in zip(batch, outputs, strict=True):
        assert isinstance(output.caption, str)
        assert output.caption == output.caption.strip()
        assert EOT not in output.caption
        assert 0 < output.output_tokens <= GREEDY.max_new_tokens
        assert output.prompt_tokens == len(captioner.encode_prompt(item.prompt, item.system_prompt))
    assert len({output.prompt_tokens for output in outputs}) == 3


def test_left_padded_batch_equals_one_by_one(captioner: Captioner) -> None:
    batch = inputs()
    together = captioner.caption(batch, GREEDY)
    alone = [captioner.caption([item], GREEDY)[0] for item in batch]
    assert together == alone


def test_max_new_tokens_respected(captioner: Captioner) -> None:
    for limit in (1, 5):
        [output] = captioner.caption(inputs()[:1], GenerationParams(greedy=True, max_new_tokens=limit))
        assert 0 < output.output_tokens <= limit


def test_sampling_runs(captioner: Captioner) -> None:
    params = GenerationParams(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=8)
    outputs = captioner.caption(inputs(), params)
    assert [0 < output.output_tokens <= 8 for output in outputs] == [True] * 3


def test_empty_batch(captioner: Captioner) -> None:
    assert captioner.caption([], GREEDY) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtypes_run_on_cpu(tiny_dir: Path, dtype: str) -> None:
    captioner = Captioner(str(tiny_dir), device="cpu", dtype=dtype)
    outputs = captioner.caption(inputs()[:2], GenerationParams(greedy=True, max_new_tokens=6))
    assert captioner.dtype == getattr(torch, dtype)
    assert len(outputs) == 2
    assert all(0 < output.output_tokens <= 6 for output in outputs)


def test_concurrent_callers_get_their_own_results(captioner: Captioner) -> None:
    batch = inputs()
    expected = [captioner.caption([item], GREEDY)[0] for item in batch]
    results: dict[int, object] = {}

    def run(index: int) -> None:
        try:
            results[index] = captioner.caption([batch[index]], GREEDY)[0]
        except Exception as exc:  # surfaced by the assertion below
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results.get(index) for index in range(3)] == expected


def upstream_trim(ids: list[int], end_header: int, eot: int) -> list[int]:
    """Upstream's trim, on the whole sequence: after the last <|end_header_id|>, up to the first eot."""
    while end_header in ids:
        ids = ids[ids.index(end_header) + 1 :]
    return ids[: ids.index(eot)] if eot in ids else ids


def test_decode_trims_like_upstream(captioner: Captioner) -> None:
    tokenizer = captioner.tokenizer
    eot, end_header = (
        tokenizer.convert_tokens_to_ids(EOT),
        tokenizer.convert_tokens_to_ids("<|end_header_id|>"),
    )
    prompt = captioner.encode_prompt("Describe.", SYSTEM)
    words = tokenizer.encode(" a red square", add_special_tokens=False)
    more = tokenizer.encode(" on blue", add_special_tokens=False)
    pad = tokenizer.pad_token_id
    for generated in (
        [*words, eot, pad, pad],
        [*words, end_header, *more, eot],
        [*words, *more],  # hit max_new_tokens
        [eot, pad],
    ):
        expected = tokenizer.decode(upstream_trim(prompt + generated, end_header, eot)).strip()
        output = captioner._decode(generated, prompt_tokens=len(prompt))
        assert output.caption == expected
        assert output.output_tokens == (generated.index(eot) + 1 if eot in generated else len(generated))


def test_decode_drops_nul_characters(captioner: Captioner) -> None:
    # Random weights emit NUL now and then; PostgreSQL refuses it in a text column.
    tokenizer = captioner.tokenizer
    generated = tokenizer.encode(" red\x00 square", add_special_tokens=False)
    assert "\x00" in tokenizer.decode(generated)
    assert captioner._decode(generated, prompt_tokens=0).caption == "red square"
