"""Caption backends behind one interface (``Backend``): transformers, vllm, openai and null.

Each module is imported only when its backend is chosen, so a worker that talks to a remote
server never imports torch, and one without the ``vllm`` extra never needs it.
"""

from __future__ import annotations

from joycap_queue.config import Settings
from worker.backends.base import (
    Backend,
    CaptionInput,
    CaptionOutput,
    GenerationParams,
    ModelLoadError,
    squish_resize,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "CaptionInput",
    "CaptionOutput",
    "GenerationParams",
    "ModelLoadError",
    "make_backend",
    "squish_resize",
]

BACKENDS = ("transformers", "vllm", "openai", "null")


def make_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` names, configured but not loaded."""
    if settings.backend == "transformers":
        from worker.model.captioner import Captioner

        return Captioner(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            torch_threads=settings.torch_threads,
            quantize=settings.quantize,
            lora=settings.lora,
        )
    if settings.backend == "vllm":
        from worker.backends.vllm_engine import VllmBackend

        return VllmBackend(
            settings.model,
            dtype=settings.dtype,
            max_batch_size=settings.batch_size or 256,  # auto: vLLM schedules within its memory
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        )
    if settings.backend == "openai":
        from worker.backends.openai_http import OpenAIBackend

        if not settings.openai_url:
            raise ModelLoadError("the openai backend needs a server: set --openai-url or JOYCAP_OPENAI_URL")
        return OpenAIBackend(
            settings.model,
            base_url=settings.openai_url,
            api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else "",
            timeout_s=settings.task_time_limit_s,
        )
    if settings.backend == "null":
        from worker.backends.null import NullBackend

        return NullBackend(settings.model)
    raise ModelLoadError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")
