"""The tiny offline model: JoyCaption's classes and config keys, loadable by the real calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from joycap_queue.config import TINY_MODEL_MARKER, is_tiny_model
from worker.model.tiny import (
    BOS,
    END_OF_TEXT,
    EOT,
    IMAGE_TOKEN,
    PAD,
    build_tiny_model,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_returns_the_folder_and_writes_the_marker(tiny_dir: Path) -> None:
    assert tiny_dir.is_dir()
    marker = json.loads((tiny_dir / TINY_MODEL_MARKER).read_text())
    assert marker["random_weights"] is True
    assert marker["profile"] == "beta-one"
    assert "random" in marker["note"]
    assert is_tiny_model(str(tiny_dir))


def test_profile_is_recorded(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "alpha", profile="alpha-two")
    assert json.loads((out / TINY_MODEL_MARKER).read_text())["profile"] == "alpha-two"


def test_config_matches_joycaption_layout(tiny_dir: Path) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir)
    config = model.config
    assert config.model_type == "llava"
    assert config.vision_config.model_type == "siglip_vision_model"
    assert config.text_config.model_type == "llama"
    assert config.vision_config.image_size == 384
    assert config.vision_config.patch_size == 14
    assert config.image_seq_length == 729 == (384 // 14) ** 2
    assert config.vision_feature_select_strategy == "full"
    assert config.vision_feature_layer == -2
    assert config.projector_hidden_act == "gelu"


def test_tokenizer_has_llama31_special_tokens(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir)
    assert tokenizer.bos_token == BOS
    assert tokenizer.pad_token == PAD
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eos = model.generation_config.eos_token_id
    assert eos == [tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(END_OF_TEXT)]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    # Like Llama 3.1, plain encode() adds BOS: the double-BOS pitfall is real here too.
    assert tokenizer.encode("a photo")[0] == tokenizer.bos_token_id


def test_chat_template_is_llama31_style(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Describe {IMAGE_TOKEN}the image."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{BOS}<|start_header_id|>system<|end_header_id|>\n\nBe brief.{EOT}"
        f"<|start_header_id|>user<|end_header_id|>\n\n{IMAGE_TOKEN}Describe the image.{EOT}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without_prompt.endswith(EOT)


def test_processor_loads_and_counts_729_image_tokens(tiny_dir: Path) -> None:
    from PIL import Image

    processor = AutoProcessor.from_pretrained(tiny_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 32), "red")], return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image_token_id).sum()) == 729
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 384, 384)


def test_small_on_disk(tiny_dir: Path) -> None:
    size = sum(f.stat().st_size for f in tiny_dir.iterdir())
    assert size < 5_000_000


def test_same_seed_same_model(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
