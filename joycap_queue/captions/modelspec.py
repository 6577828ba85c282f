"""What a worker serves and a job asks for: the checkpoint, its quantization and its LoRA adapter.

All three change captions, so all three enter a job's dedup key and its routing: a worker takes
only the jobs of its own ``ModelSpec.key``. A plain bf16 model's key is the model string itself,
so rows and queues written before quantization and adapters existed keep their names.

An adapter is named by its folder and a hash of its files (``adapter_config.json`` and the
weights), read here without torch: the light side checks a folder before anything is queued,
and the same adapter copied to another machine's path is recognised as the same one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joycap_queue.errors import OptionError

QUANTIZE_MODES = ("none", "8bit", "nf4")
ADAPTER_CONFIG = "adapter_config.json"
# What peft's save_pretrained writes (safetensors since peft 0.6; .bin before).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
HASH_CHARS = 16
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    model: str
    quantize: str = "none"
    adapter: str = ""
    adapter_hash: str = ""

    @property
    def plain(self) -> bool:
        return self.quantize == "none" and not self.adapter_hash

    @property
    def key(self) -> str:
        """The routing and matching key: the model alone for a plain model."""
        if self.plain:
            return self.model
        return f"{self.model}|{self.quantize}|lora:{self.adapter_hash or '-'}"

    def describe(self) -> str:
        parts = [self.model]
        if self.quantize != "none":
            parts.append(self.quantize)
        if self.adapter:
            parts.append(f"LoRA {self.adapter} ({self.adapter_hash})")
        return ", ".join(parts)


def spec_key(model: str, quantize: str | None, adapter_hash: str | None) -> str:
    """``ModelSpec.key`` from a job row's columns."""
    return ModelSpec(model, quantize or "none", "", adapter_hash or "").key


def check_quantize(mode: str) -> str:
    if mode not in QUANTIZE_MODES:
        raise OptionError("quantize", f"unknown --quantize {mode!r}; choose {', '.join(QUANTIZE_MODES)}")
    return mode


def adapter_weights(folder: Path) -> Path | None:
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def check_adapter(adapter: str) -> tuple[str, str]:
    """(absolute folder, hash) of a LoRA adapter folder; OptionError (one line) if it is not one."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise OptionError("lora", f"adapter folder not found: {adapter}")
    folder = folder.resolve()
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()]
    return str(folder), _fingerprint(str(folder), tuple(stat))


@functools.lru_cache(maxsize=32)
def _fingerprint(folder: str, _stat: tuple[Any, ...]) -> str:
    # Keyed by the files' sizes and times too, so an adapter trained again in place is hashed again.
    path = Path(folder)
    config = path / ADAPTER_CONFIG
    try:
        described = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionError("lora", f"{folder} is not a LoRA adapter: no {ADAPTER_CONFIG}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError("lora", f"{config} cannot be read: {exc}") from None
    if not isinstance(described, dict) or str(described.get("peft_type", "")).upper() != "LORA":
        raise OptionError("lora", f"{config} does not describe a LoRA adapter (peft_type LORA)")
    weights = adapter_weights(path)
    if weights is None:
        raise OptionError("lora", f"{folder} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if weights.suffix == ".safetensors":
        _check_safetensors(weights)
    digest = hashlib.sha256(config.read_bytes())
    with weights.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:HASH_CHARS]


def _check_safetensors(path: Path) -> None:
    """The safetensors header (a length and a JSON table of tensors) is whole and fits the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise OptionError("lora", f"{path} is corrupt: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100_000_000:
            raise OptionError("lora", f"{path} is corrupt: its header runs past the end of the file")
        try:
            table = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise OptionError("lora", f"{path} is corrupt: its header is not readable") from None
    if not isinstance(table, dict):
        raise OptionError("lora", f"{path} is corrupt: its header is not a tensor table")
    end = max((int(t["data_offsets"][1]) for k, t in table.items() if k != "__metadata__"), default=0)
    if end != size - 8 - length:
        raise OptionError("lora", f"{path} is corrupt: {size} bytes, its tensors need {end + 8 + length}")


def spec_of(model: str, quantize: str = "none", lora: str = "") -> ModelSpec:
    """The spec for these options: the quantize mode checked, the adapter folder checked and hashed."""
    check_quantize(quantize)
    if not lora:
        return ModelSpec(model, quantize)
    folder, digest = check_adapter(lora)
    return ModelSpec(model, quantize, folder, digest)
