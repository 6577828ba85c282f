"""The ``vllm`` backend: an in-process vLLM engine (``pip install 'joycap-queue[vllm]'``).

Same prompts and pixels as the transformers backend: the prompt ids come from the same
``PromptEncoder`` (one BOS, one image token, which vLLM expands to the 729 image positions
itself), and the image is squished to 384 px with LANCZOS before vLLM sees it, so its
processor's resize is a no-op and only its /255 and 0.5/0.5 normalization remain, which are
upstream's. Prefix caching is on, as in upstream's ``vllm serve`` recipe.

Written against vLLM's documented offline API (``LLM.generate`` with ``TokensPrompt`` dicts
carrying ``multi_modal_data``, ``SamplingParams``); tested under the ``vllm`` marker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from joycap_queue.errors import first_line
from worker.backends.base import (
    Backend,
    CaptionInput,
    CaptionOutput,
    GenerationParams,
    ModelLoadError,
    squish_resize,
)
from worker.backends.encoding import PromptEncoder

log = logging.getLogger(__name__)

# Upstream's recipe: `vllm serve … --max-model-len 4096`; a caption prompt is about 1,100 tokens.
MAX_MODEL_LEN = 4096


@dataclass
class VllmRequest:
    ids: list[int]  # one image token: vLLM's LLaVA processor expands it
    image: Image.Image


class VllmBackend(Backend):
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_batch_size: int = 32,
        gpu_memory_utilization: float = 0.9,
        seed: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model_id = model
        self.device = "cuda"
        self.requested_dtype = dtype
        self.max_batch_size = max_batch_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        # More LLM() arguments, e.g. load_format="dummy" for random weights in benchmarks.
        self.engine_kwargs = dict(engine_kwargs or {})
        self.image_size = 0
        self._llm: Any = None
        self._encoder: PromptEncoder | None = None
        self._load_lock = threading.Lock()
        # vLLM's LLM object is not meant for two callers at once.
        self._generate_lock = threading.Lock()

    @property
    def encoder(self) -> PromptEncoder:
        self.load()
        assert self._encoder is not None
        return self._encoder

    def describe(self) -> str:
        return f"vllm on {self.device} ({self.requested_dtype}, prefix caching)"

    def load(self) -> None:
        if self._llm is not None:
            return
        with self._load_lock:
            if self._llm is not None:
                return
            try:
                from vllm import LLM
            except ImportError:
                raise ModelLoadError(
                    "the vllm backend needs vLLM: pip install 'joycap-queue[vllm]' (on a CUDA machine)"
                ) from None
            from transformers import AutoConfig, AutoTokenizer, GenerationConfig

            from worker.model.captioner import source_folder

            started = time.monotonic()
            source = source_folder(self.model_id)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                config = AutoConfig.from_pretrained(source)
                try:
                    generation_config = GenerationConfig.from_pretrained(source)
                except OSError:
                    generation_config = None
                encoder = PromptEncoder.for_model(
                    tokenizer, config, generation_config, model_id=self.model_id
                )
                kwargs: dict[str, Any] = {
                    "model": source,
                    "tokenizer": source,
                    "dtype": self.requested_dtype,
                    "max_model_len": MAX_MODEL_LEN,
                    "enable_prefix_caching": True,
                    "limit_mm_per_prompt": {"image": 1},
                    "max_num_seqs": max(self.max_batch_size, 1),
                    "gpu_memory_utilization": self.gpu_memory_utilization,
                }
                if self.seed is not None:
                    kwargs["seed"] = self.seed
                llm = LLM(**kwargs, **self.engine_kwargs)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"cannot start vLLM on {self.model_id!r}: {first_line(exc)}") from exc
            self.image_size = int(config.vision_config.image_size)
            self._encoder, self._llm = encoder, llm
            log.info("vLLM engine for %s ready in %.1f s", self.model_id, time.monotonic() - started)

    def prepare(self, item: CaptionInput) -> VllmRequest:
        encoder = self.encoder
        return VllmRequest(
            ids=encoder.prompt_ids(item.prompt, item.system_prompt),
            image=squish_resize(item.image, self.image_size),
        )

    def sampling_params(self, params: GenerationParams) -> Any:
        from vllm import SamplingParams

        kwargs: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "min_tokens": params.min_new_tokens,
            "stop_token_ids": self.encoder.stop_ids,
            "skip_special_tokens": False,
        }
        kwargs.update(params.sampling.request_fields())
        return SamplingParams(**kwargs)

    def generate(self, batch: Sequence[VllmRequest], params: GenerationParams) -> list[CaptionOutput]:
        if not batch:
            return []
        self.load()
        encoder = self.encoder
        prompts = [
            {"prompt_token_ids": item.ids, "multi_modal_data": {"image": item.image}} for item in batch
        ]
        with self._generate_lock:
            results = self._llm.generate(prompts, self.sampling_params(params), use_tqdm=False)
        outputs = []
        for item, result in zip(batch, results, strict=True):
            text, output_tokens = encoder.decode_reply(result.outputs[0].token_ids)
            # Counted as the transformers backend counts: the image token as its 729 positions.
            prompt_tokens = len(item.ids) - 1 + encoder.image_seq_length
            outputs.append(
                CaptionOutput(caption=text, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
            )
        return outputs

    def release_memory(self) -> None:
        # vLLM preallocates its KV cache and schedules within it: it does not raise OOM per batch.
        return None
