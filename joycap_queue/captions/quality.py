"""Caption quality guard, the detection half: flag glitched captions, and the opt-in clean-up rules.

JoyCaption Beta One's release notes put its glitch rate at 1.5-3% of captions: loops to the token
limit, runaway lists, looping tag lists. ``assess`` names what is wrong as flags (failures as data;
the raw text is kept), ``badness`` picks the least bad attempt. Pure stdlib: it runs on every caption.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# Worst first; ``badness`` compares attempts in this order. Junk and empty carry nothing usable
# (junk would also poison a training set); a loop buries the real description under filler; a
# truncated caption lost only its end (a runaway list shows up here: it needs no repeat to run
# to the limit); duplicate tags cost nothing that ``dedupe_tags`` cannot fix.
FLAGS = ("junk", "empty", "repetitive", "truncated", "duplicate-tags")
# Every caption type of both checkpoints that asks for tags (data/joycaption-prompts.json); kept
# in code so that importing this module does no I/O, and the tests check it against the JSON.
TAG_LIST_TYPES = frozenset(
    f"{name} tag list" for name in ("booru", "booru-like", "danbooru", "e621", "rule34")
)


@dataclass(frozen=True)
class QualityThresholds:
    """When ``assess`` flags a caption; JoyCaption writes 20-260-word paragraphs or Booru tag lists.

    repeat_ngram=3, min_repeats=3: prose reuses words and 2-grams ("in the") all the time, a 3-gram
        at most twice ("in the background"); a third copy in the tail is a loop's, which goes on.
    repeat_tail_words=80: a loop runs to the end, so the tail shows it; 80 words hold three copies
        of a 25-word sentence, about JoyCaption's longest (tag lists: 40 tags, two words a tag).
    repeat_share=0.5: a loop covers close to all of the tail, natural prose a few percent (0.19 for
        a deliberately repetitive art-critic paragraph): half leaves a wide margin both ways.
    repeat_char_ngram=6, repeat_tail_chars=160: text without spaces (Chinese, Japanese, Thai) is
        cut into characters; a word there is about two, so 6 and 160 match 3 and 80 words.
    run_min_chars=16: a 1-4 character unit back to back ("!!!!", "hahaha") loops from 16
        characters; shorter runs are ellipses, laughter or big numbers.
    junk_share=0.3: replacement, control and private-use characters and leaked tokens ("Ġ", "<0x0A>")
        in the visible text, symbols half (emoji are real in posts); broken output is near 1.0.
    duplicate_tags=2: surplus tag copies that flag a tag list; one repeat in 40 tags is a common
        slip that dedupe_tags fixes, two mean the list began to cycle.
    """

    repeat_ngram: int = 3
    repeat_tail_words: int = 80
    repeat_share: float = 0.5
    min_repeats: int = 3
    repeat_char_ngram: int = 6
    repeat_tail_chars: int = 160
    run_min_chars: int = 16
    junk_share: float = 0.3
    duplicate_tags: int = 2


_CONTENT = re.compile(r"[^\W_]")  # a letter or a digit, in any script
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
# Scripts written without spaces between words: kana, CJK ideographs, Thai and Lao. Hangul is
# written with spaces, so Korean stays on words.
_NO_SPACE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\u0e00-\u0eff]")
_RUN = re.compile(r"(.{1,4}?)\1{3,}", re.DOTALL)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# GPT-2 byte-level space, newline and tab, and SentencePiece's space: seen as text only when a
# model decodes raw tokens. Lower-case ġ/ċ, the usual Maltese letters, are not among them.
_TOKEN_MARKS = frozenset("ĠĊĉ▁")
_JUNK_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_ASCII_SYMBOLS = str.maketrans("", "", "$+<=>^`|~")


def assess(
    caption: str,
    *,
    output_tokens: int | None,
    max_new_tokens: int | None,
    ended: bool | None = None,
    tag_list: bool = False,
    thresholds: QualityThresholds = QualityThresholds(),
) -> list[str]:
    """The flags of one caption, worst first (see ``FLAGS``); an empty list means it looks fine.

    ``ended`` says whether generation stopped on an end token; when it is unknown, a caption
    that used all of ``max_new_tokens`` counts as cut off.
    """
    if ended is None and output_tokens is not None and max_new_tokens is not None:
        ended = output_tokens < max_new_tokens
    found = {"truncated"} if ended is False else set()
    text = caption.strip()
    if text and _junk_share(text) >= thresholds.junk_share:
        found.add("junk")
    elif not _CONTENT.search(text):
        found.add("empty")
    else:
        tags = [tag for tag in map(_tag_key, text.split(",")) if tag] if tag_list else []
        if _repetitive(text, tags, thresholds):
            found.add("repetitive")
        if len(tags) - len(set(tags)) >= thresholds.duplicate_tags:
            found.add("duplicate-tags")
    return [flag for flag in FLAGS if flag in found]


def quality_of(flags: Iterable[str]) -> str:
    """The worst of ``flags``, or "ok": the one value a quality column or a summary needs."""
    present = set(flags)
    return next((flag for flag in FLAGS if flag in present), min(present, default="ok"))


def badness(flags: Iterable[str]) -> tuple[int, ...]:
    """A sort key, smaller is better: ``min(attempts, key=badness)`` is the least bad attempt.

    One 0/1 per flag, worst first, so any attempt without junk beats one with junk whatever else
    is wrong with either; flags this version does not know (an older row) come last.
    """
    present = set(flags)
    return (*(int(flag in present) for flag in FLAGS), len(present.difference(FLAGS)))


def is_tag_list(caption_type: str | None) -> bool:
    """Whether a JoyCaption caption type (either checkpoint, any case) asks for a tag list."""
    return caption_type is not None and " ".join(caption_type.lower().split()) in TAG_LIST_TYPES


def _junk_share(text: str) -> float:
    visible = "".join(text.split()) or " "
    if visible.isascii() and visible.isprintable() and "<0x" not in visible:
        # The common case, without a Python loop over the characters: only ASCII symbols remain.
        return 0.5 * (len(visible) - len(visible.translate(_ASCII_SYMBOLS))) / len(visible)
    junk = 0.0
    for chunk in text.split():
        if _BYTE_TOKEN.search(chunk) or not _TOKEN_MARKS.isdisjoint(chunk):
            junk += len(chunk)  # a decoded raw token: the letters glued to the marker are junk too
            continue
        for char in chunk:
            category = "Cn" if char == "\ufffd" else unicodedata.category(char)
            junk += 1.0 if category in _JUNK_CATEGORIES else 0.5 if category[0] == "S" else 0.0
    return junk / len(visible)


def _tag_key(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())


def _repetitive(text: str, tags: list[str], limits: QualityThresholds) -> bool:
    tail = text[-limits.repeat_tail_chars :]
    run = max((m.end() - m.start() for m in _RUN.finditer(tail)), default=0)
    if run >= limits.run_min_chars and run >= limits.repeat_share * len(tail):
        return True
    if len(_NO_SPACE.findall(tail)) >= 0.3 * len(tail):
        share = _covered_share(_CONTENT.findall(tail.lower()), limits.repeat_char_ngram, limits.min_repeats)
    else:
        # Splitting on spaces first keeps the regex off the head of a long caption.
        chunks = " ".join(text.split()[-limits.repeat_tail_words :]).lower()
        words = _WORD.findall(chunks)[-limits.repeat_tail_words :]
        share = _covered_share(words, limits.repeat_ngram, limits.min_repeats)
    # A tag that keeps coming back between others ("sky, cloud, sky, sea, sky") repeats no 3-gram.
    tag_share = _covered_share(tags[-(limits.repeat_tail_words // 2) :], 1, limits.min_repeats)
    return max(share, tag_share) >= limits.repeat_share


def _covered_share(units: list[str], n: int, min_repeats: int) -> float:
    """The share of ``units`` inside an n-gram that occurs at least ``min_repeats`` times."""
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    counts = Counter(grams)
    covered = {
        i for start, gram in enumerate(grams) if counts[gram] >= min_repeats for i in range(start, start + n)
    }
    return len(covered) / max(len(units), 1)


_MEDIUM = r"(?:photo(?:graph)?|image|picture|illustration|painting|drawing|sketch|render(?:ing)?|artwork|screenshot|snapshot)"
# At most two describing words ("digital", "high-resolution color"), never an article or a verb,
# so that "This is a woman holding a painting of ..." is not taken for a lead-in.
_ADJECTIVES = r"(?:(?!(?:a|an|the|of|in|on|with|and|is|are)\b)[\w-]+\s+){0,2}"
_LEAD_IN = re.compile(
    rf"""^(?:(?:(?:this|the)\s+{_MEDIUM}|this)\s+is\s+an?\s+{_ADJECTIVES}{_MEDIUM}\s+of\s+
    |(?:this|the)\s+{_ADJECTIVES}{_MEDIUM}\s+(?:shows|depicts|features|captures|showcases|portrays|presents|displays|illustrates)\s+
    |in\s+this\s+{_MEDIUM}\s*,\s*)""",
    re.IGNORECASE | re.VERBOSE,
)
# After these the rest is no caption: "The image shows that ...", "shows off a car", "shows us a cat".
_UNSAFE_NEXT = frozenset({"that", "how", "what", "why", "where", "when", "whether", "off", "up", "us", "you"})


def strip_lead_in(text: str) -> str:
    """Drop an opening such as "This image is a photograph of" or "In this image," when the rest reads
    as a caption on its own (its first letter capitalized); anything else comes back unchanged."""
    match = _LEAD_IN.match(text.lstrip())
    rest = text.lstrip()[match.end() :] if match else ""
    words = rest.split()
    if len(words) < 2 or not rest[0].isalnum() or words[0].lower().strip(",.") in _UNSAFE_NEXT:
        return text
    if words[0][1:] != words[0][1:].lower():
        return rest  # "iPhone", "eBay": capitalizing would misspell the name
    return rest[0].upper() + rest[1:]


# Words that end in a period without ending a sentence, single letters (initials) among them.
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "no", "fig", "inc", "ltd"}
) | {*("e.g", "i.e", "vs", "cf", "ca", "approx", "co", "u.s", "a.m", "p.m"), *"abcdefghijklmnopqrstuvwxyz"}
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+|[。！？]+[\"'”’」』)]*\s*|\n\s*")


def _sentences(text: str) -> list[str]:
    """``text`` cut into sentences, each with its trailing whitespace: they join back to ``text``."""
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        before = text[start : match.start()].rsplit(maxsplit=1) or [""]
        word, end = before[-1].lower(), match.end()
        # Not an end: "e.g. a", "Dr. Smith", "J. R. R.", and a list number ("1. A cat") before its item.
        held = word in _ABBREVIATIONS or (len(before) == 1 and word.isdigit())
        if text[match.start()] in ".!?" and end < len(text) and (held or text[end].islower()):
            continue
        pieces.append(text[start:end])
        start = end
    return [*pieces, text[start:]] if start < len(text) else pieces


def drop_sentences(text: str, patterns: list[str]) -> str:
    """``text`` without the sentences in which any pattern (a regex, any case) is found; raises
    ValueError naming the pattern when one is not a valid regex, or is empty."""
    compiled = []
    for pattern in patterns:
        if not pattern:
            raise ValueError("empty drop pattern: it would drop every sentence")
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as error:
            raise ValueError(f"invalid drop pattern {pattern!r}: {error}") from None
    if not any(regex.search(text) for regex in compiled):
        return text  # the usual case, without cutting the text into sentences
    pieces = _sentences(text)
    kept = [piece for piece in pieces if not any(regex.search(piece) for regex in compiled)]
    return text if len(kept) == len(pieces) else "".join(kept).strip()


def dedupe_tags(text: str) -> str:
    """A comma-separated tag list without repeated tags, first occurrences in order, separators kept;
    tags compare ignoring case, spacing and underscores ("Red_hair" is "red hair")."""
    parts = re.split(r"(\s*,\s*)", text)
    seen, out = {_tag_key(parts[0])}, [parts[0]]
    for separator, tag in zip(parts[1::2], parts[2::2], strict=True):
        key = _tag_key(tag)
        if not key or key not in seen:  # an empty tag (",,") is the list's own business
            seen.add(key)
            out += [separator, tag]
    return "".join(out)


@dataclass(frozen=True)
class CleanupRules:
    """The clean-up rules a request opted into, applied when its caption is stored (raw kept)."""

    strip_lead_in: bool = False
    drop_sentences: tuple[str, ...] = ()
    dedupe_tags: bool = False

    def __post_init__(self) -> None:
        drop_sentences("", list(self.drop_sentences))  # a bad pattern fails here, at submit

    @property
    def active(self) -> bool:
        return self.strip_lead_in or bool(self.drop_sentences) or self.dedupe_tags

    def to_json(self) -> str:
        if not self.active:
            return "{}"
        return json.dumps(
            {
                "strip_lead_in": self.strip_lead_in,
                "drop_sentences": list(self.drop_sentences),
                "dedupe_tags": self.dedupe_tags,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> CleanupRules:
        data = json.loads(text or "{}")
        return cls(
            strip_lead_in=bool(data.get("strip_lead_in")),
            drop_sentences=tuple(data.get("drop_sentences") or ()),
            dedupe_tags=bool(data.get("dedupe_tags")),
        )

    def apply(self, text: str, *, tag_list: bool) -> str:
        # Tag lists have no sentences or lead-ins: only de-duplication applies to them.
        if tag_list:
            return dedupe_tags(text) if self.dedupe_tags else text
        if self.drop_sentences:
            text = drop_sentences(text, list(self.drop_sentences))
        if self.strip_lead_in:
            text = strip_lead_in(text)
        return text
