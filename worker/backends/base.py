"""What every caption backend takes and gives, and the interface the batcher drives.

No torch here: the ``openai`` and ``null`` backends, and the batcher, run without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from PIL import Image


class ModelLoadError(RuntimeError):
    """The model or its tokenizer cannot be loaded; the message is one line a user can act on."""


@dataclass(frozen=True)
class Sampling:
    """The sampling values in effect: temperature 0.0 is greedy, top_p 1.0 and top_k 0 are off."""

    temperature: float
    top_p: float
    top_k: int

    def request_fields(self) -> dict[str, float | int]:
        """What a server's request carries (the OpenAI API, vLLM's SamplingParams).

        Greedy sends temperature 0 alone; top_k goes only when set (the OpenAI API has none, it
        is a vLLM extension).
        """
        if not self.temperature:
            return {"temperature": 0.0}
        fields: dict[str, float | int] = {"temperature": self.temperature, "top_p": self.top_p}
        if self.top_k:
            fields["top_k"] = self.top_k
        return fields


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; upstream's defaults. ``temperature == 0`` means greedy.

    ``min_new_tokens`` forces a length (benchmarks compare like with like: random weights stop
    at random places); 0, the default, lets every caption stop at its end-of-turn token.
    ``seed`` makes sampling repeatable: the continuous engine gives the same caption for the same
    image and seed whatever else is in flight; None draws a fresh one per caption.
    """

    temperature: float = 0.6
    top_p: float | None = 0.9
    top_k: int | None = None
    max_new_tokens: int = 256
    greedy: bool = False
    min_new_tokens: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 or more, not {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be between 0 and max_new_tokens, not {self.min_new_tokens}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def sampling(self) -> Sampling:
        """Temperature, top_p and top_k as every engine applies them: greedy turns all three off,
        an unset filter is off."""
        if self.is_greedy:
            return Sampling(temperature=0.0, top_p=1.0, top_k=0)
        return Sampling(self.temperature, 1.0 if self.top_p is None else self.top_p, self.top_k or 0)

    def to_dict(self) -> dict[str, object]:
        described = asdict(self)
        # Left out when unused, so job rows and dedup keys written before they existed still match.
        if not self.min_new_tokens:
            del described["min_new_tokens"]
        if self.seed is None:
            del described["seed"]
        return described

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``generate``; every sampling filter is set, on or off."""
        forced = {"min_new_tokens": self.min_new_tokens} if self.min_new_tokens else {}
        if self.is_greedy:
            # Sampling knobs beside do_sample=False only earn warnings.
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, **forced}
        sampling = self.sampling
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": sampling.temperature,
            # An omitted knob is not "off": generate fills it from generation_config, then from
            # transformers' global defaults, and those include top_k=50. 0 and 1.0 disable them.
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            **forced,
        }


@dataclass
class CaptionInput:
    image: Image.Image
    prompt: str
    system_prompt: str
    # Benchmarks and tests: end this caption with a stop token after exactly this many new tokens
    # (each image its own length, as real captions vary), in every engine alike.
    forced_length: int | None = None


@dataclass
class CaptionOutput:
    caption: str
    prompt_tokens: int  # unpadded input ids, the 729 image tokens included
    output_tokens: int  # generated for this item, its stop token included, padding excluded


def squish_resize(image: Image.Image, size: int) -> Image.Image:
    """RGB, squished to ``size`` x ``size`` with LANCZOS: upstream's resize, shared by every backend.

    RGB comes first so a palette or alpha image is resized as colours, not as palette indices.
    An image already at that size and mode comes back as it is, so applying it twice is harmless.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def clean_caption(text: str) -> str:
    # NUL is never part of a caption, and PostgreSQL text columns refuse it outright.
    return text.replace("\x00", "").strip()


class Backend(ABC):
    """One way to turn prepared images into captions; one instance per worker process.

    ``prepare`` runs on the task threads (image resize, tokenization) so the thread that calls
    ``generate`` never waits for them; ``generate`` runs a whole batch in one call.
    """

    name: ClassVar[str]
    # False: every request goes to ``generate`` alone, straight from its task thread (a remote
    # server batches for itself, and many requests in flight are what keep it busy).
    batches: ClassVar[bool] = True
    model_id: str
    device: str = "?"

    @property
    def serving_key(self) -> str:
        """The jobs this backend takes: those whose ``ModelSpec.key`` is this (modelspec.py)."""
        return self.model_id

    @abstractmethod
    def load(self) -> None:
        """Make the backend ready; idempotent. ``ModelLoadError`` with one line if it cannot be."""

    @abstractmethod
    def prepare(self, item: CaptionInput) -> Any:
        """Everything about one image that can be done off the generate thread."""

    @abstractmethod
    def generate(self, batch: Sequence[Any], params: GenerationParams) -> list[CaptionOutput]:
        """Captions for prepared items, in order, from one model call."""

    def caption(self, batch: Sequence[CaptionInput], params: GenerationParams) -> list[CaptionOutput]:
        """Prepare and caption a batch right here: the ``caption`` command and plain loops."""
        if not batch:
            return []
        self.load()
        return self.generate([self.prepare(item) for item in batch], params)

    def release_memory(self) -> None:  # noqa: B027 - a hook; most backends hold no cache
        """Give back cached accelerator memory after an out-of-memory error."""

    def describe(self) -> str:
        return f"{self.name} backend on {self.device}"


class BackendFront:
    """What captions through ``self.backend`` (the batcher, the continuous engine, idle
    unloading): the model and the jobs it serves are the backend's."""

    backend: Backend

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def serving_key(self) -> str:
        return self.backend.serving_key
