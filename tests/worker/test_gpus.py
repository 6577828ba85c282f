"""`worker --gpus`: one worker process per GPU, spawned by a parent that never touches CUDA.

On a machine without a GPU the children run the tiny model on the CPU (``--device auto``), so the
launcher itself (names, ``CUDA_VISIBLE_DEVICES``, supervision, shutdown) is tested for real; the
``gpu`` tests check the same on CUDA.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from joycap_queue.config import Settings
from joycap_queue.errors import JoycapError
from joycap_queue.ops.gpus import visible_gpus
from tests.support.jobs import all_finished, jobs_in
from tests.support.processes import children_of, environ_of
from tests.support.services import Service, wait_until
from worker.gpus import node_name, resolve_gpus


def test_gpu_lists(tmp_path: Path) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    (tmp_path / "0000:01:00.0").mkdir()
    (tmp_path / "0000:02:00.0").mkdir()
    assert visible_gpus({}, nvidia_smi=None, proc_dir=tmp_path) == ["0", "1"]
    assert visible_gpus({}, nvidia_smi=None, proc_dir=tmp_path / "none") == []
    assert resolve_gpus("0,1,3") == ["0", "1", "3"]
    assert resolve_gpus("all", {"CUDA_VISIBLE_DEVICES": "1,2"}) == ["1", "2"]
    with pytest.raises(JoycapError, match="no NVIDIA GPU found"):
        resolve_gpus("all", {"CUDA_VISIBLE_DEVICES": ""})
    assert node_name(None, 0) == "gpu0@%h"
    assert node_name("w1@%h", 2) == "w1-gpu2@%h"


def test_gpus_setting_is_validated(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, gpus=" 0, 1,3").gpus == "0,1,3"
    assert Settings(data_dir=tmp_path, gpus="ALL").gpus == "all"
    for bad in ("0,0", "first", "0;1"):
        with pytest.raises(ValueError, match="gpus"):
            Settings(data_dir=tmp_path, gpus=bad)


def test_one_worker_per_gpu(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 12)
    service = service_for(sqlite_url)
    parent = service.start_worker("--gpus", "0,1", "-b", "1", "-c", "1", name="w")
    wait_until(lambda: parent.log().count(" ready.") >= 2, timeout=120, what="both GPU workers")
    children = children_of(parent.process.pid)
    assert len(children) == 2
    assert sorted(environ_of(pid)["CUDA_VISIBLE_DEVICES"] for pid in children) == ["0", "1"]
    assert all(environ_of(pid)["JOYCAP_GPUS"] == "" for pid in children)
    # The supervisor never loaded torch, so it cannot have touched CUDA before starting them.
    assert "libtorch" not in Path(f"/proc/{parent.process.pid}/maps").read_text()

    service.call("submit", str(tmp_path / "in"), "--greedy")
    wait_until(all_finished(sqlite_url, 12), timeout=180, what="12 jobs on two GPU workers")
    jobs = jobs_in(sqlite_url)
    assert [job.status for job in jobs] == ["done"] * 12
    assert {job.worker.split("@")[0] for job in jobs if job.worker} == {"w-gpu0", "w-gpu1"}

    os.kill(parent.process.pid, signal.SIGTERM)
    assert parent.process.wait(timeout=60) == 0
    assert all(
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text() for pid in children
    )


def test_gpus_all_without_a_gpu_says_so(sqlite_url: str, service_for: Callable[[str], Service]) -> None:
    service = service_for(sqlite_url)
    service.env["CUDA_VISIBLE_DEVICES"] = ""
    result = service.cli("worker", "--gpus", "all", check=False)
    assert result.returncode == 1
    assert "no NVIDIA GPU found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.gpu
def test_gpus_all_on_cuda(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 8)
    service = service_for(sqlite_url)
    parent = service.start_worker("--gpus", "all", "-b", "4")
    count = len(visible_gpus())
    wait_until(lambda: parent.log().count(" ready.") >= count, timeout=300, what="every GPU worker")
    assert parent.log().count("transformers on cuda") == count
    service.call("submit", str(tmp_path / "in"), "--greedy")
    wait_until(all_finished(sqlite_url, 8), timeout=300, what="8 jobs on the GPUs")
    assert [job.status for job in jobs_in(sqlite_url)] == ["done"] * 8


@pytest.mark.gpu
def test_real_out_of_memory_splits_batches(tiny_model: Path) -> None:
    import torch
    from PIL import Image

    from worker.backends.base import CaptionInput, GenerationParams
    from worker.batcher import Batcher
    from worker.model.captioner import Captioner

    captioner = Captioner(str(tiny_model), device="cuda", dtype="float32")
    item = CaptionInput(Image.new("RGB", (64, 64), "red"), "Describe.", "system")
    params = GenerationParams(greedy=True, max_new_tokens=64, min_new_tokens=64)
    # The first generate allocates what stays (cuBLAS workspaces): part of the base, not of an image.
    captioner.caption([item], params)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    captioner.caption([item] * 4, params)
    per_image = (torch.cuda.max_memory_allocated() - base) / 4
    # Room for about eight images' working memory: a batch of 32 cannot fit, a batch of one can.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((base + 8 * per_image) / total)
    try:
        batcher = Batcher(captioner, max_batch_size=32, wait_ms=5000)
        futures = [batcher.submit(captioner.prepare(item), params) for _ in range(32)]
        outputs = [f.result(timeout=300) for f in futures]
        batcher.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(outputs) == 32 and all(o.output_tokens == 64 for o in outputs)
    assert batcher.max_batch_size < 32
