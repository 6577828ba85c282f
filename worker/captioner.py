"""JoyCaption behind one class: ``load()`` once per process, ``caption(batch)`` from any thread.

The prompt and generation follow upstream's batch script (fpgaminer/joycaption
``scripts/batch-caption.py``): chat template as text, one BOS, the image token repeated
``image_seq_length`` times, left padding, squish-resized 384 px pixels, and the reply cut at the
first ``<|eot_id|>``. Submodules are reached through the model's accessors only: transformers 5
moved them under ``model.model``.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from worker.preprocess import preprocess_image

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

EOT = "<|eot_id|>"
END_HEADER = "<|end_header_id|>"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(RuntimeError):
    """The model or its tokenizer cannot be loaded; the message is one line a user can act on."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; upstream's defaults. ``temperature == 0`` means greedy."""

    temperature: float = 0.6
    top_p: float | None = 0.9
    top_k: int | None = None
    max_new_tokens: int = 256
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 or more, not {self.temperature}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate``; every sampling filter is set, on or explicitly off."""
        if self.greedy or self.temperature == 0:
            # Sampling knobs beside do_sample=False only earn warnings.
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            # An omitted knob is not "off": generate fills it from generation_config, then from
            # transformers' global defaults, and those include top_k=50. 0 and 1.0 disable them.
            "top_k": self.top_k or 0,
            "top_p": 1.0 if self.top_p is None else self.top_p,
        }


@dataclass
class CaptionInput:
    image: Image.Image
    prompt: str
    system_prompt: str


@dataclass
class CaptionOutput:
    caption: str
    prompt_tokens: int  # unpadded input ids, the 729 image tokens included
    output_tokens: int  # generated for this item, its stop token included, padding excluded


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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a folder.
    return model.startswith((".", "~", "/")) or model.count("/") > 1 or "\\" in model


class Captioner:
    """One JoyCaption model; load() once per process; caption() is thread-safe.

    A lock serializes ``generate``: a GPU runs one batch at a time anyway, and batching several
    callers' images is the caller's choice, not something done behind its back.
    """

    def __init__(
        self, model: str, *, device: str = "auto", dtype: str = "auto", torch_threads: int = 0
    ) -> None:
        self.model_id = model
        self.device = device
        self.requested_dtype = dtype
        self.dtype: torch.dtype | None = None
        self.torch_threads = torch_threads
        self.image_size = 0
        self.image_seq_length = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._image_token_id = -1
        self._stop_ids: list[int] = []
        self._pad_id = 0
        self._end_header_id: int | None = None
        self._load_lock = threading.Lock()
        # Guards the tokenizer too: a fast tokenizer used from two threads at once can fail with
        # "Already borrowed". Reentrant because caption() encodes while holding it.
        self._generate_lock = threading.RLock()

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self._tokenizer

    @property
    def model(self) -> Any:
        self.load()
        return self._model

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
            source = self.model_id
            if _looks_like_path(source):
                source = str(Path(source).expanduser())
                if not Path(source).is_dir():
                    raise ModelLoadError(f"model folder not found: {self.model_id}")
            try:
                from transformers import AutoTokenizer, LlavaForConditionalGeneration

                tokenizer = AutoTokenizer.from_pretrained(source)
                kwargs: dict[str, Any] = {"dtype": dtype}
                # transformers 5 wants accelerate for any device_map, even a single device.
                direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
                if direct:
                    kwargs["device_map"] = device
                # Any: transformers' @wraps on .to() confuses mypy.
                model: Any = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
                if not direct:
                    model.to(device)
            except Exception as exc:
                raise ModelLoadError(f"cannot load model {self.model_id!r}: {_first_line(exc)}") from exc
            model.eval()
            self._configure(model, tokenizer)
            self.device, self.dtype = device, model.dtype
            self._tokenizer, self._model = tokenizer, model
            log.info(
                "loaded %s on %s (%s) in %.1f s",
                self.model_id,
                device,
                self.dtype,
                time.monotonic() - started,
            )

    def _configure(self, model: Any, tokenizer: Any) -> None:
        config = model.config
        image_token_id = getattr(config, "image_token_index", None)
        seq_length = getattr(config, "image_seq_length", None)
        if image_token_id is None or not seq_length:
            raise ModelLoadError(f"{self.model_id!r} is not a LLaVA checkpoint: no image token in its config")
        self._image_token_id = int(image_token_id)
        self.image_seq_length = int(seq_length)
        self.image_size = int(config.vision_config.image_size)
        eot_id = tokenizer.convert_tokens_to_ids(EOT)
        end_header_id = tokenizer.convert_tokens_to_ids(END_HEADER)
        self._end_header_id = end_header_id if isinstance(end_header_id, int) else None
        configured = model.generation_config.eos_token_id
        eos_ids = configured if isinstance(configured, list) else [configured]
        # Stop at <|eot_id|> even where generation_config omits it: upstream cuts there anyway.
        self._stop_ids = list(dict.fromkeys(i for i in [eot_id, *eos_ids] if isinstance(i, int)))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id
        self._pad_id = int(pad) if pad is not None else self._stop_ids[0]

    def encode_prompt(self, prompt: str, system_prompt: str) -> list[int]:
        """Input ids for one image: one BOS, the turns, the image token expanded, the assistant header."""
        tokenizer = self.tokenizer
        image_token = tokenizer.convert_ids_to_tokens(self._image_token_id)
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": prompt.strip()},
        ]
        with self._generate_lock:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if image_token not in text:
                # A checkpoint whose template leaves the image out; without it the model raises.
                messages[1]["content"] = image_token + messages[1]["content"]
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        count = ids.count(self._image_token_id)
        if count != 1:
            raise ValueError(f"the prompt holds {count} image tokens ({image_token}); it must hold one")
        bos = tokenizer.bos_token_id
        if bos is not None:
            # One BOS, whether the template wrote it, wrote it twice or left it out.
            while ids and ids[0] == bos:
                ids = ids[1:]
            ids.insert(0, bos)
        at = ids.index(self._image_token_id)
        return ids[:at] + [self._image_token_id] * self.image_seq_length + ids[at + 1 :]

    def caption(self, batch: Sequence[CaptionInput], params: GenerationParams) -> list[CaptionOutput]:
        """Caption a batch in one ``generate`` call; results in input order."""
        if not batch:
            return []
        self.load()
        pixels = torch.stack([preprocess_image(item.image, self.image_size) for item in batch])
        with self._generate_lock:
            prompts = [self.encode_prompt(item.prompt, item.system_prompt) for item in batch]
            width = max(len(ids) for ids in prompts)
            input_ids = torch.tensor([[self._pad_id] * (width - len(ids)) + ids for ids in prompts])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
            with torch.inference_mode():
                generated = self._model.generate(
                    input_ids=input_ids.to(self._model.device),
                    pixel_values=pixels.to(self._model.device, self._model.dtype),
                    attention_mask=attention_mask.to(self._model.device),
                    suppress_tokens=None,
                    use_cache=True,
                    eos_token_id=self._stop_ids,
                    pad_token_id=self._pad_id,
                    **params.generate_kwargs(),
                )
            new_tokens = generated[:, width:].tolist()
            return [
                self._decode(tokens, prompt_tokens=len(ids))
                for tokens, ids in zip(new_tokens, prompts, strict=True)
            ]

    def _decode(self, tokens: list[int], *, prompt_tokens: int) -> CaptionOutput:
        stop = next((i for i, token in enumerate(tokens) if token in self._stop_ids), None)
        output_tokens = len(tokens) if stop is None else stop + 1
        reply = tokens if stop is None else tokens[:stop]
        # Upstream keeps only what follows the last <|end_header_id|>; the prompt's own header is
        # already sliced off, so this matters only for a reply that writes a header itself.
        if self._end_header_id in reply:
            reply = reply[len(reply) - reply[::-1].index(self._end_header_id) :]
        text = self._tokenizer.decode(reply, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # NUL is never part of a caption, and PostgreSQL text columns refuse it outright.
        text = text.replace("\x00", "").strip()
        return CaptionOutput(caption=text, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
