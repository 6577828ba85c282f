"""One settings object for the whole service, read from JOYCAP_* environment variables.

Every CLI option that has a setting also takes its environment variable, so a worker on another
machine is configured by its environment alone (compose, systemd) and the CLI by flags.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "fancyfeast/llama-joycaption-beta-one-hf-llava"
# -b auto on paths without the continuous engine (generate, vllm's batcher, openai, null).
GENERATE_BATCH_SIZE = 8
# The tiny model builder leaves this file in its folder; its presence is how the light side knows,
# without importing torch, that captions will be random text.
TINY_MODEL_MARKER = "joycap-tiny.json"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "joycap-queue"


class Settings(BaseSettings):
    """Settings shared by the CLI, the watcher and the workers (env prefix ``JOYCAP_``)."""

    model_config = SettingsConfigDict(env_prefix="JOYCAP_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = ""
    data_dir: Path = Field(default_factory=default_data_dir)
    queue: str = "joycap"

    model: str = DEFAULT_MODEL
    # Prompt vocabulary; empty means "follow the model" (alpha-two for an alpha checkpoint).
    profile: Literal["", "alpha-two", "beta-one"] = ""
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    torch_threads: int = Field(default=0, ge=0)
    # none (the model dtype), 8bit or nf4 (bitsandbytes): the language model's linears only; the
    # vision tower, projector and lm_head stay in the model dtype. Part of a job's dedup key.
    quantize: Literal["none", "8bit", "nf4"] = "none"
    # A peft LoRA adapter folder (as upstream's finetuning/train.py saves one); part of the key.
    lora: str = ""
    # A worker idle this long frees its model (and GPU memory), and loads it again for the next
    # job; 0 keeps it loaded.
    idle_unload_s: float = Field(default=0.0, ge=0.0)

    temperature: float = Field(default=0.6, ge=0.0)
    top_p: float | None = Field(default=0.9, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=256, ge=1, le=4096)
    greedy: bool = False
    seed: int | None = Field(default=None, ge=0)
    # The quality guard (quality.py): a caption flagged truncated, repetitive, empty, junk or
    # duplicate-tags is captioned again with a fresh sample up to this many times; 0: never.
    quality_retries: int = Field(default=2, ge=0, le=10)
    # Its thresholds (README "Caption quality"): the share of a caption's tail a loop covers, the
    # copies of a 3-gram that make one, the share of junk characters, surplus copies of a tag.
    quality_repeat_share: float = Field(default=0.5, gt=0.0, le=1.0)
    quality_min_repeats: int = Field(default=3, ge=2)
    quality_junk_share: float = Field(default=0.3, gt=0.0, le=1.0)
    quality_duplicate_tags: int = Field(default=2, ge=1)

    # Jobs in flight per worker process; 0 means twice the batch size, so one batch is decoded and
    # prepared on the task threads while the previous one is on the GPU.
    concurrency: int = Field(default=0, ge=0, le=512)
    # transformers (default), vllm (in-process engine), openai (a remote OpenAI-compatible server),
    # null (no model, a fixed caption: measures the pipeline's own cost; never a default).
    backend: Literal["transformers", "vllm", "openai", "null"] = "transformers"
    # continuous: the transformers backend's own engine (one KV cache, slots refilled mid-flight,
    # CUDA graphs); generate: transformers' generate on batches merged by the batcher.
    engine: Literal["continuous", "generate"] = "continuous"
    # Images in flight (continuous) or per generate call; 0 is "auto": for the continuous engine
    # as many as the KV cache fits in kv_memory_fraction of the GPU, else GENERATE_BATCH_SIZE.
    batch_size: int = Field(default=0, ge=0, le=1024)
    batch_wait_ms: float = Field(default=50.0, ge=0.0, le=60_000.0)
    kv_memory_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    # Prompt tokens per prefill forward between decode steps; 0: 512 on a GPU, whole on the CPU.
    prefill_chunk: int = Field(default=0, ge=0, le=65_536)
    # "" (this process, one model), "all", or GPU indices "0,1,3": one worker process per GPU.
    gpus: str = ""
    openai_url: str = ""
    openai_api_key: SecretStr | None = None
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_attempts: int = Field(default=3, ge=1)
    # On SIGTERM a worker takes no new job and lets the ones in flight finish for this long, then
    # hands the rest back to the queue and exits (compose's stop_grace_period must be longer).
    shutdown_grace_s: float = Field(default=60.0, ge=0.0)
    # How long a worker keeps retrying a database write (a caption it computed, a failure) while
    # the database is busy or unreachable, before it gives the job back to the queue.
    db_retry_s: float = Field(default=300.0, ge=0.0)
    # Each worker process marks itself alive this often; a worker not seen for four beats is
    # dead, and any live worker sends its jobs again (a SIGKILL, a lost machine).
    worker_heartbeat_s: float = Field(default=5.0, gt=0.0, le=300.0)
    task_time_limit_s: int = Field(default=1800, ge=10)
    # Redis re-delivers an unacknowledged message after this long; it must exceed the task time
    # limit or a slow but healthy job gets captioned twice.
    visibility_timeout_s: int = Field(default=7200, ge=20)
    max_image_pixels: int = Field(default=178_956_970, ge=1)
    # Where `submit-dataset` writes dataset images, named by content hash [default: DATA_DIR/images].
    # Workers read them by path: with workers on other machines, a shared folder mounted at the
    # same path everywhere.
    image_store: Path | None = None
    # Workers read images only below these folders (comma-separated); empty means anywhere. A
    # job naming /etc/passwd or ../ outside them fails and nothing is read.
    allowed_roots: str = ""

    @property
    def allowed_root_paths(self) -> list[str]:
        return [
            os.path.realpath(os.path.expanduser(r.strip()))
            for r in self.allowed_roots.split(",")
            if r.strip()
        ]

    # Flower's basic auth; the password is a secret: never printed, passed to Flower by environment.
    flower_user: str = ""
    flower_password: SecretStr | None = None

    @field_validator("top_p", "top_k", mode="before")
    @classmethod
    def _none_words(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
            return None
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _auto_batch(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return 0
            if not text.isdigit():
                raise ValueError(f"batch size must be a number of images or 'auto', not {value!r}")
        return value

    @field_validator("gpus")
    @classmethod
    def _gpu_list(cls, value: str) -> str:
        value = value.replace(" ", "")
        if value.lower() in ("", "all"):
            return value.lower()
        ids = value.split(",")
        # Indices as nvidia-smi numbers them, or GPU/MIG UUIDs, as CUDA_VISIBLE_DEVICES takes them.
        valid = all(i.isdigit() or i.startswith(("GPU-", "MIG-")) for i in ids)
        if not valid or len(set(ids)) != len(ids):
            raise ValueError(f"gpus must be 'all' or distinct GPU indices like 0,1,3, not {value!r}")
        return ",".join(ids)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                "visibility_timeout_s must be greater than task_time_limit_s, "
                "or Redis re-delivers jobs that are still running"
            )
        if self.backend != "transformers" and (self.quantize != "none" or self.lora):
            raise ValueError(
                f"quantize and lora need the transformers backend, not {self.backend} "
                "(for vLLM, merge the adapter with `joycap-queue model merge-lora` and pass --model)"
            )
        return self

    @property
    def uses_engine(self) -> bool:
        return self.backend == "transformers" and self.engine == "continuous"

    @property
    def effective_batch_size(self) -> int:
        """The batch size to run; 0 (auto) only resolves here for paths without the engine."""
        return self.batch_size or GENERATE_BATCH_SIZE

    @property
    def effective_concurrency(self) -> int:
        if self.concurrency:
            return self.concurrency
        if self.uses_engine:
            # Enough ready images to refill slots the moment they free, not a second batch.
            return min(512, self.effective_batch_size + max(4, self.effective_batch_size // 2))
        return min(512, 2 * self.effective_batch_size)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'joycap.db'}"


ChildRole = Literal["worker", "flower"]


def _withheld(settings: Settings, role: ChildRole) -> set[str]:
    """The settings a child in this role has no use for, secrets above all."""
    # Flower's password reaches Flower as FLOWER_BASIC_AUTH (ops.flower.flower_environment), never
    # as a setting, and no worker needs it.
    names = {"flower_user", "flower_password"}
    if role == "flower":
        # Flower talks to Redis only; a database URL may carry a password.
        names |= {"openai_api_key", "database_url"}
    elif settings.backend != "openai":
        names.add("openai_api_key")
    return names


def settings_environment(settings: Settings, role: ChildRole = "worker") -> dict[str, str]:
    """The settings as JOYCAP_* variables, to hand to a child process in ``role``.

    Secrets travel by environment, where they do not show in `ps`, and only to the child that
    needs them: the OpenAI key to a worker whose backend is openai, Flower's password to no one
    (see `_withheld`). A withheld setting is set empty rather than left out: callers lay this over
    their own environment, which may hold the same variable from the user's shell.
    """
    withheld = _withheld(settings, role)
    environment = {}
    for name, value in settings.model_dump().items():
        key = f"JOYCAP_{name.upper()}"
        if name in withheld:
            environment[key] = ""
        elif value is not None:
            environment[key] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return environment


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def settings_with(**overrides: object) -> Settings:
    """The environment's settings with CLI options laid over them (``None`` means not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return get_settings()
    return Settings(**given)  # type: ignore[arg-type]


# Query parameters whose value is a secret (libpq's ?password=, redis-py's ?password=, tokens and
# keys of HTTP APIs), matched as parts of the lower-cased name.
SECRET_QUERY_WORDS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "signature")


def _mask_query(query: str) -> str:
    pairs = []
    for pair in query.split("&"):
        name, sep, _value = pair.partition("=")
        if sep and any(word in unquote(name).lower() for word in SECRET_QUERY_WORDS):
            pair = f"{name}=***"
        pairs.append(pair)
    return "&".join(pairs)


def mask_url(url: str) -> str:
    """The URL with any password (in its userinfo or its query) replaced by ``***``, safe to show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.query:
        parts = parts._replace(query=_mask_query(parts.query))
    if "@" not in parts.netloc:
        return urlunsplit(parts) if parts.query else url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, _password = userinfo.partition(":")
    if sep:
        masked_userinfo = f"{user}:***"
    elif user and parts.scheme.startswith("redis"):
        # redis://secret@host: a lone userinfo is the password in Redis URLs.
        masked_userinfo = "***"
    else:
        masked_userinfo = user
    return urlunsplit(parts._replace(netloc=f"{masked_userinfo}@{hostport}"))


def tiny_model_info(model: str) -> dict[str, object] | None:
    """The marker of a folder built by ``joycap-queue model make-tiny`` (random weights), else None."""
    marker = Path(model).expanduser() / TINY_MODEL_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else {}


def is_tiny_model(model: str) -> bool:
    """True when ``model`` is a folder built by ``joycap-queue model make-tiny``."""
    return tiny_model_info(model) is not None
