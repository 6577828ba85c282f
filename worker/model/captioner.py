"""The ``transformers`` backend: JoyCaption behind ``load()`` once per process and ``caption(batch)``.

The prompt and generation follow upstream's batch script (fpgaminer/joycaption
``scripts/batch-caption.py``): chat template as text, one BOS, the image token repeated
``image_seq_length`` times, left padding, squish-resized 384 px pixels, and the reply cut at the
first ``<|eot_id|>``. Submodules are reached through the model's accessors only: transformers 5
moved them under ``model.model``.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from joycap_queue.captions.modelspec import ModelSpec, spec_of
from joycap_queue.errors import OptionError, first_line
from worker.backends.base import (
    Backend,
    CaptionInput,
    CaptionOutput,
    GenerationParams,
    ModelLoadError,
)
from worker.backends.encoding import PromptEncoder
from worker.model.lora import apply_adapter
from worker.model.preprocess import preprocess_image

__all__ = [
    "CaptionInput",
    "CaptionOutput",
    "Captioner",
    "GenerationParams",
    "ModelLoadError",
    "preprocess_image",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class PreparedImage:
    """One image ready for ``generate``: its prompt ids (image token expanded) and its pixels."""

    ids: list[int]
    pixels: torch.Tensor
    forced_length: int | None = None


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given.

    Call it in the process that runs the model: ``torch.cuda.is_available()`` initializes CUDA,
    and a process that forks afterwards gives its children a broken CUDA.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``"auto"`` -> bfloat16 on a GPU, float32 on the CPU; or one of ``DTYPES`` by name."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}") from None


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a folder.
    return model.startswith((".", "~", "/")) or model.count("/") > 1 or "\\" in model


def source_folder(model: str) -> str:
    """The checkpoint to load: a hub id as given, a folder expanded; ModelLoadError if it is missing."""
    if not _looks_like_path(model):
        return model
    source = str(Path(model).expanduser())
    if not Path(source).is_dir():
        raise ModelLoadError(f"model folder not found: {model}")
    return source


class Captioner(Backend):
    """One JoyCaption model in transformers; load() once per process; every method is thread-safe.

    A lock serializes ``generate``: a GPU runs one batch at a time anyway, and merging several
    callers' images into one batch is the batcher's job, not something done behind its back.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        torch_threads: int = 0,
        quantize: str = "none",
        lora: str = "",
    ) -> None:
        self.model_id = model
        self.quantize = quantize
        self.lora = lora
        self.spec = ModelSpec(model, quantize)
        self.weights_bytes = 0
        self.device = device
        self.requested_dtype = dtype
        self.dtype: torch.dtype | None = None
        self.torch_threads = torch_threads
        self.image_size = 0
        self.image_seq_length = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._encoder: PromptEncoder | None = None
        self._pad_id = 0
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def serving_key(self) -> str:
        return self.spec.key

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self._tokenizer

    @property
    def model(self) -> Any:
        self.load()
        return self._model

    @property
    def encoder(self) -> PromptEncoder:
        self.load()
        assert self._encoder is not None
        return self._encoder

    def load(self) -> None:
        """Load the tokenizer and model once; later calls return at once."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            started = time.monotonic()
            device = resolve_device(self.device)
            dtype = resolve_dtype(self.requested_dtype, device)
            if self.torch_threads > 0:
                torch.set_num_threads(self.torch_threads)
            source = source_folder(self.model_id)
            try:
                # The adapter is checked (and hashed) before 16 GB of weights are read for nothing.
                self.spec = spec_of(self.model_id, self.quantize, self.lora)
            except OptionError as exc:
                raise ModelLoadError(str(exc)) from None
            try:
                from transformers import AutoTokenizer, LlavaForConditionalGeneration

                tokenizer = AutoTokenizer.from_pretrained(source)
                kwargs: dict[str, Any] = {"dtype": dtype}
                quantization = quantization_config(self.quantize, dtype)
                if quantization is not None:
                    kwargs["quantization_config"] = quantization
                # transformers 5 wants accelerate for any device_map, even a single device; and
                # bitsandbytes places the weights it quantizes through one, the CPU included.
                direct = (device != "cpu" or quantization is not None) and importlib.util.find_spec(
                    "accelerate"
                ) is not None
                if direct:
                    kwargs["device_map"] = device
                # Any: transformers' @wraps on .to() confuses mypy.
                model: Any = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
                if not direct:
                    model.to(device)
            except Exception as exc:
                raise ModelLoadError(f"cannot load model {self.model_id!r}: {first_line(exc)}") from exc
            if self.spec.adapter:
                model = apply_adapter(model, self.spec.adapter, merge=self.quantize == "none")
            model.eval()
            self._configure(model, tokenizer)
            self.device, self.dtype = device, model.dtype
            self.weights_bytes = int(model.get_memory_footprint())
            self._tokenizer, self._model = tokenizer, model
            log.info(
                "loaded %s on %s (%s) in %.1f s; the weights take %.2f GiB",
                self.spec.describe(),
                device,
                self.dtype,
                time.monotonic() - started,
                self.weights_bytes / 2**30,
            )

    def unload(self) -> None:
        """Free the model and its memory (idle unload); the next ``load()`` reads it again."""
        with self._load_lock:
            if self._model is None:
                return
            self._model = None
            self._encoder = None
            gc.collect()
            if str(self.device).startswith("cuda"):
                torch.cuda.empty_cache()
            log.info("unloaded %s: its memory is free until the next job", self.spec.describe())

    def use_model(self, model: Any, tokenizer: Any) -> None:
        """Adopt a model already in memory instead of loading one (benchmarks build theirs on the GPU)."""
        with self._load_lock:
            model.eval()
            self._configure(model, tokenizer)
            self.device, self.dtype = str(model.device), model.dtype
            self._tokenizer, self._model = tokenizer, model

    def _configure(self, model: Any, tokenizer: Any) -> None:
        encoder = PromptEncoder.for_model(
            tokenizer, model.config, model.generation_config, model_id=self.model_id
        )
        self.image_seq_length = encoder.image_seq_length
        self.image_size = int(model.config.vision_config.image_size)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id
        self._pad_id = int(pad) if pad is not None else encoder.stop_ids[0]
        self._encoder = encoder

    def describe(self) -> str:
        extras = "".join(
            [
                f", {self.quantize}" if self.quantize != "none" else "",
                f", LoRA {self.spec.adapter_hash}" if self.spec.adapter_hash else "",
            ]
        )
        return f"transformers on {self.device} ({self.dtype}{extras})"

    def encode_prompt(self, prompt: str, system_prompt: str) -> list[int]:
        """Input ids for one image: one BOS, the turns, the image token expanded, the assistant header."""
        return self.encoder.expanded_ids(prompt, system_prompt)

    def prepare(self, item: CaptionInput) -> PreparedImage:
        self.load()
        return PreparedImage(
            ids=self.encode_prompt(item.prompt, item.system_prompt),
            pixels=preprocess_image(item.image, self.image_size),
            forced_length=item.forced_length,
        )

    def generate(self, batch: Sequence[PreparedImage], params: GenerationParams) -> list[CaptionOutput]:
        """Caption prepared images in one ``generate`` call; results in input order."""
        if not batch:
            return []
        self.load()
        pixels = torch.stack([item.pixels for item in batch])
        prompts = [item.ids for item in batch]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.tensor([[self._pad_id] * (width - len(ids)) + ids for ids in prompts])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        forced = [item.forced_length or 0 for item in batch]
        processors = [ForcedLengths(forced, width, self.encoder.stop_ids)] if any(forced) else []
        with self._generate_lock, torch.inference_mode():
            if params.seed is not None:
                # Repeatable for the same batch; only the continuous engine is repeatable per image.
                torch.manual_seed(params.seed)
            generated = self._model.generate(
                input_ids=input_ids.to(self._model.device),
                pixel_values=pixels.to(self._model.device, self._model.dtype),
                attention_mask=attention_mask.to(self._model.device),
                suppress_tokens=None,
                use_cache=True,
                eos_token_id=self.encoder.stop_ids,
                pad_token_id=self._pad_id,
                logits_processor=processors or None,
                **params.generate_kwargs(),
            )
        new_tokens = generated[:, width:].tolist()
        return [
            self._decode(tokens, prompt_tokens=len(ids))
            for tokens, ids in zip(new_tokens, prompts, strict=True)
        ]

    def release_memory(self) -> None:
        if str(self.device).startswith("cuda"):
            # A failed generate's tensors can sit in reference cycles (frames, caches): collect
            # them before handing the cached blocks back.
            gc.collect()
            torch.cuda.empty_cache()

    def _decode(self, tokens: list[int], *, prompt_tokens: int) -> CaptionOutput:
        text, output_tokens = self.encoder.decode_reply(tokens)
        return CaptionOutput(caption=text, prompt_tokens=prompt_tokens, output_tokens=output_tokens)


# Kept in the model dtype when quantizing: the vision tower (SigLIP, its head's out_proj included:
# 4-bit JoyCaption broke in other tools when it was quantized), the projector, and lm_head.
# transformers 5 matches these from the start of a module's name (or as its suffix), and moved
# the towers under ``model.``: bare "vision_tower" would quantize SigLIP after all.
UNQUANTIZED_MODULES = [
    "model.vision_tower",
    "model.multi_modal_projector",
    "vision_tower",
    "multi_modal_projector",
    "lm_head",
]


def quantization_config(quantize: str, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for ``quantize`` (None for "none")."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    # bitsandbytes logs a warning on every 8-bit matmul of a float input (hundreds a decode
    # step) and on the CPU that an optional kernel package is missing: noise in a worker's log.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            # Weights stored in 4 bits, matmuls in the model dtype (bf16 on a GPU).
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    raise ModelLoadError(f"unknown quantization {quantize!r}; choose none, 8bit or nf4")


class ForcedLengths:
    """A logits processor ending row i with a stop token after exactly ``lengths[i]`` new tokens.

    The same rule as the engine's ``forced_end`` (``worker/engine/sampling.py``): no stop token before,
    only a stop token at that step; 0 leaves a row alone.
    """

    def __init__(self, lengths: list[int], prompt_width: int, stop_ids: list[int]) -> None:
        self.lengths = torch.tensor(lengths)
        self.prompt_width = prompt_width
        self.stop_ids = stop_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        lengths = self.lengths.to(scores.device)
        lowest = torch.finfo(scores.dtype).min
        early = (lengths > 0) & (step < lengths - 1)
        scores[early[:, None] & _columns(scores, self.stop_ids)] = lowest
        at_end = (lengths > 0) & (step == lengths - 1)
        scores[at_end] = lowest
        scores[at_end, self.stop_ids[0]] = 0.0
        return scores


def _columns(scores: torch.Tensor, ids: list[int]) -> torch.Tensor:
    mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    mask[ids] = True
    return mask[None, :]
