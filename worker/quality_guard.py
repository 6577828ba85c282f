"""The quality guard's worker half: check each caption, caption a flagged one again, keep the best.

JoyCaption glitches on 1.5-3% of captions (loops to the token limit, runaway tag lists); a fresh
sample usually does not repeat the glitch, so a flagged caption is captioned again with a new
seed (a greedy job with sampling at the default temperature: greedy would give the same glitch)
up to ``quality_retries`` times, and the least bad attempt is kept (the first ``ok`` one ends the
loop). The job stays ``done`` either way: the flags are data, and filters act on them.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from typing import Any

from joycap_queue.captions.quality import (
    CleanupRules,
    QualityThresholds,
    assess,
    badness,
    is_tag_list,
    quality_of,
)
from joycap_queue.config import Settings
from worker.backends.base import CaptionInput, CaptionOutput, GenerationParams

DEFAULT_SAMPLING = GenerationParams()


@dataclass
class GuardedCaption:
    output: CaptionOutput
    caption: str  # the kept reply after the clean-up rules
    raw: str | None  # the kept reply before them; None when no rule is set
    quality: str
    attempts: int
    flags: list[list[str]]


def thresholds_of(settings: Settings) -> QualityThresholds:
    return QualityThresholds(
        repeat_share=settings.quality_repeat_share,
        min_repeats=settings.quality_min_repeats,
        junk_share=settings.quality_junk_share,
        duplicate_tags=settings.quality_duplicate_tags,
    )


def retry_params(params: GenerationParams, attempt: int) -> GenerationParams:
    """A fresh sample for re-try ``attempt`` (1, 2, …): a seeded job stays repeatable."""
    seed = secrets.randbits(31) if params.seed is None else (params.seed + 7919 * attempt) % 2**31
    if params.is_greedy:
        return dataclasses.replace(
            params,
            greedy=False,
            temperature=DEFAULT_SAMPLING.temperature,
            top_p=DEFAULT_SAMPLING.top_p,
            top_k=DEFAULT_SAMPLING.top_k,
            seed=seed,
        )
    return dataclasses.replace(params, seed=seed)


def caption_guarded(
    captioner: Any,
    item: CaptionInput,
    params: GenerationParams,
    *,
    caption_type: str | None,
    cleanup: CleanupRules,
    settings: Settings,
) -> GuardedCaption:
    """Caption ``item`` through ``captioner.caption_one``, again while flagged, within the re-tries."""
    tag_list = is_tag_list(caption_type)
    limits = thresholds_of(settings)
    tries: list[tuple[CaptionOutput, str, list[str]]] = []
    for attempt in range(1 + settings.quality_retries):
        used = params if attempt == 0 else retry_params(params, attempt)
        output = captioner.caption_one(item, used)
        text = cleanup.apply(output.caption, tag_list=tag_list) if cleanup.active else output.caption
        flags = assess(
            text,
            output_tokens=output.output_tokens,
            max_new_tokens=used.max_new_tokens,
            tag_list=tag_list,
            thresholds=limits,
        )
        tries.append((output, text, flags))
        if not flags:
            break
    # min keeps the first of equally bad attempts.
    kept = min(range(len(tries)), key=lambda i: badness(tries[i][2]))
    output, text, flags = tries[kept]
    return GuardedCaption(
        output=output,
        caption=text,
        raw=output.caption if cleanup.active else None,
        quality=",".join(flags) if flags else quality_of(flags),
        attempts=len(tries),
        flags=[t[2] for t in tries],
    )


def flags_json(guarded: GuardedCaption) -> str:
    return json.dumps(guarded.flags)
