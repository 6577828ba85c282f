"""Low VRAM and own checkpoints: --quantize 8bit|nf4, --lora, merge-lora, idle unload (the tiny model).

bitsandbytes 0.50 runs 8-bit and nf4 on the CPU, and peft builds an adapter offline exactly as
upstream's finetuning/train.py does, so every path here is the real one a GPU worker runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from joycap_queue.captions.modelspec import ModelSpec, spec_of
from joycap_queue.messaging.app import model_queue
from tests.support.jobs import jobs_in
from tests.support.services import Service, message_count, wait_until
from worker.model.lora import build_lora_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "adapter", seed=3)


def captions_of(result_stdout: str) -> dict[str, str]:
    records = [json.loads(line) for line in result_stdout.splitlines() if line.startswith("{")]
    return {Path(r["path"]).name: r["caption"] for r in records}


def caption_cli(service: Service, images: Path, *args: str) -> dict[str, str]:
    result = service.cli("caption", str(images), "--json", "--greedy", "--device", "cpu", *args, timeout=240)
    return captions_of(result.stdout)


def test_quantized_loading_keeps_the_vision_side_unquantized(tiny_model: Path) -> None:
    import bitsandbytes as bnb

    from worker.model.captioner import Captioner

    for mode, quantized in (("8bit", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)):
        captioner = Captioner(str(tiny_model), device="cpu", quantize=mode)
        captioner.load()
        kinds = {name: type(module) for name, module in captioner.model.named_modules()}
        language = [k for n, k in kinds.items() if ".language_model.layers." in n and n.endswith("q_proj")]
        assert language and all(k is quantized for k in language), mode
        untouched = [
            k
            for n, k in kinds.items()
            if ("vision_tower" in n or "multi_modal_projector" in n or n == "lm_head")
            and issubclass(k, torch.nn.Linear)
        ]
        assert untouched and all(k is torch.nn.Linear for k in untouched), mode
        assert captioner.weights_bytes > 0
        assert mode in captioner.describe()


def test_caption_quantized_and_with_an_adapter(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    adapter: Path,
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    image_factory(images, 3)
    service = service_for(sqlite_url)
    base = caption_cli(service, images)
    assert len(base) == 3
    for mode in ("8bit", "nf4"):
        quantized = caption_cli(service, images, "--quantize", mode)
        assert quantized.keys() == base.keys() and all(quantized.values()), mode
    with_adapter = caption_cli(service, images, "--lora", str(adapter))
    assert with_adapter.keys() == base.keys()
    # The adapter's weights are non-zero: greedy captions change.
    assert with_adapter != base

    merged = tmp_path / "merged"
    result = service.cli("model", "merge-lora", service.env["JOYCAP_MODEL"], str(adapter), str(merged))
    assert Path(result.stdout.strip()) == merged.resolve()
    assert caption_cli(service, images, "--model", str(merged)) == with_adapter
    again = service.cli(
        "model", "merge-lora", service.env["JOYCAP_MODEL"], str(adapter), str(merged), check=False
    )
    assert again.returncode != 0 and "is not empty" in again.stderr and "Traceback" not in again.stderr


def test_workers_take_only_their_own_model_quantization_and_adapter(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    adapter: Path,
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    image_factory(images, 2)
    service = service_for(sqlite_url)
    settings = service.settings()
    service.call("submit", str(images), "--greedy")
    service.call("submit", str(images), "--greedy", "--quantize", "nf4")
    service.call("submit", str(images), "--greedy", "--lora", str(adapter))
    # The same image with the same options again: nothing new (the dedup key includes both).
    again = service.call("submit", str(images), "--greedy", "--lora", str(adapter))
    assert "queued 0" in again.stdout
    jobs = jobs_in(sqlite_url)
    assert len(jobs) == 6
    spec = spec_of(settings.model, "none", str(adapter))
    assert {(j.quantize, j.adapter, j.adapter_hash) for j in jobs} == {
        ("none", "", ""),
        ("nf4", "", ""),
        ("none", spec.adapter, spec.adapter_hash),
    }

    plain = service.start_worker(name="plain")
    wait_until(
        lambda: sorted(j.status for j in jobs_in(sqlite_url)) == ["done"] * 2 + ["queued"] * 4,
        timeout=120,
        what="the plain worker's jobs",
    )
    plain.stop()
    # Not failed, not counted: still waiting in their own queues for a worker that serves them.
    waiting = [j for j in jobs_in(sqlite_url) if j.status == "queued"]
    assert [(j.attempts, j.error) for j in waiting] == [(0, None)] * 4
    assert message_count(settings) == 4
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    assert client.llen(model_queue(settings.queue, ModelSpec(settings.model, "nf4").key)) == 2
    assert client.llen(model_queue(settings.queue, spec.key)) == 2

    service.start_worker("--quantize", "nf4", name="nf4")
    wait_until(
        lambda: [j.status for j in jobs_in(sqlite_url) if j.quantize == "nf4"] == ["done"] * 2,
        timeout=120,
        what="the nf4 worker's jobs",
    )
    service.start_worker("--lora", str(adapter), name="lora")
    wait_until(
        lambda: all(j.status == "done" for j in jobs_in(sqlite_url)),
        timeout=120,
        what="the adapter worker's jobs",
    )
    by_spec: dict[tuple[str, str], dict[str, str]] = {}
    for job in jobs_in(sqlite_url):
        by_spec.setdefault((job.quantize, job.adapter_hash), {})[Path(job.path).name] = job.caption or ""
    # Greedy: the adapter changes what the worker writes, as it does in `caption --lora`.
    assert by_spec[("none", spec.adapter_hash)] != by_spec[("none", "")]
    assert by_spec[("none", spec.adapter_hash)] == caption_cli(service, images, "--lora", str(adapter))

    results = service.call("results", "--json")
    records = json.loads(results.stdout)
    assert {(r["quantize"], r["adapter_hash"]) for r in records} == {
        ("none", ""),
        ("nf4", ""),
        ("none", spec.adapter_hash),
    }


def test_idle_unload_frees_the_model_and_the_next_job_loads_it(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    service = service_for(sqlite_url)
    image_factory(tmp_path / "first", 1)
    image_factory(tmp_path / "second", 1, seed=5)
    worker = service.start_worker("--idle-unload-s", "1", name="idle")
    service.call("submit", str(tmp_path / "first"))
    wait_until(lambda: [j.status for j in jobs_in(sqlite_url)] == ["done"], timeout=60, what="the first job")
    wait_until(lambda: "model unloaded" in worker.log(), timeout=30, what="the idle unload")

    # `status` and Celery's stats (what Flower's worker page shows) say idle-unloaded, not dead.
    def worker_line() -> str:
        lines = [
            line for line in service.call("status").stdout.splitlines() if line.strip().startswith("idle@")
        ]
        return lines[0] if lines else ""

    wait_until(lambda: "idle-unloaded" in worker_line(), timeout=30, what="status: the worker idle-unloaded")
    from joycap_queue.messaging.app import make_celery

    stats = make_celery(service.settings()).control.inspect(timeout=5).stats() or {}
    assert [s["joycap"]["state"] for s in stats.values()] == ["idle-unloaded"]
    assert worker.process.poll() is None

    service.call("submit", str(tmp_path / "second"))
    wait_until(
        lambda: [j.status for j in jobs_in(sqlite_url)] == ["done", "done"], timeout=90, what="the second job"
    )
    assert "model loaded again for a new job" in worker.log()
    wait_until(lambda: worker.log().count("model unloaded") >= 2, timeout=30, what="a second unload")


def test_a_bad_adapter_is_one_line_at_start_and_fails_no_job(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    tiny_model: Path,
    adapter: Path,
    tmp_path: Path,
) -> None:
    import shutil

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    images = tmp_path / "images"
    image_factory(images, 2)
    service = service_for(sqlite_url)
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    service.call("submit", str(images), "--lora", str(copy))

    # Corrupt weights: the file cut short after the jobs were queued.
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # Another base: an adapter trained on a model of another width.
    config = LlavaConfig.from_pretrained(tiny_model)
    config.text_config.hidden_size = 96
    other_base = tmp_path / "other-base"
    LlavaForConditionalGeneration(config).save_pretrained(other_base)
    wrong = build_lora_adapter(other_base, tmp_path / "wrong", seed=1)
    # A folder with no adapter in it.
    empty = tmp_path / "empty"
    empty.mkdir()

    cases = {
        "missing": (str(tmp_path / "nowhere"), "adapter folder not found"),
        "not an adapter": (str(empty), "is not a LoRA adapter"),
        "corrupt": (str(copy), "is corrupt"),
        "wrong base": (str(wrong), "cannot apply the LoRA adapter"),
    }
    for case, (folder, message) in cases.items():
        for command in (["worker"], ["caption", str(images)]):
            result = service.cli(*command, "--device", "cpu", "--lora", folder, check=False, timeout=120)
            assert result.returncode != 0, (case, command)
            assert message in result.stderr, (case, command, result.stderr)
            assert "Traceback" not in result.stderr, (case, command)
            assert (
                len([line for line in result.stderr.splitlines() if line.startswith(("Error", "Usage"))]) == 1
            )
    assert [(j.status, j.attempts, j.error) for j in jobs_in(sqlite_url)] == [("queued", 0, None)] * 2
    missing = service.cli("submit", str(images), "--lora", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 2 and "adapter folder not found" in missing.stderr
    assert "Traceback" not in missing.stderr
