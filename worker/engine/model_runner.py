"""The continuous engine's model side: the slot cache, prefill into slots, one decode step.

The scheduler (``worker/engine/continuous.py``) decides which image sits in which slot and when; this module
runs the model for it. Everything here works on device tensors that live as long as the worker:
the ``SlotCache``, the last token and the position of every slot, and the per-slot sampling
controls. A decode step is tensor ops only, so on CUDA it is captured as a graph per bucket of
slot counts at start and replayed (``worker/engine/decode_graphs.py``); on the CPU it runs eagerly.

The language model is transformers' own, called with this cache and a 4D mask, which it passes
through as it is; only the attention on the CPU goes through ``slot_attention``.

Prefill runs on a thread of its own beside the decode steps (on CUDA on a stream of its own):
it writes only the prompt positions of slots that are not decoding, through a cache view of its
own, and touches none of the decode step's inputs; ``activate`` hands the slot to the decode
step between two steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.backends.base import GenerationParams
from worker.engine.decode_graphs import DecodeGraphs, decode_buckets
from worker.engine.sampling import RowControls, constrain_stops, next_tokens
from worker.engine.slotcache import SlotCache, use_slot_attention
from worker.model.captioner import Captioner


@dataclass
class Newcomer:
    """One image entering a slot: its prompt ids, image features and sampling settings."""

    slot: int
    ids: list[int]
    features: torch.Tensor
    params: GenerationParams
    seed: int
    forced_length: int


class ModelRunner:
    """The model calls of a ``slots`` x ``capacity`` continuous batch on one ``Captioner``."""

    def __init__(
        self,
        captioner: Captioner,
        *,
        slots: int,
        capacity: int,
        prefill_chunk: int,
        cpu_fast_path: bool = True,
    ) -> None:
        model = captioner.model
        text_config = model.config.get_text_config()
        self.captioner = captioner
        self.device = torch.device(captioner.device)
        self.dtype = model.dtype
        self.slots, self.capacity, self.prefill_chunk = slots, capacity, prefill_chunk
        self._model = model
        self._language_model = _language_model(model)
        self._lm_head = model.get_output_embeddings()
        self._embed = model.get_input_embeddings()
        self._image_token = captioner.encoder.image_token_id
        params = inspect.signature(self._language_model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        self.cache = SlotCache(
            text_config, slots=slots, capacity=capacity, dtype=self.dtype, device=self.device
        )
        self._prefill_cache = self.cache.view()
        self._prefill_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.controls = RowControls.allocate(slots, self.device)
        self.tokens = torch.zeros(slots, dtype=torch.int64, device=self.device)
        # An idle slot, or one still in prefill, decodes a throwaway token at the last position of
        # its row: no caption gets there before writing it itself (the scheduler admits none that
        # would), so a prompt being prefilled is never overwritten.
        self.parked = capacity - 1
        self.positions = torch.full((slots,), self.parked, dtype=torch.int64, device=self.device)
        self._stop_ids = torch.tensor(captioner.encoder.stop_ids, device=self.device)
        self._eager_mask = text_config._attn_implementation == "eager"
        # False runs the CPU through what a GPU runs (the GPU's attention, every slot's whole
        # length each step), so the tests cover the arithmetic the CUDA graphs capture.
        fast = cpu_fast_path and self.device.type == "cpu"
        ours = use_slot_attention(model)
        # Prefill: the CPU's grouped-query SDPA; on a GPU the library's (its fused kernels).
        self._slot_kwargs = {"slot_gqa": True} if fast and ours else {}
        # Decode: the same on the CPU; on a GPU grouped matmuls, which read each KV head once.
        self._decode_kwargs = self._slot_kwargs if fast else ({"slot_decode": True} if ours else {})
        # The CPU skips the sampling ops while nobody samples; a CUDA graph always runs them.
        self.all_greedy = False
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self) -> None:
        """CUDA: capture the decode step for every bucket of slot counts (worker start)."""
        if self.device.type == "cuda":
            self.graphs = DecodeGraphs.capture(self._decode_body, decode_buckets(self.slots), self.reset)

    def image_features(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """The projected vision features of several images, ``[images, image tokens, hidden]``."""
        if self._prefill_stream is None:
            return self._image_features(pixels)
        with torch.cuda.stream(self._prefill_stream):
            return self._image_features(pixels)

    def _image_features(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        config = self._model.config
        with torch.inference_mode():
            out = self._model.get_image_features(
                pixel_values=torch.stack(list(pixels)).to(self.device, self.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        # transformers 5.x returns a tensor, a list per image, or an output with pooler_output.
        out = getattr(out, "pooler_output", out)
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    def prefill(self, newcomers: Sequence[Newcomer]) -> list[int]:
        """Prompts of one length into their slots, chunk by chunk; each slot's first token.

        Safe beside a decode step on another thread: nothing the step reads is written here.
        """
        if self._prefill_stream is None:
            return self._prefill(newcomers)
        with torch.cuda.stream(self._prefill_stream):
            first = self._prefill(newcomers)
        # The cache rows are written before the decode stream reads them (activate).
        self._prefill_stream.synchronize()
        return first

    def _prefill(self, newcomers: Sequence[Newcomer]) -> list[int]:
        with torch.inference_mode():
            length = len(newcomers[0].ids)
            ids = torch.tensor([n.ids for n in newcomers], device=self.device)
            embeds = self._embed(ids)
            image_mask = (ids == self._image_token).unsqueeze(-1).expand_as(embeds)
            features = torch.stack([n.features for n in newcomers]).to(self.device, embeds.dtype)
            embeds = embeds.masked_scatter(image_mask, features)
            rows = torch.tensor([n.slot for n in newcomers], device=self.device)
            hidden = embeds
            for start in range(0, length, self.prefill_chunk):
                end = min(length, start + self.prefill_chunk)
                positions = torch.arange(start, end, device=self.device).expand(len(newcomers), -1)
                # Causal with an offset: a later chunk sees the earlier ones. Always a 4D mask,
                # which transformers takes as it is (its own mask helpers would query this cache).
                causal = torch.arange(end, device=self.device)[None, :] <= positions[0][:, None]
                kwargs = dict(self._slot_kwargs)
                if kwargs and not start:
                    kwargs["slot_causal"] = True
                hidden = self._language_model(
                    inputs_embeds=embeds[:, start:end],
                    position_ids=positions,
                    attention_mask=self._mask(causal.expand(len(newcomers), 1, -1, -1)),
                    **{self._cache_name: self._prefill_cache.for_prefill(rows, start)},
                    **kwargs,
                    use_cache=True,
                ).last_hidden_state
            logits = self._lm_head(hidden[:, -1]).float()
            # The first token samples with controls of its own: the shared ones are the step's.
            controls = RowControls.allocate(len(newcomers), self.device)
            for row, newcomer in enumerate(newcomers):
                self._set_controls(controls, row, newcomer)
            constrain_stops(logits, controls, self._stop_ids)
            return [int(token) for token in next_tokens(logits, controls).tolist()]

    def activate(self, newcomers: Sequence[Newcomer], first: Sequence[int]) -> None:
        """Prefilled slots join the decode step (call between two steps, on the decode thread)."""
        for newcomer, token in zip(newcomers, first, strict=True):
            self._set_controls(self.controls, newcomer.slot, newcomer)
            self.controls.step[newcomer.slot] = 1
            self.tokens[newcomer.slot] = token
            self.positions[newcomer.slot] = len(newcomer.ids)

    @staticmethod
    def _set_controls(controls: RowControls, row: int, newcomer: Newcomer) -> None:
        sampling = newcomer.params.sampling
        controls.set_row(
            row,
            temperature=sampling.temperature,
            top_k=sampling.top_k,  # greedy rows take the argmax: top_k does not reach them
            top_p=sampling.top_p,
            seed=newcomer.seed,
            min_new=newcomer.params.min_new_tokens,
            forced_end=newcomer.forced_length,
        )

    def decode(self, count: int, kv_length: int) -> list[int]:
        """One token for each of slots ``0 .. count-1`` (the one host sync of a step)."""
        with torch.inference_mode():
            if self.graphs is not None:
                new = self.graphs.replay(count)
            elif self._slot_kwargs:
                # Only as many keys as the longest caption has: the CPU pays for every one.
                new = self._decode_body(count, kv_length)
            else:
                new = self._decode_body(count)
        return [int(token) for token in new.tolist()]

    def _decode_body(self, count: int, kv_length: int | None = None) -> torch.Tensor:
        """The decode step as tensor ops only (what a CUDA graph captures): tokens -> next tokens."""
        kv_length = kv_length or self.capacity
        positions = self.positions[:count]
        visible = torch.arange(kv_length, device=self.device)[None, :] <= positions[:, None]
        hidden = self._language_model(
            input_ids=self.tokens[:count, None],
            position_ids=positions[:, None],
            attention_mask=self._mask(visible[:, None, None, :]),
            **{self._cache_name: self.cache.for_decode(count, positions, kv_length)},
            **self._decode_kwargs,
            use_cache=True,
        ).last_hidden_state
        logits = self._lm_head(hidden[:, -1]).float()
        view = self.controls.select(slice(0, count))
        constrain_stops(logits, view, self._stop_ids)
        new = logits.argmax(dim=-1) if self.all_greedy else next_tokens(logits, view)
        self.tokens[:count] = new
        # Parked rows stay on the last position; a caption never gets there (admission).
        positions.add_(1).clamp_(max=self.parked)
        view.step.add_(1)
        return new

    def park(self, slot: int) -> None:
        self.positions[slot] = self.parked

    def reset(self) -> None:
        self.positions.fill_(self.parked)
        self.tokens.zero_()
        self.controls.step.zero_()

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        if not self._eager_mask:
            return visible
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~visible, torch.finfo(self.dtype).min
        )


def _language_model(model: Any) -> Any:
    """The LLaVA's text decoder (transformers 5 moved it under ``model.model``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers"):
        decoder = model.model.language_model
    return decoder
