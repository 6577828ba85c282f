"""The quality guard on crafted glitches and on clean JoyCaption-style captions that must stay ok."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from joycap_queue.captions.quality import (
    FLAGS,
    TAG_LIST_TYPES,
    QualityThresholds,
    assess,
    badness,
    dedupe_tags,
    drop_sentences,
    is_tag_list,
    quality_of,
    strip_lead_in,
)

JSON_PATH = Path(__file__).resolve().parents[2] / "joycap_queue" / "data" / "joycaption-prompts.json"
MAX = 300  # max_new_tokens in these tests


def flags_of(caption: str, *, tokens: int = 120, tag_list: bool = False, **kwargs: object) -> list[str]:
    return assess(caption, output_tokens=tokens, max_new_tokens=MAX, tag_list=tag_list, **kwargs)  # type: ignore[arg-type]


# Clean captions, written the way JoyCaption Alpha Two and Beta One write them.
LONG_DESCRIPTIVE = (
    "This is a photograph of a young woman standing in the middle of a sunlit wheat field during the "
    "late afternoon. She has long, wavy auburn hair that falls past her shoulders and is wearing a "
    "flowing white linen dress with thin straps and a loose, ankle-length skirt that moves slightly "
    "in the breeze. Her skin is fair with a light dusting of freckles across her nose and cheeks, and "
    "she is smiling softly with her eyes half closed, her face tilted toward the sun. In her right "
    "hand she holds a small bouquet of wildflowers, including purple cornflowers, white daisies and "
    "a few red poppies. The wheat around her is tall and golden, reaching up to her waist, and the "
    "stalks in the foreground are slightly out of focus. In the background, a line of dark green "
    "trees stretches across the horizon beneath a pale blue sky with a few thin, wispy clouds. The "
    "sunlight comes from the left side of the frame, casting a warm glow on the left side of her "
    "face and creating a soft halo of light around her hair. The photograph is taken from a low "
    "angle, which makes the woman appear tall against the sky. The overall mood of the image is "
    "calm, warm and nostalgic, and the colors are dominated by golds, creams and soft blues."
)
ART_CRITIC = (
    "The painting presents a still life arranged on a dark wooden table: a pewter jug, a half-peeled "
    "lemon whose rind spirals over the edge of the table, a glass of red wine and a loaf of bread. "
    "The light falls from the upper left and picks out the rim of the glass, the wet flesh of the "
    "lemon and the dull sheen of the pewter, while the background dissolves into a warm brown "
    "darkness. The palette is restrained, built from browns, ochres and muted yellows, with the red "
    "of the wine as the only strong accent. The brushwork is smooth and nearly invisible in the "
    "objects, looser in the background. The composition follows the conventions of Dutch Golden Age "
    "still life painting of the seventeenth century, and the peeled lemon, the wine and the bread "
    "can be read as symbols of the passing of time and of the pleasures of the table. The painting "
    "of the jug, the painting of the glass and the painting of the lemon each show a careful study "
    "of reflected light, and the artist repeats the same warm tone in the table, in the bread and in "
    "the background, so that the whole picture holds together."
)
STRAIGHTFORWARD = (
    "A red fox sits in fresh snow at the edge of a pine forest, its bushy tail wrapped around its "
    "front paws. Snowflakes cling to its fur. The fox looks to the right of the frame. The background "
    "is blurred white and dark green."
)
BOORU_TAGS = (
    "1girl, solo, long hair, looking at viewer, smile, open mouth, blue eyes, blonde hair, shirt, "
    "long sleeves, hair ornament, holding, standing, full body, flower, outdoors, sky, shoes, day, "
    "hair flower, white shirt, cloud, blue sky, skirt, bag, white socks, kneehighs, tree, grass, "
    "pleated skirt, blue skirt, school uniform, serafuku, sailor collar, red neckerchief, "
    "cherry blossoms, petals, spring (season), school bag, brown footwear, loafers, wind, "
    "floating hair, arms behind back, depth of field, blurry background, anime coloring"
)
CHINESE = (
    "这是一张在城市街头拍摄的照片。画面中央是一位年轻男子，他穿着黑色的皮夹克和蓝色牛仔裤，背着一个灰色的双肩包，"
    "正低头看着手中的手机。他身后是一条繁忙的马路，几辆出租车和公交车正在行驶，路边的店铺挂着红色和黄色的招牌。"
    "天空阴沉，地面有些潮湿，看起来刚下过雨。照片的色调偏冷，整体给人一种匆忙而安静的都市氛围。"
)
JAPANESE = (
    "夕暮れの海辺で撮影された写真です。砂浜に一匹の柴犬が座り、海の方を見つめています。空はオレンジ色とピンク色に"
    "染まり、波が静かに打ち寄せています。画面の右側には古い木製の桟橋があり、遠くに小さな船が浮かんでいます。"
)
NUMBERS_AND_LISTS = (
    "A product photo of a stainless steel kitchen scale on a white background. The digital display "
    "reads 1.5 kg, and the buttons below it are labeled 1. TARE, 2. UNIT and 3. ON/OFF. Features "
    "listed on the box: capacity 5 kg, precision 1 g, size 20 x 15 x 2 cm, weight 0.8 kg, batteries "
    "2 x AAA included. Price: $19.99 (was $24.99), 20% off."
)
SOCIAL_MEDIA = (
    "Golden hour at the beach never gets old 🌅✨ Who else is counting down to summer? #sunset #beachlife"
)
GERMAN = (
    "Ein Schwarzweißfoto einer alten Straßenbahn, die über eine Kopfsteinpflasterstraße fährt. "
    "Links stehen Häuser mit verzierten Fassaden, rechts gehen zwei Fußgänger mit Regenschirmen."
)
RUSSIAN = (
    "Фотография осеннего парка: дорожка, усыпанная жёлтыми и красными листьями, ведёт к деревянной "
    "скамейке. По обеим сторонам растут высокие клёны, сквозь ветви пробивается мягкий свет."
)
CLEAN = {
    "long descriptive": LONG_DESCRIPTIVE,
    "art critic": ART_CRITIC,
    "straightforward": STRAIGHTFORWARD,
    "chinese": CHINESE,
    "japanese": JAPANESE,
    "numbers and lists": NUMBERS_AND_LISTS,
    "social media": SOCIAL_MEDIA,
    "german": GERMAN,
    "russian": RUSSIAN,
    "very short": "A cat.",
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_captions_are_ok(name: str) -> None:
    assert flags_of(CLEAN[name]) == []
    assert quality_of(flags_of(CLEAN[name])) == "ok"


def test_clean_booru_tag_list_is_ok_as_tags_and_as_prose() -> None:
    assert len(BOORU_TAGS.split(",")) > 40
    assert flags_of(BOORU_TAGS, tag_list=True) == []
    assert flags_of(BOORU_TAGS) == []


def test_long_caption_that_ended_on_its_own_is_not_truncated() -> None:
    assert flags_of(LONG_DESCRIPTIVE, tokens=299, ended=True) == []
    assert flags_of(LONG_DESCRIPTIVE, tokens=MAX, ended=True) == []


def test_truncated_from_token_count_or_from_ended() -> None:
    assert flags_of(STRAIGHTFORWARD, tokens=MAX) == ["truncated"]
    assert flags_of(STRAIGHTFORWARD, tokens=MAX + 5) == ["truncated"]
    assert flags_of(STRAIGHTFORWARD, tokens=10, ended=False) == ["truncated"]
    assert assess(STRAIGHTFORWARD, output_tokens=None, max_new_tokens=None) == []
    assert assess(STRAIGHTFORWARD, output_tokens=None, max_new_tokens=None, ended=False) == ["truncated"]


def test_sentence_loop_cut_at_the_token_limit() -> None:
    loop = (
        STRAIGHTFORWARD
        + " The woman is wearing a dress."
        + " The woman is wearing a dress." * 40
        + " The woman"
    )
    assert flags_of(loop, tokens=MAX) == ["repetitive", "truncated"]
    assert quality_of(flags_of(loop, tokens=MAX)) == "repetitive"


def test_loop_that_starts_late_in_a_long_caption() -> None:
    loop = LONG_DESCRIPTIVE + " She is smiling and she is happy and" * 12
    assert "repetitive" in flags_of(loop, tokens=MAX)
    # The same paragraph with only two copies of that clause is prose, not a loop.
    assert flags_of(LONG_DESCRIPTIVE + " She is smiling and she is happy." * 2) == []


def test_tag_list_loop() -> None:
    loop = "1girl, solo, " + "red hair, " * 50 + "red"
    assert flags_of(loop, tokens=MAX, tag_list=True) == ["repetitive", "truncated", "duplicate-tags"]
    cycle = BOORU_TAGS + ", " + "blue sky, cloud, ocean, " * 20
    assert "repetitive" in flags_of(cycle, tag_list=True)


def test_tag_that_keeps_coming_back_is_caught_on_tag_units() -> None:
    # No word 3-gram repeats here; only counting tags sees the loop.
    loop = "1girl, sky, cloud, sky, sea, sky, sun, sky, tree, sky"
    assert flags_of(loop, tag_list=True) == ["repetitive", "duplicate-tags"]
    assert flags_of(loop) == []


def test_long_single_token_run() -> None:
    assert "repetitive" in flags_of("A photo of a " + "very " * 80, tokens=MAX)
    assert "repetitive" in flags_of("A cat sitting on a mat" + "!" * 200, tokens=MAX)
    assert "repetitive" in flags_of("The sign says " + "ha" * 60)
    # Short runs are ordinary text.
    assert flags_of("A sign that reads 'hahaha' hangs on the wall... The population is 1,000,000.") == []


def test_cjk_loop_falls_back_to_characters() -> None:
    loop = CHINESE + "她穿着一条红色的连衣裙。" * 20
    assert "repetitive" in flags_of(loop, tokens=MAX)
    assert "repetitive" in flags_of(JAPANESE + "桟橋があります、" * 25, tokens=MAX)
    # Without punctuation the loop is one long "word": only character n-grams see it.
    assert "repetitive" in flags_of(CHINESE + "她穿着一条红色的连衣裙" * 20, tokens=MAX)


@pytest.mark.parametrize("text", ["", "   \n\t ", "...", " - , ; ", "!!!", "“”"])
def test_empty(text: str) -> None:
    assert flags_of(text) == ["empty"]


@pytest.mark.parametrize(
    "text",
    [
        "\ufffd" * 40,
        "A cat " + "\ufffd\ufffd\ufffd " * 20,
        "\x00\x01\x02\x03\x1b[0m" * 10,
        "ĠtheĠcatĠsatĊĊ<0x0A><0x0A>ĠĊ<0x0A>" * 5,
        "\ue000\ue001\ue002 \ue003" * 10,
        "⣿⣷⡄ ░▒▓█ ■□▪ " * 10,
    ],
)
def test_junk(text: str) -> None:
    assert flags_of(text) == ["junk"]


def test_a_little_junk_in_a_good_caption_is_not_junk() -> None:
    assert flags_of(LONG_DESCRIPTIVE + " \ufffd\ufffd") == []
    # Maltese has Ġ at the start of some capitalised words.
    assert flags_of("Ġgantija hija tempju antik f'Għawdex, mibni mill-ġebel.") == []


def test_duplicate_tags_only_for_tag_lists_and_beyond_the_threshold() -> None:
    tags = "1girl, solo, red hair, Red_Hair, blue eyes, smile, red  hair, outdoors, smile"
    assert flags_of(tags, tag_list=True) == ["duplicate-tags"]
    assert flags_of(tags) == []
    one_slip = "1girl, solo, red hair, blue eyes, smile, outdoors, smile"
    assert flags_of(one_slip, tag_list=True) == []
    assert flags_of(one_slip, tag_list=True, thresholds=QualityThresholds(duplicate_tags=1)) == [
        "duplicate-tags"
    ]


def test_thresholds_are_used() -> None:
    text = "a b c a b c a b c d e f g h i j k l m n o p"
    assert flags_of(text) == []
    assert flags_of(text, thresholds=QualityThresholds(repeat_share=0.3)) == ["repetitive"]


def test_flag_order_and_quality_of() -> None:
    assert set(FLAGS) == {"truncated", "repetitive", "empty", "junk", "duplicate-tags"}
    assert quality_of([]) == "ok"
    assert quality_of(["truncated", "repetitive"]) == "repetitive"
    assert quality_of(["duplicate-tags", "junk"]) == "junk"
    assert quality_of(["some-future-flag"]) == "some-future-flag"


def test_badness_picks_the_least_bad_attempt() -> None:
    attempts = [["junk"], ["repetitive", "truncated"], ["truncated", "duplicate-tags"], ["repetitive"]]
    assert min(attempts, key=badness) == ["truncated", "duplicate-tags"]
    assert min([*attempts, []], key=badness) == []
    assert badness(["empty"]) > badness(["repetitive", "truncated", "duplicate-tags"])
    assert badness(["truncated"]) < badness(["truncated", "duplicate-tags"])
    assert badness(["unknown"]) > badness([])


def test_tag_list_types_match_the_prompt_vocabulary() -> None:
    vocabulary = json.loads(JSON_PATH.read_text(encoding="utf-8"))
    in_json = {
        name
        for profile in ("alpha-two", "beta-one")
        for name in vocabulary[profile]["caption_types"]
        if "tag" in name.lower()
    }
    assert {name.lower() for name in in_json} == TAG_LIST_TYPES
    for name in in_json:
        assert is_tag_list(name)
    assert is_tag_list("  danbooru  TAG list ")
    for name in ("Descriptive", "Straightforward", "MidJourney", "Stable Diffusion Prompt", "", None):
        assert not is_tag_list(name)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("This image is a photograph of a red fox sitting in snow.", "A red fox sitting in snow."),
        ("This is a digital illustration of a knight on a horse.", "A knight on a horse."),
        ("This is a high-resolution color photograph of two cats.", "Two cats."),
        ("The image shows a busy street at night. Cars pass by.", "A busy street at night. Cars pass by."),
        ("The image depicts the Eiffel Tower at dawn.", "The Eiffel Tower at dawn."),
        ("In this image, a man is fixing a bicycle.", "A man is fixing a bicycle."),
        ("  This photograph captures a hummingbird in flight.", "A hummingbird in flight."),
        ("The image shows iPhone screenshots side by side.", "iPhone screenshots side by side."),
    ],
)
def test_strip_lead_in(before: str, after: str) -> None:
    assert strip_lead_in(before) == after


@pytest.mark.parametrize(
    "text",
    [
        "A red fox sitting in snow.",
        "This image is a photograph.",
        "The image is dark and blurry, with a cat in the corner.",
        "The image shows that the photographer stood very close.",
        "The image shows off a vintage car.",
        "The image shows us a quiet lake.",
        "The image shows, in the foreground, a dog.",
        "The image shows (from left to right) a cat and a dog.",
        "This is a woman holding a painting of a ship.",
        "This image shows a",
        "1girl, solo, long hair",
        "",
    ],
)
def test_strip_lead_in_leaves_unsafe_text_unchanged(text: str) -> None:
    assert strip_lead_in(text) == text


def test_drop_sentences_watermark() -> None:
    text = "A woman stands in a field. There is a Watermark in the bottom right corner. The sky is blue."
    assert drop_sentences(text, ["watermark"]) == "A woman stands in a field. The sky is blue."
    assert drop_sentences(text, ["no such thing"]) == text
    assert drop_sentences(text, []) == text
    assert drop_sentences("A watermark reads 'stock'.", ["watermark"]) == ""


def test_drop_sentences_does_not_split_abbreviations_or_decimals() -> None:
    text = (
        "Several fruits, e.g. apples and pears, sit on a table 1.5 m wide. Dr. Smith signed it. "
        "No watermark is visible! The light is soft."
    )
    assert drop_sentences(text, ["watermark"]) == (
        "Several fruits, e.g. apples and pears, sit on a table 1.5 m wide. Dr. Smith signed it. The light is soft."
    )
    assert (
        drop_sentences(text, ["pears"]) == "Dr. Smith signed it. No watermark is visible! The light is soft."
    )
    assert drop_sentences(text, ["smith"]) == (
        "Several fruits, e.g. apples and pears, sit on a table 1.5 m wide. No watermark is visible! The light is soft."
    )


def test_drop_sentences_regex_newlines_and_cjk() -> None:
    text = "A cat on a sofa.\nText reads 'SALE 50%'.\nThe sofa is green."
    assert drop_sentences(text, [r"text\s+reads"]) == "A cat on a sofa.\nThe sofa is green."
    assert (
        drop_sentences("一只猫在沙发上。右下角有水印。沙发是绿色的。", ["水印"])
        == "一只猫在沙发上。沙发是绿色的。"
    )
    assert drop_sentences("1. A cat. 2. A dog with a watermark. 3. A bird.", ["watermark"]) == (
        "1. A cat. 3. A bird."
    )
    # A number that ends a sentence still ends it; a lower-case word after a period continues it.
    assert (
        drop_sentences("The scale reads 20. A watermark is visible.", ["watermark"]) == "The scale reads 20."
    )
    text = "A bus in the U.K. on a rainy day has a watermark. The sky is grey."
    assert drop_sentences(text, ["watermark"]) == "The sky is grey."


@pytest.mark.parametrize("pattern", ["water(mark", "[a-", "*watermark"])
def test_drop_sentences_bad_regex_names_the_pattern(pattern: str) -> None:
    with pytest.raises(ValueError) as raised:
        drop_sentences("Some text.", ["fine", pattern])
    message = str(raised.value)
    assert repr(pattern) in message
    assert "\n" not in message


def test_drop_sentences_rejects_an_empty_pattern() -> None:
    with pytest.raises(ValueError, match="empty"):
        drop_sentences("Some text.", [""])


def test_dedupe_tags() -> None:
    assert dedupe_tags("1girl, solo, red hair, Red_Hair, smile, solo") == "1girl, solo, red hair, smile"
    assert dedupe_tags("a,b,a,c,b") == "a,b,c"
    assert dedupe_tags("sky , cloud , sky , sea") == "sky , cloud , sea"
    assert dedupe_tags("red hair, red hair, red hair,") == "red hair,"
    assert dedupe_tags(BOORU_TAGS) == BOORU_TAGS
    assert dedupe_tags("") == ""
    assert dedupe_tags(BOORU_TAGS + ", smile, " + BOORU_TAGS) == BOORU_TAGS
