"""The quality guard through a real worker: flagged captions are captioned again, the verdict stored.

One tiny model is built to loop (every position predicts the same word), as JoyCaption does on
its 1.5-3% of glitched captions; the plain tiny model with a 4-token limit is truncated each time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.support.jobs import jobs_in
from tests.support.services import Service, wait_until


def build_looping_model(tiny: Path, out: Path) -> tuple[Path, str]:
    """The tiny model with its decoder layers silenced and lm_head made to pick one word always."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    shutil.copytree(tiny, out)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    word = next(
        token
        for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        if token.startswith("Ġ") and token[1:].isalpha() and len(token) >= 5
    )
    word_id = tokenizer.convert_tokens_to_ids(word)
    model = LlavaForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    text = model.model.language_model
    with torch.no_grad():
        for layer in text.layers:
            # Each block adds nothing to the residual stream: the last hidden state is the last
            # token's embedding (normed), whatever came before.
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        shared = torch.randn(text.config.hidden_size)
        shared /= shared.norm()
        embeddings = model.get_input_embeddings().weight
        embeddings += 3.0 * shared * embeddings.norm(dim=1, keepdim=True).mean()
        model.lm_head.weight.zero_()
        model.lm_head.weight[word_id] = 60.0 * shared
    model.save_pretrained(out)
    return out, tokenizer.convert_tokens_to_string([word]).strip()


@pytest.fixture(scope="module")
def looping_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return build_looping_model(tiny_model, tmp_path_factory.mktemp("looping") / "model")


def test_a_looping_model_is_flagged_repetitive_after_its_retries(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    looping_model: tuple[Path, str],
    tmp_path: Path,
) -> None:
    model, word = looping_model
    image_factory(tmp_path / "images", 2)
    service = service_for(sqlite_url)
    service.env.update(JOYCAP_MODEL=str(model), JOYCAP_QUALITY_RETRIES="1")
    # Unseeded, as users run by default (a re-try then draws a fresh seed): the loop is in the
    # weights, so chance cannot change what this test sees.
    del service.env["JOYCAP_SEED"]
    service.call("submit", str(tmp_path / "images"), "--greedy")
    worker = service.start_worker()
    wait_until(
        lambda: [j.status for j in jobs_in(sqlite_url)] == ["done", "done"], timeout=120, what="the jobs"
    )
    for job in jobs_in(sqlite_url):
        assert (job.caption or "").split()[:3] == [word] * 3
        # Greedy first, then one sampled re-try: the loop is in the weights, so both loop.
        assert job.caption_attempts == 2
        flags = json.loads(job.quality_flags)
        assert len(flags) == 2 and all("repetitive" in attempt for attempt in flags)
        assert job.quality is not None and "repetitive" in job.quality.split(",")
    assert "caption flagged repetitive" in worker.log()


def test_truncated_captions_are_retried_and_kept_done(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "images", 3)
    service = service_for(sqlite_url)
    service.env.update(JOYCAP_QUALITY_RETRIES="2")
    # Seeded: the sampled re-tries are the same in every run (the engine's sampling is per image).
    service.call(
        "submit",
        str(tmp_path / "images"),
        *("--max-new-tokens", "4", "--seed", "3"),
        *("--sidecar", "txt", "--skip-flagged-sidecars"),
    )
    service.start_worker()
    wait_until(lambda: all(j.status == "done" for j in jobs_in(sqlite_url)), timeout=120, what="the jobs")
    jobs = jobs_in(sqlite_url)
    assert len(jobs) == 3
    for job in jobs:
        assert job.caption_attempts == 3
        flags = json.loads(job.quality_flags)
        assert len(flags) == 3 and all("truncated" in attempt for attempt in flags)
        assert "truncated" in (job.quality or "").split(",")
        assert job.caption and job.output_tokens == 4
    # Asked for sidecars, but not of flagged captions; `results --quality ok` leaves them out too.
    assert list((tmp_path / "images").glob("*.txt")) == []
    assert json.loads(service.call("results", "--quality", "ok", "--json").stdout) == []
    assert len(json.loads(service.call("results", "--quality", "truncated", "--json").stdout)) == 3
    assert "flagged" in service.call("status").stdout


def test_clean_up_rules_change_the_stored_caption_and_keep_the_raw_one(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    looping_model: tuple[Path, str],
    tmp_path: Path,
) -> None:
    model, word = looping_model
    image_factory(tmp_path / "images", 1)
    service = service_for(sqlite_url)
    service.env.update(JOYCAP_MODEL=str(model))
    # The looping caption is one run-on sentence of the same word: dropping the sentences that
    # mention it leaves nothing, which the guard then flags as empty.
    service.call(
        "submit", str(tmp_path / "images"), "--greedy", "--drop-sentences", word, "--prepend", "tag, "
    )
    plain = tmp_path / "plain"
    image_factory(plain, 1)
    service.call("submit", str(plain), "--greedy", "--prepend", "tag, ")
    service.start_worker()
    wait_until(lambda: all(j.status == "done" for j in jobs_in(sqlite_url)), timeout=120, what="the jobs")
    cleaned, untouched = jobs_in(sqlite_url)
    assert json.loads(cleaned.cleanup)["drop_sentences"] == [word]
    assert cleaned.caption == "tag, "
    assert (cleaned.raw_caption or "").startswith(f"tag, {word} {word}")
    assert cleaned.quality is not None and "empty" in cleaned.quality.split(",")
    # Without rules nothing is dropped and no raw copy is kept.
    assert (untouched.caption or "").startswith(f"tag, {word}") and untouched.raw_caption is None
    raw = service.call("export", "--raw", "-o", str(tmp_path / "raw.jsonl"))
    assert raw.returncode == 0
    exported = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert any(
        record["caption"].startswith(f"tag, {word} {word}")
        for record in exported
        if record["id"] == cleaned.id
    )
