"""The images in flight that fit on a card per ``--quantize`` mode: the README's Low VRAM table.

Arithmetic on the architecture only, nothing measured: the weights' bytes (``worker/model/sizes.py``),
and ``-b auto``'s slot count from ``worker/engine/memory.py`` (its per-slot KV bytes, activation
reserve and cap) on a card of a given size. ``python -m worker.model.memory_table`` prints the
README's table.

The KV cache stays bf16 in every mode (the engine allocates it in ``model.dtype``), so a slot
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
from typing import Any

from worker.model.sizes import (
    BF16,
    FLOAT32,
    GIB,
    JOYCAPTION_CONFIG,
    MODES,
    as_dict,
    decoder_linears,
    normal_mode,
    parameter_count,
    text_dims,
    vision_dims,
    weight_bytes,
)

CARDS_GIB = (12, 16, 24, 48, 80)
# Memory in use besides the weights once the model is loaded (what the engine reads as used).
CUDA_CONTEXT = 1 * GIB
DEFAULT_FRACTION = 0.9  # JOYCAP_KV_MEMORY_FRACTION's default
# One image's prompt: 729 image tokens and ~300 of text; the engine prefills it 512 at a time.
PREFILL_PROMPT_TOKENS = 1050
PREFILL_CHUNK = 512


def slot_bytes(config: Mapping[str, Any] = JOYCAPTION_CONFIG, *, max_new_tokens: int = 256) -> int:
    """One slot of the engine: KV cache in bf16 for ``plan_capacity`` tokens + sampling buffers."""
    import torch

    from worker.engine.memory import SAMPLING_BYTES_PER_VOCAB_ENTRY, plan_capacity
    from worker.engine.slotcache import kv_bytes_per_token

    c = as_dict(config)
    t = text_dims(c)
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
    c = as_dict(config)
    t, v = text_dims(c), vision_dims(c)
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
