"""`joycap-queue worker --gpus all|0,1,3`: one worker process per GPU, each with its own model.

This parent only supervises. It imports no torch and makes no CUDA call (it counts GPUs with
``joycap_queue.ops.gpus``, through ``nvidia-smi``), and its children are fresh interpreters
started with ``subprocess``, not forks, so none of them inherits CUDA state. Each child sees one GPU through ``CUDA_VISIBLE_DEVICES``
and is a plain `joycap-queue worker` named ``gpuN@host``; every other setting reaches it
through the ``JOYCAP_*`` environment the parent exported.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType

from joycap_queue.config import Settings
from joycap_queue.errors import JoycapError
from joycap_queue.ops.gpus import visible_gpus

log = logging.getLogger(__name__)

# A child that dies sooner than this after starting is failing to start (a model that cannot be
# loaded, a GPU that is gone): restarting it would only loop, so the whole group stops.
HEALTHY_AFTER_S = 60.0
POLL_S = 0.5
PR_SET_PDEATHSIG = 1


def resolve_gpus(spec: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPU list for ``--gpus``: 'all' is every visible GPU; an explicit list is taken as given."""
    if spec != "all":
        return [gpu for gpu in spec.split(",") if gpu]
    gpus = visible_gpus(environ)
    if not gpus:
        raise JoycapError(
            "--gpus all: no NVIDIA GPU found (nvidia-smi lists none); name them, e.g. --gpus 0,1"
        )
    return gpus


def node_name(hostname: str | None, index: int) -> str:
    """``gpu0@%h`` by default; a given ``name@host`` becomes ``name-gpu0@host``."""
    if not hostname:
        return f"gpu{index}@%h"
    name, sep, host = hostname.partition("@")
    return f"{name}-gpu{index}{sep}{host}"


def _die_with_parent() -> None:
    # Linux: a child whose supervisor is killed (even with SIGKILL) gets SIGTERM, not orphaned.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class _Child:
    gpu: str
    index: int
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: float = field(default=0.0)

    def start(self) -> None:
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.process = subprocess.Popen(self.command, env=self.env, preexec_fn=preexec)
        self.started = time.monotonic()
        log.info("GPU %s: worker pid %d started", self.gpu, self.process.pid)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


def run_per_gpu(settings: Settings, *, hostname: str | None, loglevel: str) -> int:
    """Start one worker per GPU and supervise them until a signal; returns the exit status.

    A child that crashes after running a while is restarted; one that crashes at start stops
    them all, with its exit status, so a broken setup fails loudly instead of looping.
    """
    gpus = resolve_gpus(settings.gpus)
    base_env = dict(os.environ)
    base_env["JOYCAP_GPUS"] = ""  # the children are single-GPU workers
    children = []
    for index, gpu in enumerate(gpus):
        env = dict(base_env, CUDA_VISIBLE_DEVICES=gpu)
        command = [sys.executable, "-m", "joycap_queue", "worker", "--hostname", node_name(hostname, index)]
        children.append(_Child(gpu, index, [*command, "--loglevel", loglevel], env))
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        for child in children:
            child.signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        log.info("starting %d workers, one per GPU: %s", len(children), ", ".join(gpus))
        for child in children:
            child.start()
        while any(child.process is not None and child.process.poll() is None for child in children):
            time.sleep(POLL_S)
            if stopping:
                continue
            for child in children:
                assert child.process is not None
                code = child.process.poll()
                if code is None or code == 0:
                    continue
                if time.monotonic() - child.started >= HEALTHY_AFTER_S:
                    log.warning("GPU %s: worker exited with %d; restarting it", child.gpu, code)
                    child.start()
                    continue
                log.error(
                    "the worker on GPU %s exited with %d right after starting; stopping all", child.gpu, code
                )
                status = code
                stop(signal.SIGTERM, None)
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.process is not None:
                try:
                    child.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
    return status
