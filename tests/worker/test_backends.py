"""The backends behind one interface: shared preprocessing, openai over real HTTP, null, vllm (marked)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from joycap_queue.config import Settings
from tests.support.jobs import all_finished, jobs_in
from tests.support.openai_server import openai_server
from tests.support.services import Service, wait_until
from worker.backends import ModelLoadError, make_backend
from worker.backends.base import CaptionInput, GenerationParams, squish_resize
from worker.backends.null import NULL_CAPTION, NullBackend
from worker.backends.openai_http import OpenAIBackend, ServerError
from worker.model.captioner import Captioner
from worker.model.preprocess import preprocess_image

SYSTEM = "You are a helpful image captioner."
GREEDY = GenerationParams(greedy=True, max_new_tokens=10)
API_KEY = "sk-joycap-test-4f1d"


@pytest.fixture(scope="module")
def captioner(tiny_model: Path) -> Captioner:
    loaded = Captioner(str(tiny_model), device="cpu", dtype="float32")
    loaded.load()
    return loaded


def items() -> list[CaptionInput]:
    return [
        CaptionInput(Image.new("RGB", (300, 120), (200, 30, 30)), "Write a short caption.", SYSTEM),
        CaptionInput(Image.new("RGBA", (64, 64), (0, 0, 255, 128)), "Describe.", SYSTEM),
        CaptionInput(Image.new("L", (500, 700), 90), "List the objects in this picture.", SYSTEM),
    ]


def test_squish_resize_is_the_resize_preprocessing_does() -> None:
    for item in items():
        once = squish_resize(item.image, 384)
        assert once.size == (384, 384) and once.mode == "RGB"
        assert squish_resize(once, 384) is once
        assert preprocess_image(once, 384).equal(preprocess_image(item.image, 384))


def test_forced_length(captioner: Captioner) -> None:
    forced = GenerationParams(greedy=True, max_new_tokens=9, min_new_tokens=9)
    assert [o.output_tokens for o in captioner.caption(items(), forced)] == [9, 9, 9]
    assert forced.to_dict()["min_new_tokens"] == 9
    assert "min_new_tokens" not in GenerationParams().to_dict()
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=4, min_new_tokens=5)


def test_make_backend_picks_by_name(tmp_path: Path) -> None:
    base = {"data_dir": tmp_path, "model": "some/model"}
    assert isinstance(make_backend(Settings(**base, backend="transformers")), Captioner)
    null = make_backend(Settings(**base, backend="null"))
    assert isinstance(null, NullBackend) and null.model_id == "some/model"
    with pytest.raises(ModelLoadError, match="--openai-url"):
        make_backend(Settings(**base, backend="openai"))
    remote = make_backend(Settings(**base, backend="openai", openai_url="http://127.0.0.1:9/v1"))
    assert isinstance(remote, OpenAIBackend) and not remote.batches


def test_vllm_backend_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without the [vllm] extra
    backend = make_backend(Settings(data_dir=tmp_path, backend="vllm", batch_size=16))
    with pytest.raises(ModelLoadError, match=r"joycap-queue\[vllm\]"):
        backend.load()


def test_null_backend_runs_no_model() -> None:
    outputs = NullBackend("m").caption(items(), GREEDY)
    assert [(o.caption, o.output_tokens) for o in outputs] == [(NULL_CAPTION, 0)] * 3


# openai: a real HTTP server serving the tiny model through the transformers backend


def test_openai_backend_matches_the_local_model(captioner: Captioner) -> None:
    expected = captioner.caption(items(), GREEDY)
    with openai_server(captioner, "joy/tiny", api_key=API_KEY) as (url, served):
        remote = OpenAIBackend("joy/tiny", base_url=url, api_key=API_KEY)
        remote.load()
        assert remote.caption(items(), GREEDY) == expected
    body = served.requests[0]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 10 and body["model"] == "joy/tiny"
    assert body["messages"][0] == {"role": "system", "content": SYSTEM}


def test_openai_backend_keeps_many_requests_in_flight(captioner: Captioner) -> None:
    batch = items() * 2
    with openai_server(captioner, "joy/tiny", batch_size=6, wait_ms=3000) as (url, served):
        remote = OpenAIBackend("joy/tiny", base_url=url)
        with ThreadPoolExecutor(len(batch)) as pool:
            outputs = list(pool.map(lambda item: remote.caption([item], GREEDY)[0], batch))
        # All six were at the server at once: it merged them into one batch.
        assert served.batcher.largest_batch == 6
    assert outputs == captioner.caption(batch, GREEDY)


def test_openai_backend_sends_sampling_settings() -> None:
    remote = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1")
    [prepared] = [remote.prepare(item) for item in items()[:1]]
    sampled = remote.request_body(
        prepared, GenerationParams(temperature=0.7, top_p=None, top_k=40, max_new_tokens=77)
    )
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["max_tokens"]) == (
        0.7,
        1.0,
        40,
        77,
    )
    assert "top_k" not in remote.request_body(prepared, GenerationParams())
    image_part = prepared.messages[1]["content"][0]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")


def test_openai_backend_refusals_are_one_line_without_the_key(captioner: Captioner) -> None:
    with openai_server(captioner, "joy/tiny", api_key=API_KEY) as (url, _served):
        with pytest.raises(ModelLoadError, match="serves joy/tiny, not other/model"):
            OpenAIBackend("other/model", base_url=url, api_key=API_KEY).load()
        wrong = OpenAIBackend("joy/tiny", base_url=url, api_key="sk-wrong")
        with pytest.raises(ModelLoadError, match="401: invalid API key") as refused:
            wrong.load()
        with pytest.raises(ServerError) as caught:
            wrong.generate([wrong.prepare(items()[0])], GREEDY)
        for message in (str(refused.value), str(caught.value)):
            assert "401" in message and "sk-wrong" not in message and "\n" not in message
    with pytest.raises(ModelLoadError, match="cannot use the server"):
        OpenAIBackend("joy/tiny", base_url=url).load()
    with pytest.raises(ModelLoadError, match="not an http"):
        OpenAIBackend("joy/tiny", base_url="ftp://example/v1")


def test_worker_with_the_openai_backend(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    captioner: Captioner,
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 6)
    service = service_for(sqlite_url)
    with openai_server(captioner, service.env["JOYCAP_MODEL"], api_key=API_KEY) as (url, served):
        service.env.update(JOYCAP_OPENAI_API_KEY=API_KEY)
        worker = service.start_worker("--backend", "openai", "--openai-url", url, "-c", "6")
        service.call("submit", str(tmp_path / "in"), "--greedy")
        wait_until(all_finished(sqlite_url, 6), timeout=120, what="6 jobs via the openai backend")
    jobs = jobs_in(sqlite_url)
    assert [job.status for job in jobs] == ["done"] * 6, [job.error for job in jobs]
    assert all(job.prompt_tokens and job.prompt_tokens > 729 for job in jobs)
    assert len(served.requests) == 6
    log = worker.log()
    assert "openai backend" in log and API_KEY not in log


def test_worker_with_the_null_backend_says_so(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 5)
    service = service_for(sqlite_url)
    worker = service.start_worker("--backend", "null", "-b", "4")
    service.call("submit", str(tmp_path / "in"))
    wait_until(all_finished(sqlite_url, 5), timeout=60, what="5 jobs via the null backend")
    assert [job.caption for job in jobs_in(sqlite_url)] == [NULL_CAPTION] * 5
    assert "null backend: no model runs" in worker.log()


@pytest.mark.vllm
def test_vllm_backend_on_a_gpu(tmp_path: Path) -> None:
    from bench.model import build_random_joycaption
    from worker.backends.vllm_engine import VllmBackend

    folder = build_random_joycaption(tmp_path / "small", size="small")
    backend = VllmBackend(str(folder), dtype="bfloat16", max_batch_size=4, gpu_memory_utilization=0.5)
    outputs = backend.caption(items(), GenerationParams(greedy=True, max_new_tokens=12))
    local = Captioner(str(folder), device="cuda", dtype="bfloat16")
    expected_prompt_tokens = [len(local.encode_prompt(i.prompt, i.system_prompt)) for i in items()]
    assert [o.prompt_tokens for o in outputs] == expected_prompt_tokens
    assert all(0 < o.output_tokens <= 12 for o in outputs)
    forced = backend.caption(items(), GenerationParams(greedy=True, max_new_tokens=7, min_new_tokens=7))
    assert [o.output_tokens for o in forced] == [7, 7, 7]
