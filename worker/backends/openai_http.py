"""The ``openai`` backend: each image goes to an OpenAI-compatible server (upstream's ``vllm serve``).

Each task thread sends its own request, so the worker's concurrency is the number of requests
in flight, and the server batches them as it likes. The image is squished to 384 px with
LANCZOS here and sent as PNG, so the server's own resize is a no-op and its pixels are
upstream's; the system prompt and prompt are sent as chat messages for its chat template.

The client is the standard library's ``http.client``, one keep-alive connection per thread:
requests are plain JSON posts, and no dependency is needed for them.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from joycap_queue.config import mask_url
from worker.backends.base import (
    Backend,
    CaptionInput,
    CaptionOutput,
    GenerationParams,
    ModelLoadError,
    clean_caption,
    squish_resize,
)

log = logging.getLogger(__name__)

# JoyCaption's SigLIP input size; the server resizes anything else to its own size anyway.
IMAGE_SIZE = 384
RETRIES = 3
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ServerError(RuntimeError):
    """The server refused or failed a request; the message is one line with its reason."""


@dataclass
class PreparedRequest:
    """One chat completion's messages, the image already inside as a data URL."""

    messages: list[dict[str, Any]]


class OpenAIBackend(Backend):
    name = "openai"
    batches = False

    def __init__(self, model: str, *, base_url: str, api_key: str = "", timeout_s: float = 600.0) -> None:
        self.model_id = model
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ModelLoadError(f"not an http(s) URL for the openai backend: {mask_url(base_url)}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        # "http://host:8000/v1" → requests go to "/v1/chat/completions".
        self._path = parts.path or ""
        self.device = mask_url(base_url)
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._loaded = False

    def describe(self) -> str:
        return f"openai backend: server {self.device}, model {self.model_id}"

    def load(self) -> None:
        """Check that the server answers and serves this model, before any job is taken."""
        if self._loaded:
            return
        try:
            listing = self._request("GET", "/models")
        except (OSError, ServerError) as exc:
            raise ModelLoadError(f"cannot use the server at {self.device}: {exc}") from None
        served = [entry.get("id") for entry in listing.get("data", []) if isinstance(entry, dict)]
        if served and self.model_id not in served:
            raise ModelLoadError(
                f"the server at {self.device} serves {', '.join(map(str, served))}, not {self.model_id}; "
                "set JOYCAP_MODEL to the name it serves"
            )
        self._loaded = True

    def prepare(self, item: CaptionInput) -> PreparedRequest:
        buffer = io.BytesIO()
        # PNG: lossless, so the server decodes exactly the pixels upstream's resize made.
        squish_resize(item.image, IMAGE_SIZE).save(buffer, format="PNG", compress_level=1)
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return PreparedRequest(
            messages=[
                {"role": "system", "content": item.system_prompt},
                {
                    "role": "user",
                    # The image first: JoyCaption's template opens the user turn with it.
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": item.prompt.strip()},
                    ],
                },
            ]
        )

    def generate(self, batch: Sequence[PreparedRequest], params: GenerationParams) -> list[CaptionOutput]:
        return [self._complete(item, params) for item in batch]

    def request_body(self, item: PreparedRequest, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": item.messages,
            "max_tokens": params.max_new_tokens,
            "stream": False,
        }
        body.update(params.sampling.request_fields())
        if params.min_new_tokens:
            body["min_tokens"] = params.min_new_tokens  # a vLLM extension of the API
        return body

    def _complete(self, item: PreparedRequest, params: GenerationParams) -> CaptionOutput:
        reply = self._request("POST", "/chat/completions", self.request_body(item, params))
        try:
            text = reply["choices"][0]["message"]["content"] or ""
            usage = reply.get("usage") or {}
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"unexpected reply from {self.device}: {str(reply)[:200]}") from None
        return CaptionOutput(
            caption=clean_caption(text),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        )

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            factory = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = factory(self._host, self._port, timeout=self._timeout_s)
            self._local.connection = connection
        return connection

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(RETRIES):
            connection = self._connection()
            try:
                connection.request(method, self._path + path, body=payload, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                # A kept-alive connection the server closed, or a server restarting: reconnect.
                connection.close()
                self._local.connection = None
                if attempt + 1 == RETRIES:
                    reason = (
                        "timed out" if isinstance(exc, socket.timeout) else str(exc) or type(exc).__name__
                    )
                    raise ServerError(f"no answer from {self.device}: {reason}") from None
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status in RETRY_STATUSES and attempt + 1 < RETRIES:
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status != 200:
                raise ServerError(f"{self.device} answered {response.status}: {_error_text(data)}")
            try:
                parsed = json.loads(data)
            except ValueError:
                raise ServerError(f"{self.device} answered with something other than JSON") from None
            return parsed if isinstance(parsed, dict) else {"data": parsed}
        raise AssertionError("unreachable")


def _error_text(data: bytes) -> str:
    message = None
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        # OpenAI nests the message under "error"; older vLLM servers put it at the top.
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else parsed.get("message") or error
    text = str(message or data.decode("utf-8", "replace"))
    return " ".join(text.split())[:300]
