"""Next tokens for every slot at once, each row with its own sampling settings and its own seed.

A row's random numbers come from a counter-based hash of (its seed, its step, the token id),
not from a generator shared by the batch, so a seeded caption is the same whoever its batchmates
are, on a restart, and on the CPU or a GPU; and the whole step is tensor ops, which a CUDA graph
captures. Sampling is the exponential race (Gumbel-max): the token with the largest
``probability / Exp(1) noise`` is an exact draw from the filtered distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


@dataclass
class RowControls:
    """Per-slot sampling state on the device, updated in place (a CUDA graph reads it as inputs)."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32; 1 = off
    seed: torch.Tensor  # int64
    step: torch.Tensor  # int64: tokens generated so far
    min_new: torch.Tensor  # int64: no stop token before this many tokens
    forced_end: torch.Tensor  # int64: a stop token exactly at this many tokens; 0 = none

    @classmethod
    def allocate(cls, slots: int, device: torch.device | str) -> RowControls:
        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(slots, dtype=dtype, device=device)

        controls = cls(
            zeros(torch.float32),
            zeros(torch.int64),
            zeros(torch.float32),
            zeros(torch.int64),
            zeros(torch.int64),
            zeros(torch.int64),
            zeros(torch.int64),
        )
        controls.top_p.fill_(1.0)
        return controls

    def set_row(
        self,
        row: int,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        min_new: int,
        forced_end: int,
    ) -> None:
        self.temperature[row] = temperature
        self.top_k[row] = top_k
        self.top_p[row] = top_p
        self.seed[row] = seed & 0x7FFFFFFF
        self.step[row] = 0
        self.min_new[row] = min_new
        self.forced_end[row] = forced_end

    def select(self, rows: slice | torch.Tensor) -> RowControls:
        """The controls of some rows: views for a slice (writes reach these tensors), else copies."""
        return RowControls(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer mix in int64 arithmetic: every product stays below 2**59, so CPU and CUDA
    # give the same bits.
    x = x & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` floats in (0, 1), a pure function of (seed, step, token id)."""
    token = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    row_key = _hash32(seed * 0x9E3779B1 + step * 0x85EBCA77)
    bits = _hash32(row_key[:, None] ^ _hash32(token * 0xC2B2AE3D + 0x27D4EB2F)[None, :])
    return (bits.to(torch.float64) + 0.5).div(2.0**32).to(torch.float32)


def constrain_stops(logits: torch.Tensor, controls: RowControls, stop_ids: torch.Tensor) -> None:
    """No stop token before a row's ``min_new``; only a stop token at its ``forced_end``."""
    step = controls.step
    banned = step < torch.maximum(controls.min_new, controls.forced_end - 1)
    stop_logits = logits[:, stop_ids]
    logits[:, stop_ids] = torch.where(banned[:, None], torch.finfo(logits.dtype).min, stop_logits)
    forced = (controls.forced_end > 0) & (step == controls.forced_end - 1)
    only_stop = torch.full_like(logits, torch.finfo(logits.dtype).min)
    # A 1-element index tensor, not stop_ids[0]: indexing with a 0-d tensor reads it on the host,
    # which a CUDA graph cannot capture.
    only_stop[:, stop_ids[:1]] = 0.0
    logits.copy_(torch.where(forced[:, None], only_stop, logits))


def next_tokens(logits: torch.Tensor, controls: RowControls) -> torch.Tensor:
    """One token per row from float32 ``[rows, vocab]`` logits: greedy rows take the argmax."""
    greedy = logits.argmax(dim=-1)
    temperature = controls.temperature
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    values, order = scaled.sort(dim=-1, descending=True)
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    # top-p keeps the most likely tokens until their mass reaches p (the first is always kept).
    keep = before < controls.top_p[:, None]
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)
    top_k = torch.where(controls.top_k > 0, controls.top_k, vocab)
    keep &= ranks[None, :] < top_k[:, None]
    noise = uniform_noise(controls.seed, controls.step, vocab).gather(1, order)
    race = torch.where(keep, probs / -noise.log(), torch.zeros_like(probs))
    sampled = order.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
    return torch.where(temperature > 0, sampled, greedy)
