"""How many images the engine keeps in flight (``-b auto``) and how long each slot is.

The KV cache is the engine's one big allocation, so the slot count is arithmetic on it, as in
vLLM's ``gpu_memory_utilization``: of ``memory_fraction`` of the device's memory, what the
weights and CUDA already hold is taken off, then a reserve for activations (a prefill chunk, the
vision tower, the CUDA graphs' pool) and per slot the sampling temporaries (several ``[vocab]``
float and int64 rows); what is left, divided by one slot's keys and values, is the slot count.
For JoyCaption's Llama 3.1 8B in bf16 a token's keys and values take 128 KiB (32 layers x 8 KV
heads x 128 x 2 bytes x 2), so a slot of 1,408 tokens takes 176 MiB: about 300 slots fit beside
the weights on an 80 GB card at 0.9, and ``MAX_SLOTS`` caps them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from worker.engine.slotcache import kv_bytes_per_token

# Past a few hundred rows a decode step reads more KV than weights and stops getting cheaper
# per image, while each admission waits longer for its first token.
MAX_SLOTS = 256
# The CPU gains nothing from wide batches past this (measured on the tiny model: bench engine).
CPU_SLOTS = 16
# Room for the text of any upstream prompt (the longest, with every extra option, is ~300 tokens
# of Llama 3 text plus the chat template), beside the image tokens.
PROMPT_TEXT_TOKENS = 384
ACTIVATION_RESERVE = 1536 * 2**20
SAMPLING_BYTES_PER_VOCAB_ENTRY = 48


def plan_capacity(image_seq_length: int, max_new_tokens: int) -> int:
    """Tokens per slot: the image, the prompt text and the caption, rounded up to 64."""
    tokens = image_seq_length + PROMPT_TEXT_TOKENS + max(max_new_tokens, 256)
    return -(-tokens // 64) * 64


def slots_that_fit(*, total: float, free: float, fraction: float, per_slot: int) -> int:
    """Slots in ``fraction`` of ``total`` bytes, less what is in use and the activation reserve."""
    budget = fraction * total - (total - free) - ACTIVATION_RESERVE
    return max(0, int(budget // per_slot))


def plan_slots(
    requested: int,
    *,
    text_config: Any,
    dtype: torch.dtype,
    device: torch.device,
    capacity: int,
    memory_fraction: float,
) -> tuple[int, str]:
    """The slot count, and a few words on how it was chosen (printed at worker start)."""
    per_slot = kv_bytes_per_token(text_config, dtype) * capacity
    per_slot += int(text_config.vocab_size) * SAMPLING_BYTES_PER_VOCAB_ENTRY
    if requested:
        return requested, f"-b {requested}, {requested * per_slot / 2**30:.2f} GiB of KV cache"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fits = slots_that_fit(total=total, free=free, fraction=memory_fraction, per_slot=per_slot)
        if fits < 1:
            raise MemoryError(
                f"no room for a KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after "
                f"loading the model; raise JOYCAP_KV_MEMORY_FRACTION or use a smaller dtype"
            )
        slots = min(fits, MAX_SLOTS)
        return slots, (
            f"-b auto: {fits} fit in {memory_fraction:.0%} of {total / 2**30:.0f} GiB at "
            f"{per_slot / 2**20:.0f} MiB each" + (f", capped at {MAX_SLOTS}" if fits > MAX_SLOTS else "")
        )
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fits = max(1, int(memory_fraction * available // per_slot))
    slots = min(fits, CPU_SLOTS)
    return slots, f"-b auto on the CPU: {slots} ({per_slot / 2**20:.1f} MiB each)"
