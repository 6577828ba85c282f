"""JoyCaption's GPU memory per ``--quantize`` mode, and the images in flight that fit on a card.

Arithmetic on the architecture only, nothing measured: the weights' bytes as bitsandbytes stores
them, and ``-b auto``'s slot count from ``worker/engine/memory.py`` (its per-slot KV bytes,
activation reserve and cap) on a card of a given size. ``python -m worker.model.memory_table`` prints
the README's table.

What each mode keeps where (transformers' ``BitsAndBytesConfig`` with the vision tower, the
projector and ``lm_head`` left out of the conversion):

- ``bf16`` (``--quantize none``): 2 bytes a parameter everywhere.
- ``8bit`` (LLM.int8): the language model's linears (q, k, v, o, gate, up, down of every layer)
  1 byte a weight plus one float32 scale per output row (``SCB``); everything else bf16.
- ``nf4``: those linears packed 2 weights a byte, plus double-quantized absmax: one uint8 per
  block of 64 weights and one float32 per 256 blocks, about 0.127 bits a weight, and a few
  constants a tensor (offset, the 16-entry NF4 code, the 256-entry nested code); the rest bf16.

In every mode the input embedding (128,256 x 4,096, an ``nn.Embedding``, which bitsandbytes
does not convert) and ``lm_head`` (left out on purpose) stay bf16: together 2.0 GiB, a third of
nf4's total. The KV cache stays bf16 too (the engine allocates it in ``model.dtype``), so a slot
takes the same 176 MiB (+6 MiB sampling buffers) in every mode.

A card's slot count is what ``-b auto`` computes on it (``slots_that_fit``), with the card's
memory in use after loading taken as the weights plus ``CUDA_CONTEXT`` (1 GiB: the CUDA context,
cuBLAS workspaces, the allocator's rounding; a desktop's display takes more); the engine's 1.5 GiB
``ACTIVATION_RESERVE`` covers the activations, which ``prefill_activation_bytes`` estimates at
about a third of a GiB for one image's prefill.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

GIB = 2**30
MODES = ("bf16", "8bit", "nf4")
# ``--quantize`` spells bf16 "none".
ALIASES = {"none": "bf16", "bfloat16": "bf16", "int8": "8bit", "4bit": "nf4"}
CARDS_GIB = (12, 16, 24, 48, 80)
# Memory in use besides the weights once the model is loaded (what the engine reads as used).
CUDA_CONTEXT = 1 * GIB
DEFAULT_FRACTION = 0.9  # JOYCAP_KV_MEMORY_FRACTION's default
# One image's prompt: 729 image tokens and ~300 of text; the engine prefills it 512 at a time.
PREFILL_PROMPT_TOKENS = 1050
PREFILL_CHUNK = 512
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


def _as_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _text(config: Mapping[str, Any]) -> SimpleNamespace:
    t = _as_dict(config["text_config"])
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


def _vision(config: Mapping[str, Any]) -> SimpleNamespace:
    v = _as_dict(config["vision_config"])
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
    t = _text(_as_dict(config))
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
    v = _vision(_as_dict(config))
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
    c = _as_dict(config)
    v, t = _vision(c), _text(c)
    layers = c.get("vision_feature_layer", -2)
    width = v.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    bias = bool(c.get("multimodal_projector_bias", True))
    return _linear_params(t.hidden_size, width, bias) + _linear_params(t.hidden_size, t.hidden_size, bias)


def parameter_groups(config: Mapping[str, Any] = JOYCAPTION_CONFIG) -> dict[str, int]:
    """Parameters by part; ``sum`` of the values is ``sum(p.numel() for p in model.parameters())``."""
    c = _as_dict(config)
    t = _text(c)
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
    c = _as_dict(config)
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


def slot_bytes(config: Mapping[str, Any] = JOYCAPTION_CONFIG, *, max_new_tokens: int = 256) -> int:
    """One slot of the engine: KV cache in bf16 for ``plan_capacity`` tokens + sampling buffers."""
    import torch

    from worker.engine.memory import SAMPLING_BYTES_PER_VOCAB_ENTRY, plan_capacity
    from worker.engine.slotcache import kv_bytes_per_token

    c = _as_dict(config)
    t = _text(c)
    capacity = plan_capacity(int(c.get("image_seq_length", 729)), max_new_tokens)
    return kv_bytes_per_token(t, torch.bfloat16) * capacity + t.vocab_size * SAMPLING_BYTES_PER_VOCAB_ENTRY


def prefill_activation_bytes(
    config: Mapping[str, Any] = JOYCAPTION_CONFIG,
    mode: str = "bf16",
    *,
    prompt_tokens: int = PREFILL_PROMPT_TOKENS,
    chunk: int = PREFILL_CHUNK,
) -> int:
    """A generous peak of one image's prefill beside the weights and the KV cache (bf16).

    The vision tower on the image (every layer's hidden states kept, as LLaVA reads layer -2;
    one layer's float32 attention scores and MLP), the prompt's embeddings with the image
    features scattered in, one chunk through a decoder layer (residual, norm, q/k/v, attention
    output, float32 scores as the math SDPA path makes them, gate/up/product of the MLP), the
    last token's float32 logits, and what bitsandbytes makes on the side: nf4 dequantizes the
    largest weight to bf16 for a many-token matmul, 8bit an int8 copy of the input and an
    int32 product.
    """
    mode = normal_mode(mode)
    c = _as_dict(config)
    t, v = _text(c), _vision(c)
    patches = (v.image_size // v.patch_size) ** 2
    vision = (v.num_hidden_layers + 1) * patches * v.hidden_size * BF16
    vision += v.num_attention_heads * patches * patches * FLOAT32 + 2 * patches * v.intermediate_size * BF16
    text = 2 * prompt_tokens * t.hidden_size * BF16
    text += 4 * chunk * t.hidden_size * BF16
    text += chunk * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim * BF16
    text += t.num_attention_heads * chunk * prompt_tokens * FLOAT32
    text += 3 * chunk * t.intermediate_size * BF16
    text += 2 * t.vocab_size * FLOAT32
    largest = max(decoder_linears(c), key=lambda x: x.weights)
    side = {
        "bf16": 0,
        "8bit": chunk * largest.in_features + chunk * largest.out_features * FLOAT32,
        "nf4": largest.weights * BF16,
    }[mode]
    return vision + text + side


def slots_on_card(
    card_gib: float,
    mode: str,
    *,
    fraction: float = DEFAULT_FRACTION,
    config: Mapping[str, Any] = JOYCAPTION_CONFIG,
    max_new_tokens: int = 256,
) -> int:
    """``-b auto`` on a fresh card of ``card_gib`` GiB: 0 where the model leaves no room for a slot.

    The engine's own rule (``slots_that_fit``, capped at ``MAX_SLOTS``) with the memory in use
    after loading taken as weights + ``CUDA_CONTEXT``; if the prefill estimate ever exceeded the
    engine's activation reserve, the excess is taken off too.
    """
    from worker.engine.memory import ACTIVATION_RESERVE, MAX_SLOTS, slots_that_fit

    total = card_gib * GIB
    extra = max(0, prefill_activation_bytes(config, mode) - ACTIVATION_RESERVE)
    used = weight_bytes(config, mode)["total"] + CUDA_CONTEXT + extra
    per_slot = slot_bytes(config, max_new_tokens=max_new_tokens)
    fits = slots_that_fit(total=total, free=total - used, fraction=fraction, per_slot=per_slot)
    return min(fits, MAX_SLOTS)


def memory_rows(
    card_gib: Iterable[float] = CARDS_GIB,
    *,
    fraction: float = DEFAULT_FRACTION,
    config: Mapping[str, Any] = JOYCAPTION_CONFIG,
) -> list[dict[str, Any]]:
    """One row per mode: weights, one slot, and per card ``-b auto`` (``slots``, at ``fraction``)
    and the most that fit if the engine may take the whole card (``most``, fraction 1.0)."""
    cards = list(card_gib)
    rows = []
    for mode in MODES:
        sizes = weight_bytes(config, mode)
        rows.append(
            {
                "mode": mode,
                "quantize": "none" if mode == "bf16" else mode,
                "parameters": parameter_count(config),
                "weights_gib": round(sizes["total"] / GIB, 2),
                "weights_gb": round(sizes["total"] / 1e9, 2),
                "slot_mib": round(slot_bytes(config) / 2**20, 1),
                "prefill_activation_mib": round(prefill_activation_bytes(config, mode) / 2**20),
                "slots": {
                    card: slots_on_card(card, mode, fraction=fraction, config=config) for card in cards
                },
                "most": {card: slots_on_card(card, mode, fraction=1.0, config=config) for card in cards},
            }
        )
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The README's table: weights per mode, and per card ``-b auto`` (the most that fit)."""
    rows = rows if rows is not None else memory_rows()
    cards = list(rows[0]["slots"])
    header = "| `--quantize` | weights | " + " | ".join(f"{card} GB card" for card in cards) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(cards)]
    for row in rows:
        cells = []
        for card in cards:
            auto, most = row["slots"][card], row["most"][card]
            cells.append("does not fit" if most == 0 else f"{auto} ({most})")
        name = f"`{row['quantize']}`" + (" (bf16)" if row["mode"] == "bf16" else "")
        lines.append(f"| {name} | {row['weights_gib']:.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    from worker.engine.memory import ACTIVATION_RESERVE, MAX_SLOTS, plan_capacity

    rows = memory_rows()
    print(markdown_table(rows))
    print()
    prefill = ", ".join(f"{row['mode']} {row['prefill_activation_mib']} MiB" for row in rows)
    capacity = plan_capacity(int(JOYCAPTION_CONFIG["image_seq_length"]), 256)
    print(
        f"{parameter_count():,} parameters. A slot is {rows[0]['slot_mib']} MiB in every mode "
        f"(bf16 keys and values of {capacity:,} tokens + sampling buffers). In use besides the "
        f"weights: {CUDA_CONTEXT / GIB:.0f} GiB CUDA context + the engine's "
        f"{ACTIVATION_RESERVE / GIB:.1f} GiB activation reserve (one image's prefill: {prefill}). "
        f"-b auto at JOYCAP_KV_MEMORY_FRACTION={DEFAULT_FRACTION}, in brackets at 1.0; at most {MAX_SLOTS}."
    )
    if "--json" in argv:
        import json

        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
