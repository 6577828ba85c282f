"""JoyCaption's architecture with random weights, built offline: the GPU benchmark's model.

The sizes are JoyCaption's own (SigLIP so400m at 384 px, patch 14, 729 image tokens; Llama 3.1
8B; a GELU projector), so the timing is the real model's; the weights are random, so the text
is noise and every generation is forced to its full length. The tokenizer has Llama 3.1's
128,256 ids, its special tokens at their ids (the image token at 128077, as in JoyCaption),
and the tiny model's byte-level BPE for the words, so prompts encode as short as they should.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.model.tiny import llama_tokenizer, trained_bpe

VOCAB = 128_256
FIRST_SPECIAL = 128_000
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "vision": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
        },
        "text": {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
        },
    },
    # Engine-friendly head sizes (64), a few layers: the vllm tests' model.
    "small": {
        "vision": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        "text": {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
}


def llama31_special_tokens() -> dict[int, str]:
    """Llama 3.1's 256 special tokens by id."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    reserved = iter(range(256))
    tokens = {}
    for offset in range(256):
        tokens[FIRST_SPECIAL + offset] = named.get(offset) or f"<|reserved_special_token_{next(reserved)}|>"
    return tokens


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer

    spec = json.loads(trained_bpe(0).to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    # Filler ids up to Llama's: random weights generate any of them, and each must decode.
    for token_id in range(len(vocab), FIRST_SPECIAL):
        vocab[f"zq{token_id}"] = token_id
    specials = llama31_special_tokens()
    spec["added_tokens"] = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in specials.items()
    ]
    return llama_tokenizer(Tokenizer.from_str(json.dumps(spec)), FIRST_SPECIAL)


def joycaption_config(size: str = "full") -> Any:
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    dims = SIZES[size]
    vision = SiglipVisionConfig(image_size=384, patch_size=14, vision_use_head=False, **dims["vision"])
    text = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=FIRST_SPECIAL,
        eos_token_id=[FIRST_SPECIAL + 9, FIRST_SPECIAL + 1],
        pad_token_id=FIRST_SPECIAL + 4,
        **dims["text"],
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=FIRST_SPECIAL + 77,
        image_seq_length=729,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
    )


def build_random_joycaption(
    out_dir: str | Path, *, size: str = "full", with_weights: bool | None = None
) -> Path:
    """Write config, generation config and tokenizer (and random weights, for ``small`` by default)
    to ``out_dir``. The full size is written without weights: 17 GB is built on the GPU instead
    (``random_model``), and vLLM reads such a folder with ``load_format="dummy"``."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = joycaption_config(size)
    config.save_pretrained(out)
    stops = [FIRST_SPECIAL + 9, FIRST_SPECIAL + 1]
    GenerationConfig(
        bos_token_id=FIRST_SPECIAL, eos_token_id=stops, pad_token_id=FIRST_SPECIAL + 4
    ).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    if with_weights if with_weights is not None else size != "full":
        LlavaForConditionalGeneration(config).save_pretrained(out)
    return out


def random_model(size: str = "full", *, device: str = "cuda", dtype: Any = None) -> Any:
    """The model with random weights, built directly on ``device`` (seconds, not a 17 GB write)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    dtype = dtype or torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(joycaption_config(size))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
