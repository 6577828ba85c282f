"""The continuous-batching caption engine: one KV cache, slots freed and refilled mid-flight.

``generate`` runs a static batch until its longest caption ends, builds a new cache per call and
spends tens of milliseconds of Python per step. This engine keeps ``slots`` captions in one
``SlotCache`` allocated at start, and two threads:

- the scheduler admits waiting images into free slots (lowest first, so busy slots stay packed
  and a step covers few idle rows), hands prefilled slots to the decode step, runs one step for
  every decoding slot (on CUDA a captured graph, one host sync), and resolves a caption's Future
  the moment it ends, its slot free for the next image;
- the prefill thread runs the vision tower and the prompt (in chunks) into newcomers' slots
  beside the decode steps (on CUDA on a stream of its own), so running captions never wait.

Each row samples with its own settings and seed (``worker/engine/sampling.py``). The prompt, pixels and
reply trimming are the ``transformers`` backend's: greedy captions are ``generate``'s tokens.
"""

from __future__ import annotations

import heapq
import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future

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
from worker.engine.memory import plan_capacity, plan_slots
from worker.engine.model_runner import ModelRunner
from worker.engine.prefill import InFlight, Prefilled, prefill_admitted
from worker.model.captioner import Captioner, PreparedImage

log = logging.getLogger(__name__)


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
        super().__init__(captioner)
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
        self._waiting: deque[InFlight] = deque()
        # Admitted groups for the prefill thread, and its results for the scheduler.
        self._to_prefill: deque[list[tuple[InFlight, int]]] = deque()
        self._prefilled: list[Prefilled] = []
        self._active: dict[int, InFlight] = {}
        self._free: list[int] = []
        self._ready = False
        self._ready_lock = threading.Lock()

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
            self.slots, self.slot_reason = plan_slots(
                self.requested_slots,
                text_config=model.config.get_text_config(),
                dtype=model.dtype,
                device=device,
                capacity=self.capacity,
                memory_fraction=self.kv_memory_fraction,
            )
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
            self._ready = True
            log.info(
                "engine ready in %.1f s: %s; %d tokens a slot, KV cache %.2f GiB",
                time.monotonic() - started,
                self.describe(),
                self.capacity,
                self._runner.cache.nbytes / 2**30,
            )

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
                # Ends by itself once the engine is closed and nothing is left to prefill.
                threading.Thread(target=self._prefill_run, name="joycap-prefill", daemon=True).start()
        return self

    def caption_one(self, item: CaptionInput, params: GenerationParams) -> CaptionOutput:
        """Prepare the image on this thread, then wait for its caption from the stream."""
        return wait_for_caption(self.submit(self.captioner.prepare(item), params), self.time_limit_s)

    def submit(self, prepared: PreparedImage, params: GenerationParams) -> Future[CaptionOutput]:
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        sequence = InFlight(prepared, params, seed=seed)
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

    # The scheduler thread: admits, activates prefilled slots, decodes.

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_work():
                    if self._closed and not self._waiting and not self._active:
                        self._cond.notify_all()  # the prefill thread exits too
                        return
                    self._cond.wait()
                admitted, alone = self._admit()
                if admitted:
                    self._to_prefill.append([(s, s.admission) for s in admitted])
                    self._cond.notify_all()
                ready, self._prefilled = self._prefilled, []
            try:
                for sequence in alone:
                    with self.watchdog.call("a generate call for a caption longer than a slot"):
                        self._caption_alone(sequence)
                for outcome in ready:
                    self._activate(outcome)
                if any(s.tokens for s in self._active.values()):
                    with self.watchdog.call(f"a decode step of {len(self._active)} captions"):
                        self._step()
            except Exception as exc:  # noqa: BLE001 - every failure is handed to its captions
                self._recover(without_frames(exc))

    def _has_work(self) -> bool:
        decoding = any(s.tokens for s in self._active.values())
        return decoding or bool(self._prefilled) or bool(self._waiting and self._free)

    # The prefill thread: vision tower and prompt into newcomers' slots, beside the decode steps.

    def _prefill_run(self) -> None:
        while True:
            with self._cond:
                while not self._to_prefill:
                    if self._closed and not self._waiting and not self._active:
                        return
                    self._cond.wait()
                entries = self._to_prefill.popleft()
            outcomes = prefill_admitted(self._runner, entries, self.watchdog)
            with self._cond:
                self._prefilled.extend(outcomes)
                self._cond.notify_all()

    def _activate(self, outcome: Prefilled) -> None:
        """On the scheduler thread, between two steps: prefilled slots join the decode step."""
        # Only slots still held by the admission that was prefilled (not released, not restarted).
        pairs = zip(outcome.sequences, outcome.admissions, strict=True)
        current = [s for s, n in pairs if self._active.get(s.slot) is s and s.admission == n]
        if outcome.failure is None:
            keep = {id(s) for s in current}
            live = [i for i, s in enumerate(outcome.sequences) if id(s) in keep]
            self._runner.activate([outcome.newcomers[i] for i in live], [outcome.first[i] for i in live])
            self._runner.all_greedy = all(s.params.is_greedy for s in self._active.values())
            for i in live:
                self._accept(outcome.sequences[i], outcome.first[i])
            return
        if is_out_of_memory(outcome.failure):
            self._recover(outcome.failure)
        elif len(current) == 1:
            self._release(current[0])
            settle(current[0].future, error=outcome.failure)
        else:
            # Narrowed down: each image of the failed group is prefilled alone.
            with self._cond:
                self._to_prefill.extend([(s, s.admission)] for s in current)
                self._cond.notify_all()

    def _admit(self) -> tuple[list[InFlight], list[InFlight]]:
        """Waiting images into free slots; and those too long for any slot, to caption alone."""
        admitted: list[InFlight] = []
        alone: list[InFlight] = []
        # A free slot is filled at once: holding newcomers back to share one prefill measured no
        # faster (a prefill costs the same per image at 1 or 16) and leaves slots idle.
        while self._waiting and self._free:
            sequence = self._waiting.popleft()
            if not sequence.restarts and not sequence.future.set_running_or_notify_cancel():
                continue
            if len(sequence.prepared.ids) + sequence.params.max_new_tokens > self.capacity:
                alone.append(sequence)
                continue
            sequence.slot = heapq.heappop(self._free)
            sequence.tokens = []
            sequence.admission += 1
            self._active[sequence.slot] = sequence
            admitted.append(sequence)
        self.most_in_flight = max(self.most_in_flight, len(self._active))
        if admitted and len(self._active) > len(admitted):
            self.joined_mid_flight += len(admitted)
        return admitted, alone

    def _caption_alone(self, sequence: InFlight) -> None:
        # A prompt plus max_new_tokens longer than a slot: rare (a huge custom prompt, thousands
        # of new tokens), so it takes transformers' own generate rather than a bigger cache.
        try:
            [output] = self.captioner.generate([sequence.prepared], sequence.params)
        except Exception as exc:  # noqa: BLE001
            settle(sequence.future, error=without_frames(exc))
        else:
            settle(sequence.future, result=output)

    def _step(self) -> None:
        """One token for every busy slot."""
        decoding = {slot: s for slot, s in self._active.items() if s.tokens}
        kv_length = max(len(s.prepared.ids) + len(s.tokens) for s in decoding.values())
        new = self._runner.decode(max(self._active) + 1, kv_length)
        self.steps_run += 1
        for slot, sequence in decoding.items():
            self._accept(sequence, new[slot])

    def _accept(self, sequence: InFlight, token: int) -> None:
        sequence.tokens.append(token)
        if sequence.future.done():  # timed out or handed back: nobody waits for the rest
            self._release(sequence)
        elif token in self._stop_set or len(sequence.tokens) >= sequence.params.max_new_tokens:
            self._finish(sequence)

    def _finish(self, sequence: InFlight) -> None:
        text, output_tokens = self.captioner.encoder.decode_reply(sequence.tokens)
        output = CaptionOutput(text, prompt_tokens=len(sequence.prepared.ids), output_tokens=output_tokens)
        self._release(sequence)
        settle(sequence.future, result=output)

    def _release(self, sequence: InFlight) -> None:
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
            # Every slot is given up, so every prefill still queued is stale.
            self._to_prefill.clear()
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
