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

import torch

from worker.backends.base import CaptionInput, CaptionOutput, GenerationParams
from worker.batcher import (
    CaptionStream,
    HandedBack,
    is_out_of_memory,
    one_line,
    settle,
    wait_for_caption,
    without_frames,
)
from worker.captioner import Captioner, PreparedImage
from worker.engine_memory import plan_capacity, plan_slots
from worker.model_runner import ModelRunner, Newcomer

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


class ContinuousEngine(CaptionStream):
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
        super().__init__()
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
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._free: list[int] = []
        self._ready = False
        self._ready_lock = threading.Lock()

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
            device = torch.device(captioner.device)
            self.capacity = plan_capacity(captioner.image_seq_length, self.max_new_tokens)
            self.slots, why = plan_slots(
                self.requested_slots,
                text_config=model.config.get_text_config(),
                dtype=model.dtype,
                device=device,
                capacity=self.capacity,
                memory_fraction=self.kv_memory_fraction,
            )
            self.slot_reason = why
            self.prefill_chunk = self.requested_chunk or (512 if device.type == "cuda" else 4096)
            self._runner = ModelRunner(
                captioner,
                slots=self.slots,
                capacity=self.capacity,
                prefill_chunk=self.prefill_chunk,
                cpu_fast_path=self.cpu_fast_path,
            )
            self._stop_set = set(captioner.encoder.stop_ids)
            self._free = list(range(self.slots))
            if self.want_graphs:
                self._runner.capture_graphs()
            graphs = self._runner.graphs
            log.info(
                "engine ready in %.1f s: %d slots (%s), %d tokens each, KV cache %.2f GiB, %s",
                time.monotonic() - started,
                self.slots,
                why,
                self.capacity,
                self._runner.cache.nbytes / 2**30,
                graphs.describe() if graphs else "eager decode",
            )
            self._ready = True

    def describe(self) -> str:
        if not self._ready:
            return f"continuous engine, {self.captioner.describe()}"
        graphs = self._runner.graphs
        return (
            f"continuous engine, {self.slots} images in flight ({self.slot_reason}), "
            f"{self.captioner.describe()}, " + (graphs.describe() if graphs else "eager decode")
        )

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
        """One vision forward for all newcomers, then one prefill per prompt length."""
        runner = self._runner
        with torch.inference_mode():
            features = runner.image_features([s.prepared.pixels for s in admitted])
            groups: dict[int, list[Newcomer]] = {}
            for sequence, feature in zip(admitted, features, strict=True):
                newcomer = Newcomer(
                    sequence.slot,
                    sequence.prepared.ids,
                    feature,
                    sequence.params,
                    sequence.seed,
                    sequence.prepared.forced_length or 0,
                )
                groups.setdefault(len(newcomer.ids), []).append(newcomer)
            for newcomers in groups.values():
                first = runner.prefill(newcomers, between_chunks=self._step_if_decoding)
                runner.all_greedy = all(s.params.is_greedy for s in self._active.values())
                for newcomer, token in zip(newcomers, first, strict=True):
                    self._accept(self._active[newcomer.slot], token)

    def _step_if_decoding(self) -> None:
        # Between prefill chunks: captions already decoding get their next token meanwhile.
        if any(s.tokens for s in self._active.values()):
            self._step()

    def _step(self) -> None:
        """One token for every busy slot."""
        decoding = {slot: s for slot, s in self._active.items() if s.tokens}
        kv_length = max(len(s.prepared.ids) + len(s.tokens) for s in decoding.values())
        new = self._runner.decode(max(self._active) + 1, kv_length)
        self.steps_run += 1
        for slot, sequence in decoding.items():
            self._accept(sequence, new[slot])

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
        self._runner.park(sequence.slot)

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
