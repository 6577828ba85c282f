"""The continuous-batching caption engine: one KV cache, slots freed and refilled mid-flight.

``generate`` runs a static batch until its longest caption ends, builds a new cache per call and
spends tens of milliseconds of Python per step. This engine keeps ``slots`` sequences in one
``SlotCache`` allocated at start; one scheduler thread loops:

1. admit waiting images into free slots (lowest first, so the busy slots stay packed at the top
   and a decode step covers few idle rows);
2. prefill the newcomers, one chunk of prompt tokens at a time, a decode step between chunks so
   running captions are never starved for long;
3. one decode step for every busy slot: on CUDA a graph captured at start per bucket of slot
   counts and replayed; on the CPU the same code eagerly; one host sync (the new tokens);
4. a caption that ends resolves its caller's Future at once, and its slot is free for step 1.

Each row samples with its own settings and seed (``worker/sampling.py``), so images with different
generation parameters share a step. The prompt, the pixels and the reply trimming are the
``transformers`` backend's (``Captioner.prepare`` / ``decode_reply``): greedy captions are the
same tokens as ``--engine generate`` gives.
"""

from __future__ import annotations

import heapq
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.backends.base import CaptionInput, CaptionOutput, GenerationParams
from worker.batcher import (
    CallWatchdog,
    HandedBack,
    is_out_of_memory,
    one_line,
    settle,
    wait_for_caption,
    without_frames,
)
from worker.captioner import Captioner, PreparedImage
from worker.decode_graphs import DecodeGraphs, decode_buckets
from worker.engine_memory import plan_capacity, plan_slots
from worker.sampling import RowControls, constrain_stops, next_tokens
from worker.slotcache import SlotCache, use_slot_attention

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    prepared: PreparedImage
    params: GenerationParams
    future: Future[CaptionOutput] = field(default_factory=Future)
    seed: int = 0
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    restarts: int = 0


class ContinuousEngine:
    """Captions a stream of images on one ``Captioner``'s model; one per worker process."""

    def __init__(
        self,
        captioner: Captioner,
        *,
        slots: int = 0,
        kv_memory_fraction: float = 0.9,
        prefill_chunk: int = 0,
        max_new_tokens: int = 256,
        cuda_graphs: bool = True,
        cpu_fast_path: bool = True,
    ) -> None:
        self.captioner = captioner
        self.requested_slots = slots
        self.kv_memory_fraction = kv_memory_fraction
        self.requested_chunk = prefill_chunk
        self.max_new_tokens = max_new_tokens
        self.want_graphs = cuda_graphs
        # False runs the CPU through what a GPU runs (the library's attention, every slot's whole
        # length each step), so the tests cover the arithmetic the CUDA graphs capture.
        self.cpu_fast_path = cpu_fast_path
        self.slots = 0
        self.capacity = 0
        self.prefill_chunk = 0
        self.steps_run = 0
        self.most_in_flight = 0
        # Images admitted while other captions were decoding: the stream's whole point.
        self.joined_mid_flight = 0
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._free: list[int] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ready = False
        self._ready_lock = threading.Lock()
        self.time_limit_s: float | None = None
        self.watchdog = CallWatchdog()

    @property
    def model_id(self) -> str:
        return self.captioner.model_id

    @property
    def max_batch_size(self) -> int:
        return self.slots

    def load(self) -> None:
        """Load the model, size and allocate the cache, capture the decode graphs; idempotent."""
        with self._ready_lock:
            if self._ready:
                return
            started = time.monotonic()
            captioner = self.captioner
            captioner.load()
            model = captioner.model
            text_config = model.config.get_text_config()
            self.device = torch.device(captioner.device)
            self.dtype = model.dtype
            self.capacity = plan_capacity(captioner.image_seq_length, self.max_new_tokens)
            self.slots, why = plan_slots(
                self.requested_slots,
                text_config=text_config,
                dtype=self.dtype,
                device=self.device,
                capacity=self.capacity,
                memory_fraction=self.kv_memory_fraction,
            )
            self.prefill_chunk = self.requested_chunk or (512 if self.device.type == "cuda" else 4096)
            self._language_model = _language_model(model)
            self._lm_head = model.get_output_embeddings()
            self._embed = model.get_input_embeddings()
            self._cache = SlotCache(
                text_config, slots=self.slots, capacity=self.capacity, dtype=self.dtype, device=self.device
            )
            self._controls = RowControls.allocate(self.slots, self.device)
            self._tokens = torch.zeros(self.slots, dtype=torch.int64, device=self.device)
            # A slot that is idle or still in prefill decodes a throwaway token at the last position
            # of its row: no caption reaches it before writing it itself (admission checks that),
            # so the prompt a prefill is writing is never overwritten.
            self._parked = self.capacity - 1
            self._positions = torch.full((self.slots,), self._parked, dtype=torch.int64, device=self.device)
            self._stop_ids = torch.tensor(captioner.encoder.stop_ids, device=self.device)
            self._stop_set = set(captioner.encoder.stop_ids)
            self._eager_mask = text_config._attn_implementation == "eager"
            # SDPA's grouped-query path with a mask: faster on the CPU, the math kernel on CUDA.
            self._slot_kwargs = (
                {"slot_gqa": True} if self.device.type == "cpu" and use_slot_attention(model) else {}
            )
            self._free = list(range(self.slots))
            # The CPU skips the sampling ops when nobody samples; a CUDA graph runs them always.
            self._all_greedy = False
            self._graphs: DecodeGraphs | None = None
            if self.want_graphs and self.device.type == "cuda":
                self._graphs = DecodeGraphs.capture(
                    self._decode_body, decode_buckets(self.slots), self._reset
                )
            log.info(
                "engine ready in %.1f s: %d slots (%s), %d tokens each, KV cache %.2f GiB, %s",
                time.monotonic() - started,
                self.slots,
                why,
                self.capacity,
                self._cache.nbytes / 2**30,
                self._graphs.describe() if self._graphs else "eager decode",
            )
            self._ready = True

    def describe(self) -> str:
        return f"continuous engine, {self.slots} images in flight, {self.captioner.describe()}" + (
            f", {self._graphs.describe()}" if self._ready and self._graphs else ""
        )

    def enforce_time_limit(self, limit_s: float) -> None:
        """A caption not back within ``limit_s`` fails; a model call far past it ends the process."""
        self.time_limit_s = limit_s
        self.watchdog.arm(limit_s)

    # The caller's side: task threads, any number at once.

    def start(self) -> ContinuousEngine:
        self.load()
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="joycap-engine", daemon=True)
                self._thread.start()
        return self

    def caption_one(self, item: CaptionInput, params: GenerationParams) -> CaptionOutput:
        """Prepare the image on this thread, then wait for its caption from the stream."""
        return wait_for_caption(self.submit(self.captioner.prepare(item), params), self.time_limit_s)

    def submit(self, prepared: PreparedImage, params: GenerationParams) -> Future[CaptionOutput]:
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        sequence = _Sequence(prepared, params, seed=seed)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append(sequence)
            self._cond.notify_all()
        self.start()
        return sequence.future

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop after the captions already submitted; new ones are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def hand_back(self) -> int:
        """Stop now: every caption not yet finished fails with HandedBack; returns how many."""
        with self._cond:
            self._closed = True
            sequences = [*self._waiting, *self._active.values()]
            self._waiting.clear()
            self._cond.notify_all()
        return sum(settle(s.future, error=HandedBack("the worker is stopping")) for s in sequences)

    # The scheduler thread.

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active:
                    if self._closed:
                        return
                    self._cond.wait()
                admitted, alone = self._admit()
            try:
                for sequence in alone:
                    with self.watchdog.call("a generate call for a caption longer than a slot"):
                        self._caption_alone(sequence)
                if admitted:
                    with self.watchdog.call(f"a prefill of {len(admitted)} images"):
                        self._prefill(admitted)
                if self._active:
                    with self.watchdog.call(f"a decode step of {len(self._active)} captions"):
                        self._step()
            except Exception as exc:  # noqa: BLE001 - every failure is handed to its captions
                self._recover(without_frames(exc))

    def _admit(self) -> tuple[list[_Sequence], list[_Sequence]]:
        """Waiting images into free slots; and those too long for any slot, to caption alone."""
        admitted: list[_Sequence] = []
        alone: list[_Sequence] = []
        # A free slot is filled at once: waiting for several to free up, so that newcomers share
        # one prefill, measured no faster (a prefill costs the same per image at 1 or 16 on the
        # CPU) and left slots idle.
        while self._waiting and self._free:
            sequence = self._waiting.popleft()
            if not sequence.restarts and not sequence.future.set_running_or_notify_cancel():
                continue
            if len(sequence.prepared.ids) + sequence.params.max_new_tokens > self.capacity:
                alone.append(sequence)
                continue
            sequence.slot = heapq.heappop(self._free)
            sequence.tokens = []
            self._active[sequence.slot] = sequence
            admitted.append(sequence)
        self.most_in_flight = max(self.most_in_flight, len(self._active))
        if admitted and len(self._active) > len(admitted):
            self.joined_mid_flight += len(admitted)
        return admitted, alone

    def _caption_alone(self, sequence: _Sequence) -> None:
        # A prompt plus max_new_tokens longer than a slot: rare (a huge custom prompt, thousands
        # of new tokens), so it takes transformers' own generate rather than a bigger cache.
        try:
            [output] = self.captioner.generate([sequence.prepared], sequence.params)
        except Exception as exc:  # noqa: BLE001
            settle(sequence.future, error=without_frames(exc))
        else:
            settle(sequence.future, result=output)

    def _prefill(self, admitted: Sequence[_Sequence]) -> None:
        """Prompt tokens into the newcomers' slots; a failure is narrowed down to its image."""
        failure: Exception | None = None
        try:
            self._prefill_together(admitted)
        except Exception as exc:  # noqa: BLE001 - handed to the image that caused it
            failure = without_frames(exc)
        if failure is None:
            return
        # Outside the except block, so the failed forward's frames (and tensors) are freed.
        if is_out_of_memory(failure):
            self._recover(failure)
            return
        pending = [s for s in admitted if self._active.get(s.slot) is s and not s.tokens]
        if len(pending) == 1:
            self._release(pending[0])
            settle(pending[0].future, error=failure)
            return
        for sequence in pending:
            self._prefill([sequence])

    def _prefill_together(self, admitted: Sequence[_Sequence]) -> None:
        """Images sharing a prompt length share a forward: one per group, chunk by chunk."""
        with torch.inference_mode():
            features = self._image_features([s.prepared.pixels for s in admitted])
            groups: dict[int, list[tuple[_Sequence, torch.Tensor]]] = {}
            for sequence, feature in zip(admitted, features, strict=True):
                groups.setdefault(len(sequence.prepared.ids), []).append((sequence, feature))
            for length, members in groups.items():
                self._prefill_group(length, members)

    def _image_features(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        model = self.captioner.model
        config = model.config
        out = model.get_image_features(
            pixel_values=torch.stack(pixels).to(self.device, self.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        # transformers 5.x returns a tensor, a list per image, or an output with pooler_output.
        out = getattr(out, "pooler_output", out)
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    def _prefill_group(self, length: int, members: list[tuple[_Sequence, torch.Tensor]]) -> None:
        image_token = self.captioner.encoder.image_token_id
        ids = torch.tensor([s.prepared.ids for s, _ in members], device=self.device)
        embeds = self._embed(ids)
        image_mask = (ids == image_token).unsqueeze(-1).expand_as(embeds)
        features = torch.stack([f for _, f in members]).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask, features)
        rows = torch.tensor([s.slot for s, _ in members], device=self.device)
        hidden = embeds
        for start in range(0, length, self.prefill_chunk):
            end = min(length, start + self.prefill_chunk)
            positions = torch.arange(start, end, device=self.device).expand(len(members), -1)
            # Causal with an offset: a later chunk sees the earlier ones. Always a 4D mask, which
            # transformers takes as it is (its own mask helpers would query this cache).
            causal = torch.arange(end, device=self.device)[None, :] <= positions[0][:, None]
            slot_kwargs = (
                {**self._slot_kwargs, "slot_causal": True}
                if self._slot_kwargs and not start
                else self._slot_kwargs
            )
            hidden = self._language_model(
                inputs_embeds=embeds[:, start:end],
                position_ids=positions,
                attention_mask=self._mask(causal.expand(len(members), 1, -1, -1)),
                **{self._cache_kwarg(): self._cache.for_prefill(rows, start)},
                **slot_kwargs,
                use_cache=True,
            ).last_hidden_state
            if end < length and self._active_decoding(members):
                self._step()
        logits = self._lm_head(hidden[:, -1]).float()
        controls = self._controls
        for sequence, _ in members:
            params = sequence.params
            controls.set_row(
                sequence.slot,
                temperature=0.0 if params.is_greedy else params.temperature,
                top_k=params.top_k or 0,
                top_p=1.0 if params.top_p is None or params.is_greedy else params.top_p,
                seed=sequence.seed,
                min_new=params.min_new_tokens,
                forced_end=sequence.prepared.forced_length or 0,
            )
        view = controls.select(rows)
        constrain_stops(logits, view, self._stop_ids)
        first = next_tokens(logits, view)
        self._all_greedy = all(s.params.is_greedy for s in self._active.values())
        self._tokens[rows] = first
        self._positions[rows] = length
        controls.step[rows] = 1
        for (sequence, _), token in zip(members, first.tolist(), strict=True):
            self._accept(sequence, token)

    def _active_decoding(self, members: list[tuple[_Sequence, torch.Tensor]]) -> bool:
        newcomers = {s.slot for s, _ in members}
        return any(slot not in newcomers for slot in self._active)

    def _step(self) -> None:
        """One token for every busy slot."""
        newcomers = {s.slot for s in self._active.values() if not s.tokens}
        count = max(self._active) + 1
        with torch.inference_mode():
            if self._graphs is not None:
                new = self._graphs.replay(count)
            else:
                # Only as many keys as the longest caption has: the CPU pays for every one.
                kv_length = max(
                    len(s.prepared.ids) + len(s.tokens) for s in self._active.values() if s.tokens
                )
                new = self._decode_body(count, kv_length)
        self.steps_run += 1
        for slot, token in enumerate(new.tolist()):
            sequence = self._active.get(slot)
            if sequence is not None and slot not in newcomers:
                self._accept(sequence, token)

    def _decode_body(self, count: int, kv_length: int | None = None) -> torch.Tensor:
        """The decode step as tensor ops only (what a CUDA graph captures): tokens -> next tokens."""
        kv_length = kv_length or self.capacity
        positions = self._positions[:count]
        visible = torch.arange(kv_length, device=self.device)[None, :] <= positions[:, None]
        hidden = self._language_model(
            input_ids=self._tokens[:count, None],
            position_ids=positions[:, None],
            attention_mask=self._mask(visible[:, None, None, :]),
            **{self._cache_kwarg(): self._cache.for_decode(count, positions, kv_length)},
            **self._slot_kwargs,
            use_cache=True,
        ).last_hidden_state
        logits = self._lm_head(hidden[:, -1]).float()
        view = self._controls.select(slice(0, count))
        constrain_stops(logits, view, self._stop_ids)
        new = logits.argmax(dim=-1) if self._all_greedy else next_tokens(logits, view)
        self._tokens[:count] = new
        # Parked rows stay on the last position; a caption never gets there (admission).
        positions.add_(1).clamp_(max=self._parked)
        view.step.add_(1)
        return new

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        if not self._eager_mask:
            return visible
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~visible, torch.finfo(self.dtype).min
        )

    def _cache_kwarg(self) -> str:
        # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
        name = getattr(self, "_cache_name", None)
        if name is None:
            import inspect

            params = inspect.signature(self._language_model.forward).parameters
            name = self._cache_name = "cache" if "cache" in params else "past_key_values"
        return name

    def _accept(self, sequence: _Sequence, token: int) -> None:
        sequence.tokens.append(token)
        if sequence.future.done():  # timed out or handed back: nobody waits for the rest
            self._release(sequence)
        elif token in self._stop_set or len(sequence.tokens) >= sequence.params.max_new_tokens:
            self._finish(sequence)

    def _finish(self, sequence: _Sequence) -> None:
        text, output_tokens = self.captioner.encoder.decode_reply(sequence.tokens)
        output = CaptionOutput(text, prompt_tokens=len(sequence.prepared.ids), output_tokens=output_tokens)
        self._release(sequence)
        settle(sequence.future, result=output)

    def _release(self, sequence: _Sequence) -> None:
        with self._cond:
            if self._active.get(sequence.slot) is sequence:
                del self._active[sequence.slot]
                heapq.heappush(self._free, sequence.slot)
        self._positions[sequence.slot] = self._parked

    def _reset(self) -> None:
        self._positions.fill_(self._parked)
        self._tokens.zero_()
        self._controls.step.zero_()

    def _recover(self, exc: Exception) -> None:
        """A failed prefill or step: give memory back, shrink on OOM, restart each caption once.

        Restarting loses nothing but time: greedy captions and seeded samples come out the same.
        """
        oom = is_out_of_memory(exc)
        if oom:
            self.captioner.release_memory()
        with self._cond:
            active = sorted(self._active.values(), key=lambda s: s.slot)
        for sequence in active:
            self._release(sequence)
        if oom and len(active) > 1:
            limit = len(active) // 2
            log.warning("out of memory with %d in flight: at most %d from now on", len(active), limit)
            with self._cond:
                # Slots past the limit are never handed out again.
                self._free = [slot for slot in self._free if slot < limit]
                heapq.heapify(self._free)
        restart = []
        for sequence in active:
            if sequence.restarts >= (2 if oom else 1):
                settle(sequence.future, error=exc)
            else:
                sequence.restarts += 1
                restart.append(sequence)
        log.warning("a caption step failed (%s); restarting %d captions", one_line(exc), len(restart))
        with self._cond:
            self._waiting.extendleft(reversed(restart))


def _language_model(model: Any) -> Any:
    """The LLaVA's text decoder (transformers 5 moved it under ``model.model``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers"):
        decoder = model.model.language_model
    return decoder
