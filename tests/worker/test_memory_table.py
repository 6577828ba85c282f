"""worker/model/memory_table.py against real models: parameter counts, bitsandbytes' stored bytes, the 8B table.

The counts are checked exactly on the tiny model (built offline) and on the full JoyCaption
architecture built on the meta device (no memory, no download); the 8bit and nf4 byte counts
exactly on the tiny model loaded through transformers' ``BitsAndBytesConfig`` by the real
bitsandbytes on the CPU: per-tensor formulas, so the 8B figures are the same arithmetic on
larger shapes (the tiny model's proportions differ, its per-tensor bytes do not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from worker.engine.memory import ACTIVATION_RESERVE, MAX_SLOTS
from worker.model import memory_table as mt
from worker.model import sizes


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model: Path) -> Any:
    return LlavaForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()


def test_parameter_count_is_exact_on_the_tiny_model(tiny_bf16: Any) -> None:
    config = tiny_bf16.config.to_dict()
    groups = sizes.parameter_groups(config)
    assert mt.parameter_count(config) == _params(tiny_bf16)
    assert groups["vision_tower"] == _params(tiny_bf16.model.vision_tower)
    assert groups["multi_modal_projector"] == _params(tiny_bf16.model.multi_modal_projector)
    assert groups["embed_tokens"] == _params(tiny_bf16.get_input_embeddings())
    assert groups["lm_head"] == _params(tiny_bf16.get_output_embeddings())
    # bf16: 2 bytes a parameter, what get_memory_footprint counts besides the buffers.
    footprint = tiny_bf16.get_memory_footprint() - _nbytes(tiny_bf16.buffers())
    assert mt.weight_bytes(config, "bf16") == {
        "parameters": footprint,
        "quant_state": 0,
        "quantized_linears": 0,
        "total": footprint,
    }


def test_parameter_count_is_exact_on_the_full_architecture() -> None:
    from bench.model import joycaption_config

    with torch.device("meta"):
        full = LlavaForConditionalGeneration(LlavaConfig(**mt.JOYCAPTION_CONFIG))
        headless = LlavaForConditionalGeneration(joycaption_config("full"))  # the GPU bench's model
    assert mt.parameter_count() == _params(full) == 8_479_990_848
    assert sizes.parameter_groups()["vision_tower"] == _params(full.model.vision_tower)
    # SigLIP so400m's vision tower with its pooling head: ~428M.
    assert 0.42e9 < sizes.parameter_groups()["vision_tower"] < 0.435e9
    assert mt.parameter_count(headless.config.to_dict()) == _params(headless)


@pytest.mark.parametrize("mode", ["8bit", "nf4"])
def test_quantized_bytes_are_what_bitsandbytes_stores(tiny_model: Path, tiny_bf16: Any, mode: str) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_model,
        dtype=torch.bfloat16,
        quantization_config=sizes.bitsandbytes_config(mode),
        device_map="cpu",
    )
    config = tiny_bf16.config.to_dict()
    expected = mt.weight_bytes(config, mode)
    converted = sizes.quantized_modules(model)
    # Only the decoder layers' linears: vision tower, projector and lm_head stay bf16.
    assert len(converted) == len(mt.decoder_linears(config))
    assert all(name.startswith("model.language_model.layers.") for name in converted)
    for part in (model.model.vision_tower, model.model.multi_modal_projector, model.get_output_embeddings()):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16

    modules = dict(model.named_modules())
    weights = _nbytes(modules[name].weight for name in converted)
    if mode == "8bit":
        stats = _nbytes(modules[name].weight.SCB for name in converted)
        assert {modules[name].weight.dtype for name in converted} == {torch.int8}
    else:
        states = [modules[name].weight.quant_state for name in converted]
        assert all(s.nested and s.blocksize == sizes.NF4_BLOCK and s.quant_type == "nf4" for s in states)
        stats = _nbytes(
            t for s in states for t in (s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code)
        )
    assert weights == expected["quantized_linears"]
    assert stats == expected["quant_state"]
    assert model.get_memory_footprint() - _nbytes(model.buffers()) == expected["parameters"]


def test_the_8b_table() -> None:
    gib = {mode: sizes.weights_gib(mode) for mode in mt.MODES}
    assert gib["nf4"] < gib["8bit"] < gib["bf16"]
    # 8.48B parameters x 2 bytes (the brief's 16.1-16.8 GB leaves out ~0.45B of vision tower
    # and projector: Llama 3.1 8B alone is 16.06 GB).
    assert 16.9e9 < mt.weight_bytes(mode="bf16")["total"] < 17.0e9
    assert 15.7 < gib["bf16"] < 15.9
    # 6.98B linear weights: 1 byte (+ row scales) in 8bit; 0.5 byte + ~0.127 bits in nf4.
    linears = sum(x.weights for x in mt.decoder_linears(mt.JOYCAPTION_CONFIG))
    nf4 = mt.weight_bytes(mode="nf4")
    assert nf4["quantized_linears"] == linears // 2
    assert 0.126 < nf4["quant_state"] * 8 / linears < 0.128
    assert 9.2 < gib["8bit"] < 9.4 and 6.0 < gib["nf4"] < 6.3
    # A slot: 128 KiB of bf16 keys and values a token x 1,408 tokens, + sampling buffers.
    assert mt.slot_bytes() == 128 * 1024 * 1408 + 128_256 * 48

    rows = {row["mode"]: row for row in mt.memory_rows()}
    assert rows["bf16"]["slots"][12] == rows["bf16"]["slots"][16] == 0
    assert rows["bf16"]["most"][12] == rows["bf16"]["most"][16] == 0
    assert rows["nf4"]["slots"][12] > 0
    assert rows["8bit"]["slots"][16] > 0
    for row in rows.values():
        counts = [row["slots"][card] for card in mt.CARDS_GIB]
        assert counts == sorted(counts)
        assert all(row["slots"][card] <= row["most"][card] for card in mt.CARDS_GIB)
        assert row["slots"][80] == MAX_SLOTS
    for card in mt.CARDS_GIB:
        assert rows["bf16"]["slots"][card] <= rows["8bit"]["slots"][card] <= rows["nf4"]["slots"][card]
    # The engine's reserve covers one image's prefill in every mode.
    assert all(mt.prefill_activation_bytes(mode=mode) < ACTIVATION_RESERVE for mode in mt.MODES)


def test_the_readme_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert mt.main([]) == 0
    out = capsys.readouterr().out
    table = mt.markdown_table()
    assert out.startswith(table)
    lines = table.splitlines()
    assert len(lines) == 2 + len(mt.MODES)
    assert lines[2].startswith("| `none` (bf16) | 15.8 GiB | does not fit | does not fit |")
    assert mt.normal_mode("none") == "bf16"
    with pytest.raises(ValueError, match="unknown quantize mode"):
        mt.normal_mode("int4")
