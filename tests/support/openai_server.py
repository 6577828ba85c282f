"""A real OpenAI-compatible chat-completions server for the tests, serving a real model.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` the way ``vllm serve`` does, and
captions every request with the transformers backend through a `Batcher`, so requests in flight
at once share a batch: the openai backend is tested against a real HTTP server and a real model
path, never a canned reply.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from worker.backends.base import Backend, CaptionInput, GenerationParams
from worker.batcher import Batcher


@dataclass
class ServedModel:
    name: str
    batcher: Batcher
    api_key: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        return None

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        key = self.server.served.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.served.name, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        served = self.server.served
        served.requests.append(body)
        if body.get("model") != served.name:
            self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
            return
        try:
            item, params = _parse(body)
        except (KeyError, ValueError, TypeError) as exc:
            self._send(400, {"error": {"message": f"bad request: {exc}"}})
            return
        output = served.batcher.caption_one(item, params)
        self._send(
            200,
            {
                "object": "chat.completion",
                "model": served.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": output.caption},
                        "finish_reason": "length"
                        if output.output_tokens >= params.max_new_tokens
                        else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": output.prompt_tokens,
                    "completion_tokens": output.output_tokens,
                    "total_tokens": output.prompt_tokens + output.output_tokens,
                },
            },
        )


def _parse(body: dict[str, Any]) -> tuple[CaptionInput, GenerationParams]:
    system, text, image = "", "", None
    for message in body["messages"]:
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for part in parts:
            if part["type"] == "text" and message["role"] == "system":
                system += part["text"]
            elif part["type"] == "text":
                text += part["text"]
            elif part["type"] == "image_url":
                header, _, data = part["image_url"]["url"].partition(",")
                if not header.endswith(";base64"):
                    raise ValueError("images must be base64 data URLs")
                image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    if image is None:
        raise ValueError("no image in the messages")
    temperature = float(body.get("temperature", 1.0))
    params = GenerationParams(
        temperature=temperature,
        greedy=temperature == 0,
        top_p=body.get("top_p"),
        top_k=body.get("top_k"),
        max_new_tokens=int(body.get("max_tokens", 16)),
        min_new_tokens=int(body.get("min_tokens", 0)),
    )
    return CaptionInput(image=image, prompt=text, system_prompt=system), params


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, served: ServedModel) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.served = served


@contextmanager
def openai_server(
    backend: Backend, name: str, *, api_key: str = "", batch_size: int = 8, wait_ms: float = 200
) -> Iterator[tuple[str, ServedModel]]:
    """Serve ``backend`` as model ``name``; yields (base URL ending in /v1, the served model)."""
    served = ServedModel(name, Batcher(backend, max_batch_size=batch_size, wait_ms=wait_ms).start(), api_key)
    server = _Server(served)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", served
    finally:
        server.shutdown()
        server.server_close()
        served.batcher.close()
