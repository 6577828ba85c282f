"""One KV cache for a worker's lifetime: a fixed number of slots, each at its own position.

transformers' ``StaticCache`` writes every row of a batch at the same ``cache_position``, which is
what a static batch needs and what continuous batching cannot use: a newcomer joins at position 0
while its batchmates are hundreds of tokens in. This cache keeps one ``[slots, kv_heads,
capacity, head_dim]`` tensor per layer for keys and one for values, allocated once, and is told
before each forward which slots it serves and where each one writes:

- ``for_prefill(slots, start)``: a chunk of prompt tokens for some slots, written at
  ``start .. start + n``; attention sees the slots' tokens ``0 .. start + n``.
- ``for_decode(count, positions)``: one token for each of the first ``count`` slots, each written
  at its own position (a device tensor, so a CUDA graph replays it with new values); attention sees
  ``kv_length`` keys of every slot, the mask hiding what a slot has not written.

It is passed to the language model as its cache; the attention layers call ``update`` only.
"""

from __future__ import annotations

from typing import Any

import torch


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes across every layer of a text config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * element


class SlotCache:
    """Keys and values of ``slots`` sequences of up to ``capacity`` tokens, per layer."""

    def __init__(
        self, config: Any, *, slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        shape = (slots, kv_heads, capacity, head_dim)
        self.slots, self.capacity = slots, capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self._prefill_rows: torch.Tensor | None = None
        self._start = 0
        self._count = 0
        self._positions: torch.Tensor | None = None
        self._kv_length = capacity

    def view(self) -> SlotCache:
        """The same tensors with a mode of its own, for a second thread (prefill beside decode)."""
        twin = object.__new__(SlotCache)
        twin.__dict__.update(self.__dict__)
        return twin

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def for_prefill(self, rows: torch.Tensor, start: int) -> SlotCache:
        """The next forward writes prompt tokens of slots ``rows`` from position ``start`` on."""
        self._prefill_rows, self._start, self._positions = rows, start, None
        return self

    def for_decode(self, count: int, positions: torch.Tensor, kv_length: int) -> SlotCache:
        """The next forward writes one token for each of slots ``0 .. count-1`` at ``positions``."""
        self._prefill_rows, self._count, self._positions = None, count, positions
        self._kv_length = kv_length
        return self

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._prefill_rows is not None:
            rows, end = self._prefill_rows, self._start + key_states.shape[2]
            keys[rows, :, self._start : end] = key_states
            values[rows, :, self._start : end] = value_states
            return keys[rows, :, :end], values[rows, :, :end]
        assert self._positions is not None, "for_prefill or for_decode first"
        count = self._count
        index = self._positions.view(count, 1, 1, 1).expand(
            count, key_states.shape[1], 1, key_states.shape[3]
        )
        # scatter_ with a device index tensor: no host sync, and a CUDA graph replays it as is.
        keys[:count].scatter_(2, index, key_states)
        values[:count].scatter_(2, index, value_states)
        return keys[:count, :, : self._kv_length], values[:count, :, : self._kv_length]

    # What transformers may ask of a cache besides ``update`` (mask helpers, generation utilities).
    is_compileable = True

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_length

    def __len__(self) -> int:
        return len(self.keys)


SLOT_ATTENTION = "joycap_slot_sdpa"


def slot_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    slot_gqa: bool = False,
    slot_causal: bool = False,
    slot_decode: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for the engine's CPU forwards (``slot_gqa=True``).

    With a mask, transformers repeats every KV head for SDPA (CUDA's fused kernels need it); on the
    CPU, SDPA's own grouped-query path with the mask was 2x faster on the tiny model, and the
    engine always has a mask (each slot at its own length). Everything else goes to the library.
    """
    if slot_decode:
        return _grouped_decode(query, key, value, attention_mask, scaling), None
    if not slot_gqa:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # A prefill chunk from position 0 is plain causal attention: SDPA's causal kernel, no mask.
    mask = None if slot_causal else attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=slot_causal, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _grouped_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """One query token per row against the slots' keys, each KV head read once for its group.

    With a mask, SDPA on CUDA needs every KV head repeated for its query heads first: for 256
    slots of Llama 3.1 8B that copies 4x the whole KV cache per layer and step. A decode step has
    one query per row, so plain batched matmuls over ``[rows, kv heads, group, ...]`` read each
    key and value once; the softmax runs in float32, as transformers' eager attention does.
    """
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (scaling or dim**-0.5)
    if mask is not None:
        visible = mask.reshape(rows, 1, 1, -1)
        scores = (
            scores.masked_fill(~visible, float("-inf")) if visible.dtype == torch.bool else scores + visible
        )
    out = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous()


def use_slot_attention(model: Any) -> bool:
    """Route the model's SDPA attention through ``slot_attention``; False if it uses another kind."""
    text_config = model.config.get_text_config()
    if text_config._attn_implementation != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    # generate's masks too must stay SDPA's (an unknown name gets none, and padding leaks in).
    AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)
    text_config._attn_implementation = SLOT_ATTENTION
    return True
