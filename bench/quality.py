"""What the caption quality guard costs per caption, next to what the caption itself costs.

2,000 captions drawn once with a fixed seed, in JoyCaption's proportions: descriptive paragraphs of
100-260 words (70%), Booru tag lists of 20-60 tags (25%) and glitches (5%, above the 1.5-3% of
Beta One's release notes so that the slow paths are in the figure: sentence loops to the token
limit, tag loops, character runs, junk). Each caption goes through ``assess`` and the clean-up
rules a user would turn on (lead-in, a watermark sentence, duplicate tags). The caption's own
cost is read from results.json (the smallest per-caption time there, so the share is the
largest it can be), not measured again: it takes minutes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from bench.common import RESULTS, machine, print_table, record
from joycap_queue.captions.quality import assess, dedupe_tags, drop_sentences, strip_lead_in

CAPTIONS = 2000
SEED = 20261203
MAX_NEW_TOKENS = 300
RUNS = 5  # best of: the figure is microseconds on a shared machine

SUBJECTS = [
    "a young woman",
    "an old man",
    "a tabby cat",
    "a red fox",
    "a little girl",
    "a knight",
    "a golden retriever",
]
COLORS = ["red", "blue", "pale green", "golden", "dark brown", "white", "charcoal grey", "mustard yellow"]
THINGS = ["wooden bench", "stone wall", "bicycle", "lantern", "umbrella", "teapot", "bookshelf", "sailboat"]
PLACES = ["a misty forest", "a crowded market", "a quiet beach", "a snowy street", "a sunlit kitchen"]
# Each template at most once a caption, as in a real paragraph; the slots vary the wording.
TEMPLATES = [
    "The photograph shows {s} standing in {p}.",
    "{S} is wearing a {c} coat with large buttons and a matching scarf wrapped twice around the neck.",
    "To the left there is a {t} painted {c}, slightly out of focus.",
    "The background is filled with {p}, rendered in soft, muted tones.",
    "Light enters from the upper right corner and casts long shadows across the ground.",
    "A {c} {t} leans against the far wall, its surface scratched and worn by years of use.",
    "{S} looks directly at the camera with a calm, slightly curious expression.",
    "Small details such as a {c} ribbon and a chipped {t} give the scene a lived-in feeling.",
    "The composition follows the rule of thirds, placing the subject off center.",
    "In the foreground, fallen leaves and a few pebbles are scattered over the path.",
    "The sky above is overcast, a flat {c} that makes the colors below look richer.",
    "Behind {s}, a second figure is partly hidden by a {t}.",
    "The overall mood is quiet and reflective, almost nostalgic.",
    "Fine grain is visible in the darker areas, suggesting the image was taken on film.",
    "A thin line of text runs along the bottom edge, too small to read.",
    "There is a faint watermark in the lower right corner.",
    "The colors are dominated by {c} and {c2}, with occasional touches of bright orange.",
    "Reflections on the wet ground double the shapes of the {t} and the nearby lamps.",
    "The camera angle is slightly low, which makes {s} appear taller.",
    "Several birds are perched on a wire that crosses the upper part of the frame.",
    "The edges of the frame are darker than the center, a gentle vignette.",
    "Near the center, a {c} {t} catches most of the light.",
    "The texture of the fabric is sharp enough to show individual threads.",
    "Far away, the outline of hills fades into {p}.",
    "The shadows under the {t} are cool and blue against the warm highlights.",
]
TAG_TEXT = (
    "1girl, 1boy, solo, long hair, short hair, smile, open mouth, blue eyes, red eyes, green eyes, blonde hair, "
    "brown hair, black hair, white hair, shirt, skirt, dress, long sleeves, hat, ribbon, hair ornament, holding, "
    "sitting, standing, outdoors, indoors, sky, cloud, day, night, tree, flower, water, grass, school uniform, "
    "jacket, gloves, boots, thighhighs, looking at viewer, blush, closed eyes, bangs, animal ears, tail, "
    "simple background, white background, full body, upper body, cowboy shot, from side, depth of field, "
    "blurry background, sunlight, shadow, petals, cherry blossoms, rain, snow, umbrella, bag, weapon, sword"
)
TAGS = TAG_TEXT.split(", ")


@dataclass(frozen=True)
class Sample:
    text: str
    tag_list: bool
    output_tokens: int
    glitch: bool


def paragraph(draw: random.Random) -> str:
    words = draw.randint(100, 260)
    parts: list[str] = []
    for template in draw.sample(TEMPLATES, len(TEMPLATES)):
        if sum(len(p.split()) for p in parts) >= words:
            break
        s = draw.choice(SUBJECTS)
        c, c2 = draw.sample(COLORS, 2)
        text = template.format(
            s=s, S=s[0].upper() + s[1:], c=c, c2=c2, t=draw.choice(THINGS), p=draw.choice(PLACES)
        )
        parts.append(text)
    if draw.random() < 0.5:
        parts.insert(0, f"This image is a photograph of {draw.choice(SUBJECTS)} in {draw.choice(PLACES)}.")
    return " ".join(parts)


def glitch(draw: random.Random) -> Sample:
    kind = draw.randrange(4)
    if kind == 0:
        loop = paragraph(draw)[:400] + f" The {draw.choice(THINGS)} is {draw.choice(COLORS)}." * 40
        return Sample(loop, False, MAX_NEW_TOKENS, True)
    if kind == 1:
        tags = ", ".join(draw.sample(TAGS, 12)) + (", " + draw.choice(TAGS)) * 80
        return Sample(tags, True, MAX_NEW_TOKENS, True)
    if kind == 2:
        return Sample(paragraph(draw)[:300] + "!" * 250, False, MAX_NEW_TOKENS, True)
    return Sample("".join(draw.choice("\ufffdĠĊ\x00\x1b") for _ in range(200)), False, 180, True)


def tokens(text: str) -> int:
    # About four characters a token; a clean caption ended on its own, before the limit.
    return min(len(text) // 4, MAX_NEW_TOKENS - 1)


def samples() -> list[Sample]:
    draw = random.Random(SEED)
    out = []
    for _ in range(CAPTIONS):
        roll = draw.random()
        if roll < 0.05:
            out.append(glitch(draw))
        elif roll < 0.30:
            tags = ", ".join(draw.sample(TAGS, draw.randint(20, 60)))
            out.append(Sample(tags, True, tokens(tags), False))
        else:
            text = paragraph(draw)
            out.append(Sample(text, False, tokens(text), False))
    return out


def check(items: list[Sample], *, clean_up: bool) -> list[list[str]]:
    results = []
    for item in items:
        flags = assess(
            item.text, output_tokens=item.output_tokens, max_new_tokens=MAX_NEW_TOKENS, tag_list=item.tag_list
        )
        if clean_up:
            if item.tag_list:
                dedupe_tags(item.text)
            else:
                drop_sentences(strip_lead_in(item.text), ["watermark"])
        results.append(flags)
    return results


def best_us_per_caption(items: list[Sample], *, clean_up: bool) -> float:
    best = float("inf")
    for _ in range(RUNS):
        started = time.perf_counter()
        check(items, clean_up=clean_up)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


def caption_times_ms() -> dict[str, float]:
    """Per-caption times already in results.json, in milliseconds (1 / images per second)."""
    try:
        current = json.loads(RESULTS.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    times = {}
    gpu = current.get("gpu_transformers_b128_images_per_s")
    if gpu:
        times[f"JoyCaption, transformers batch 128, {current.get('gpu_card', 'GPU')}"] = 1000 / gpu
    engine = current.get("engine_detail", {}).get("images_per_s", {}).get("varied", {}).get("engine")
    if engine:
        times["tiny model, continuous engine, CPU (bench engine)"] = 1000 / engine
    return times


def main() -> None:
    items = samples()
    flags = check(items, clean_up=False)
    false_alarms = sum(1 for item, f in zip(items, flags, strict=True) if not item.glitch and f)
    caught = sum(1 for item, f in zip(items, flags, strict=True) if item.glitch and f and f != ["truncated"])
    glitches = sum(item.glitch for item in items)
    assess_us = best_us_per_caption(items, clean_up=False)
    total_us = best_us_per_caption(items, clean_up=True)
    rows: list[tuple[object, ...]] = [
        ("assess()", assess_us, ""),
        ("assess() + clean-up rules", total_us, ""),
    ]
    times = caption_times_ms()
    for name, ms in times.items():
        rows.append((f"one caption: {name}", ms * 1000, f"{total_us / (ms * 1000):.2e}"))
    print_table(
        f"Quality guard, {CAPTIONS} captions ({glitches} glitches), best of {RUNS}",
        ["step", "us per caption", "guard share"],
        rows,
    )
    print(
        f"glitches caught {caught} of {glitches}; clean captions flagged {false_alarms} of {CAPTIONS - glitches}"
    )
    share = total_us / (min(times.values()) * 1000) if times else None
    record(
        {
            "quality_check_us_per_caption": round(total_us, 2),
            "quality_check_share_of_caption": round(share, 6) if share is not None else None,
            "quality_detail": {
                "captions": CAPTIONS,
                "glitches": glitches,
                "glitches_caught": caught,
                "clean_flagged": false_alarms,
                "assess_us_per_caption": round(assess_us, 2),
                "share_against": min(times, key=times.__getitem__) if times else None,
                "caption_ms": {name: round(ms, 2) for name, ms in times.items()},
                "best_of": RUNS,
                "machine": machine(),
            },
        }
    )


if __name__ == "__main__":
    main()
