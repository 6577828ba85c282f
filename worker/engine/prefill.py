"""The continuous engine's prefill: newcomers' images and prompts into their slots' KV cache.

The engine's prefill thread runs `prefill_admitted` beside the decode steps (on CUDA on a stream
of its own), so running captions never wait; the scheduler activates what it hands back.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from worker.backends.base import CaptionOutput, GenerationParams
from worker.batcher import CallWatchdog, without_frames
from worker.engine.model_runner import ModelRunner, Newcomer
from worker.model.captioner import PreparedImage


@dataclass(eq=False)  # identity: two captions of the same image are still two
class InFlight:
    """One caption asked of the engine, from waiting to its slot's last token."""

    prepared: PreparedImage
    params: GenerationParams
    future: Future[CaptionOutput] = field(default_factory=Future)
    seed: int = 0
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    restarts: int = 0
    # Counts admissions, so a prefill of an earlier one (restarted since) is told apart and dropped.
    admission: int = 0


@dataclass
class Prefilled:
    """What the prefill thread hands the scheduler: slots ready to decode, or a failure."""

    sequences: list[InFlight]
    admissions: list[int]
    newcomers: list[Newcomer]
    first: list[int]
    failure: Exception | None = None


def prefill_admitted(
    runner: ModelRunner, entries: Sequence[tuple[InFlight, int]], watchdog: CallWatchdog
) -> list[Prefilled]:
    """Prefilled groups, one per prompt length; a failure stops the rest and is returned."""
    admitted = [sequence for sequence, _ in entries]
    admission = {id(sequence): number for sequence, number in entries}
    outcomes: list[Prefilled] = []
    left = list(admitted)
    try:
        with watchdog.call(f"a prefill of {len(admitted)} images"):
            features = runner.image_features([s.prepared.pixels for s in admitted])
            groups: dict[int, list[tuple[InFlight, Newcomer]]] = {}
            for sequence, feature in zip(admitted, features, strict=True):
                newcomer = Newcomer(
                    sequence.slot,
                    sequence.prepared.ids,
                    feature,
                    sequence.params,
                    sequence.seed,
                    sequence.prepared.forced_length or 0,
                )
                groups.setdefault(len(newcomer.ids), []).append((sequence, newcomer))
            for members in groups.values():
                first = runner.prefill([n for _, n in members])
                done = [s for s, _ in members]
                outcomes.append(
                    Prefilled(done, [admission[id(s)] for s in done], [n for _, n in members], first)
                )
                left = [s for s in left if all(s is not m for m in done)]
    except Exception as exc:  # noqa: BLE001 - handed to the scheduler with its images
        numbers = [admission[id(s)] for s in left]
        outcomes.append(Prefilled(left, numbers, [], [], without_frames(exc)))
    return outcomes
