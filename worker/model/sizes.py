"""JoyCaption's parameters and the bytes they take on the GPU per ``--quantize`` mode.

Arithmetic on the architecture only, nothing measured: the weights' bytes as bitsandbytes stores
them. What each mode keeps where (transformers' ``BitsAndBytesConfig`` with the vision tower, the
projector and ``lm_head`` left out of the conversion):

- ``bf16`` (``--quantize none``): 2 bytes a parameter everywhere.
- ``8bit`` (LLM.int8): the language model's linears (q, k, v, o, gate, up, down of every layer)
  1 byte a weight plus one float32 scale per output row (``SCB``); everything else bf16.
- ``nf4``: those linears packed 2 weights a byte, plus double-quantized absmax: one uint8 per
  block of 64 weights and one float32 per 256 blocks, about 0.127 bits a weight, and a few
  constants a tensor (offset, the 16-entry NF4 code, the 256-entry nested code); the rest bf16.

In every mode the input embedding (128,256 x 4,096, an ``nn.Embedding``, which bitsandbytes
does not convert) and ``lm_head`` (left out on purpose) stay bf16: together 2.0 GiB, a third of
nf4's total.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

GIB = 2**30
MODES = ("bf16", "8bit", "nf4")
# ``--quantize`` spells bf16 "none".
ALIASES = {"none": "bf16", "bfloat16": "bf16", "int8": "8bit", "4bit": "nf4"}
NF4_BLOCK = 64
NESTED_BLOCK = 256
BF16 = 2
FLOAT32 = 4

# JoyCaption (fancyfeast/llama-joycaption-*-hf-llava): SigLIP so400m patch14-384 with its
# pooling head (in the checkpoint, unused by LLaVA), a 2-linear GELU projector, Llama 3.1 8B.
JOYCAPTION_CONFIG: dict[str, Any] = {
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "num_channels": 3,
        "vision_use_head": True,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "projector_hidden_act": "gelu",
    "multimodal_projector_bias": True,
    "vision_feature_layer": -2,
    "image_seq_length": 729,
}


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` of the language model's decoder layers: what bitsandbytes converts."""

    out_features: int
    in_features: int
    bias: bool

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features


def normal_mode(mode: str) -> str:
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose none (bf16), 8bit or nf4")
    return mode


def as_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def text_dims(config: Mapping[str, Any]) -> SimpleNamespace:
    t = as_dict(config["text_config"])
    heads = int(t["num_attention_heads"])
    return SimpleNamespace(
        hidden_size=int(t["hidden_size"]),
        intermediate_size=int(t["intermediate_size"]),
        num_hidden_layers=int(t["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=int(t.get("head_dim") or int(t["hidden_size"]) // heads),
        vocab_size=int(t["vocab_size"]),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        attention_bias=bool(t.get("attention_bias", False)),
        mlp_bias=bool(t.get("mlp_bias", False)),
    )


def vision_dims(config: Mapping[str, Any]) -> SimpleNamespace:
    v = as_dict(config["vision_config"])
    return SimpleNamespace(
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_hidden_layers=int(v["num_hidden_layers"]),
        num_attention_heads=int(v["num_attention_heads"]),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        num_channels=int(v.get("num_channels", 3)),
        use_head=bool(v.get("vision_use_head", True)),  # SiglipVisionConfig's default
    )


def decoder_linears(config: Mapping[str, Any]) -> list[Linear]:
    """Every linear of the decoder layers (lm_head is not among them)."""
    t = text_dims(as_dict(config))
    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    ab, mb = t.attention_bias, t.mlp_bias
    layer = [
        Linear(q, t.hidden_size, ab),  # q_proj
        Linear(kv, t.hidden_size, ab),  # k_proj
        Linear(kv, t.hidden_size, ab),  # v_proj
        Linear(t.hidden_size, q, ab),  # o_proj
        Linear(t.intermediate_size, t.hidden_size, mb),  # gate_proj
        Linear(t.intermediate_size, t.hidden_size, mb),  # up_proj
        Linear(t.hidden_size, t.intermediate_size, mb),  # down_proj
    ]
    return layer * t.num_hidden_layers


def _linear_params(out_features: int, in_features: int, bias: bool = True) -> int:
    return out_features * in_features + (out_features if bias else 0)


def vision_tower_params(config: Mapping[str, Any]) -> int:
    """SigLIP's ``SiglipVisionModel``: embeddings, encoder layers, post-layernorm, pooling head."""
    v = vision_dims(as_dict(config))
    h, i = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    embeddings = v.num_channels * v.patch_size**2 * h + h + patches * h  # conv + bias, positions
    mlp = _linear_params(i, h) + _linear_params(h, i)
    layer = 4 * _linear_params(h, h) + mlp + 2 * 2 * h  # q, k, v, out; fc1, fc2; 2 LayerNorms
    total = embeddings + v.num_hidden_layers * layer + 2 * h  # post_layernorm
    if v.use_head:
        # probe, nn.MultiheadAttention (in_proj 3h x h + bias, out_proj), LayerNorm, MLP
        total += h + 3 * h * h + 3 * h + _linear_params(h, h) + 2 * h + mlp
    return total


def projector_params(config: Mapping[str, Any]) -> int:
    c = as_dict(config)
    v, t = vision_dims(c), text_dims(c)
    layers = c.get("vision_feature_layer", -2)
    width = v.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    bias = bool(c.get("multimodal_projector_bias", True))
    return _linear_params(t.hidden_size, width, bias) + _linear_params(t.hidden_size, t.hidden_size, bias)


def parameter_groups(config: Mapping[str, Any] = JOYCAPTION_CONFIG) -> dict[str, int]:
    """Parameters by part; ``sum`` of the values is ``sum(p.numel() for p in model.parameters())``."""
    c = as_dict(config)
    t = text_dims(c)
    linears = decoder_linears(c)
    return {
        "vision_tower": vision_tower_params(c),
        "multi_modal_projector": projector_params(c),
        "embed_tokens": t.vocab_size * t.hidden_size,
        "decoder_linears": sum(_linear_params(x.out_features, x.in_features, x.bias) for x in linears),
        # input and post-attention RMSNorm per layer, the final norm
        "norms": (2 * t.num_hidden_layers + 1) * t.hidden_size,
        # tied: the same tensor as embed_tokens, which parameters() yields once
        "lm_head": 0 if t.tie_word_embeddings else t.vocab_size * t.hidden_size,
    }


def parameter_count(config: Mapping[str, Any] = JOYCAPTION_CONFIG) -> int:
    return sum(parameter_groups(config).values())


def quantized_linear_bytes(linear: Linear, mode: str) -> tuple[int, int]:
    """(bytes of the weight tensor as stored, bytes of its quantization statistics); bias aside."""
    mode = normal_mode(mode)
    n = linear.weights
    if mode == "bf16":
        return n * BF16, 0
    if mode == "8bit":
        return n, linear.out_features * FLOAT32  # int8 CB, float32 SCB per row
    blocks = -(-n // NF4_BLOCK)
    nested = -(-blocks // NESTED_BLOCK)
    # uint8 absmax per block; float32 absmax per 256 blocks, offset, 16 + 256 float32 codes
    stats = blocks + nested * FLOAT32 + FLOAT32 + (16 + 256) * FLOAT32
    return -(-n // 2), stats


def weight_bytes(config: Mapping[str, Any] = JOYCAPTION_CONFIG, mode: str = "bf16") -> dict[str, int]:
    """The weights' bytes on the device in ``mode``.

    ``parameters``: the model's parameter tensors as stored (what ``get_memory_footprint``
    counts, buffers aside); ``quant_state``: the scales bitsandbytes keeps beside them
    (``SCB``, ``quant_state``), which that count leaves out; ``quantized_linears``: the part of
    ``parameters`` in bitsandbytes' linear weights; ``total``: parameters + quant_state.
    """
    mode = normal_mode(mode)
    c = as_dict(config)
    linears = decoder_linears(c)
    stored = [quantized_linear_bytes(x, mode) for x in linears]
    linear_weights = sum(s for s, _ in stored)
    stats = sum(q for _, q in stored)
    # Everything that is not a decoder linear weight stays in bf16, biases of those included.
    other = parameter_count(c) - sum(x.weights for x in linears)
    parameters = other * BF16 + linear_weights
    return {
        "parameters": parameters,
        "quant_state": stats,
        "quantized_linears": 0 if mode == "bf16" else linear_weights,
        "total": parameters + stats,
    }


def weights_gib(mode: str, config: Mapping[str, Any] = JOYCAPTION_CONFIG) -> float:
    return weight_bytes(config, mode)["total"] / GIB


def bitsandbytes_config(mode: str) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``mode``: the worker's own (None for bf16)."""
    import torch

    from worker.model.captioner import quantization_config

    mode = normal_mode(mode)
    return None if mode == "bf16" else quantization_config(mode, torch.bfloat16)


def quantized_modules(model: Any) -> list[str]:
    """Names of a loaded model's bitsandbytes linears (``Linear8bitLt``, ``Linear4bit``)."""
    return [
        name
        for name, module in model.named_modules()
        if type(module).__name__ in ("Linear8bitLt", "Linear4bit")
    ]
