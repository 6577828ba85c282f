"""The ``null`` backend: a fixed caption, no model. It measures the pipeline's own cost.

Never a default and never silent: the worker says so at start, and every caption it writes says
it too, so nobody mistakes its rows for real captions.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.backends.base import Backend, CaptionInput, CaptionOutput, GenerationParams

NULL_CAPTION = "[null backend: no model ran]"


class NullBackend(Backend):
    name = "null"

    def __init__(self, model: str) -> None:
        # Named after the model the jobs ask for, so they pass the worker's model check.
        self.model_id = model
        self.device = "nothing"

    def load(self) -> None:
        return None

    def prepare(self, item: CaptionInput) -> None:
        return None

    def generate(self, batch: Sequence[object], params: GenerationParams) -> list[CaptionOutput]:
        return [CaptionOutput(caption=NULL_CAPTION, prompt_tokens=0, output_tokens=0) for _ in batch]

    def describe(self) -> str:
        return "null backend: no model, every caption is " + repr(NULL_CAPTION)
