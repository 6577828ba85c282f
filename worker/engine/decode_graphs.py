"""The decode step captured as CUDA graphs, one per bucket of slot counts, replayed per step.

A decode step of an 8B model is a few hundred small kernels; launched from Python through
transformers' modules they cost more than the GPU takes to run them. Captured once at worker
start, a step is one ``replay()``: the inputs (tokens, positions, sampling controls) and the KV
cache are tensors the graph reads in place, so the scheduler only writes them between replays.
A graph is captured per bucket (1, 2, 4, ... slots), and a step runs the smallest bucket that
holds every busy slot. Graphs share one memory pool, captured largest first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def decode_buckets(slots: int) -> list[int]:
    """Powers of two up to ``slots``, and ``slots`` itself."""
    buckets = [1]
    while buckets[-1] * 2 < slots:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != slots:
        buckets.append(slots)
    return buckets


class DecodeGraphs:
    def __init__(self, graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]], seconds: float) -> None:
        self._graphs = graphs
        self._buckets = sorted(graphs)
        self.seconds = seconds

    @classmethod
    def capture(
        cls, body: Callable[[int], torch.Tensor], buckets: list[int], reset: Callable[[], None]
    ) -> DecodeGraphs | None:
        """Capture ``body(bucket)`` for each bucket; None (eager decode) if capturing fails."""
        started = time.monotonic()
        graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        try:
            with torch.inference_mode():
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for bucket in buckets:  # warm-up: lazy inits and autotuning stay out of the graphs
                        body(bucket)
                torch.cuda.current_stream().wait_stream(stream)
                for bucket in sorted(buckets, reverse=True):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = body(bucket)
                    pool = graph.pool()
                    graphs[bucket] = (graph, out)
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - eager decode still works, only slower
            log.warning("CUDA graph capture failed, decoding eagerly: %s", str(exc).splitlines()[:1])
            reset()
            return None
        reset()
        seconds = time.monotonic() - started
        log.info("captured %d decode graphs (%s slots) in %.1f s", len(graphs), buckets, seconds)
        return cls(graphs, seconds)

    def replay(self, count: int) -> torch.Tensor:
        """Run the smallest bucket that covers slots ``0 .. count-1``; its next tokens."""
        bucket = next(b for b in self._buckets if b >= count)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out

    def describe(self) -> str:
        return f"CUDA graphs for {len(self._buckets)} buckets up to {self._buckets[-1]} (captured in {self.seconds:.1f} s)"
