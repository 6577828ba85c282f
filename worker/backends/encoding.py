"""Prompt ids and reply text exactly as upstream's batch script makes them, for any local engine.

The transformers and vLLM backends share this, so both see the same ids for the same prompt:
the chat template as text, one BOS, one image token (expanded to ``image_seq_length`` copies
for transformers; vLLM expands it itself), and the reply cut at the first ``<|eot_id|>``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from worker.backends.base import ModelLoadError, clean_caption

EOT = "<|eot_id|>"
END_HEADER = "<|end_header_id|>"
PROMPT_CACHE_SIZE = 256


class PromptEncoder:
    """Token ids for (prompt, system prompt) pairs, and captions from generated ids; thread-safe."""

    def __init__(
        self, tokenizer: Any, *, image_token_id: int, image_seq_length: int, stop_ids: list[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.stop_ids = stop_ids
        end_header = tokenizer.convert_tokens_to_ids(END_HEADER)
        self.end_header_id: int | None = end_header if isinstance(end_header, int) else None
        # A fast tokenizer used from two threads at once can fail with "Already borrowed"; this
        # lock is the tokenizer's alone, so task threads encode while another thread generates.
        self._lock = threading.Lock()
        # Most submissions share one prompt: the chat template and BPE run once, not per image.
        self._cache: OrderedDict[tuple[str, str, str], list[int]] = OrderedDict()

    @classmethod
    def for_model(
        cls, tokenizer: Any, config: Any, generation_config: Any, *, model_id: str
    ) -> PromptEncoder:
        """The encoder for a LLaVA checkpoint's config; ModelLoadError if it is not one."""
        image_token_id = getattr(config, "image_token_index", None)
        seq_length = getattr(config, "image_seq_length", None)
        if image_token_id is None or not seq_length:
            raise ModelLoadError(f"{model_id!r} is not a LLaVA checkpoint: no image token in its config")
        eot_id = tokenizer.convert_tokens_to_ids(EOT)
        configured = getattr(generation_config, "eos_token_id", None)
        eos_ids = configured if isinstance(configured, list) else [configured]
        # Stop at <|eot_id|> even where generation_config omits it: upstream cuts there anyway.
        stop_ids = list(dict.fromkeys(i for i in [eot_id, *eos_ids] if isinstance(i, int)))
        return cls(
            tokenizer, image_token_id=int(image_token_id), image_seq_length=int(seq_length), stop_ids=stop_ids
        )

    def prompt_ids(self, prompt: str, system_prompt: str) -> list[int]:
        """Input ids with one BOS and one image token (a fresh list: callers may change it)."""
        key = (prompt, system_prompt, str(getattr(self.tokenizer, "chat_template", "")))
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = self._cache[key] = self._encode(prompt, system_prompt)
                if len(self._cache) > PROMPT_CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return list(cached)

    def expanded_ids(self, prompt: str, system_prompt: str) -> list[int]:
        """Input ids with the image token repeated ``image_seq_length`` times, as transformers wants."""
        ids = self.prompt_ids(prompt, system_prompt)
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * self.image_seq_length + ids[at + 1 :]

    def _encode(self, prompt: str, system_prompt: str) -> list[int]:
        tokenizer = self.tokenizer
        image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": prompt.strip()},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if image_token not in text:
            # A checkpoint whose template leaves the image out; without it the model raises.
            messages[1]["content"] = image_token + messages[1]["content"]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        count = ids.count(self.image_token_id)
        if count != 1:
            raise ValueError(f"the prompt holds {count} image tokens ({image_token}); it must hold one")
        bos = tokenizer.bos_token_id
        if bos is not None:
            # One BOS, whether the template wrote it, wrote it twice or left it out.
            while ids and ids[0] == bos:
                ids = ids[1:]
            ids.insert(0, bos)
        return ids

    def decode_reply(self, tokens: Sequence[int]) -> tuple[str, int]:
        """The caption in generated ids, and how many ids count as generated (stop token included)."""
        tokens = list(tokens)
        stop = next((i for i, token in enumerate(tokens) if token in self.stop_ids), None)
        output_tokens = len(tokens) if stop is None else stop + 1
        reply = tokens if stop is None else tokens[:stop]
        # Upstream keeps only what follows the last <|end_header_id|>; the prompt's own header is
        # already sliced off, so this matters only for a reply that writes a header itself.
        if self.end_header_id in reply:
            reply = reply[len(reply) - reply[::-1].index(self.end_header_id) :]
        with self._lock:
            text = self.tokenizer.decode(reply, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return clean_caption(text), output_tokens
