"""`CaptionRequest`: everything that decides a caption apart from the image, built from options.

The CLI, the watch-folder config and the dataset importer all build their requests through
`build_requests` from a `RequestOptions` (one request per prompt: --prompt is repeatable, and a
prompt file in mode "all" gives every prompt to every image), so one option means the same thing
everywhere. `request_columns` is what a request puts in a job row, for intake and retry alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from joycap_queue.captions import prompts
from joycap_queue.captions.modelspec import ModelSpec, spec_of
from joycap_queue.captions.prompts import CaptionOptions, WeightedPrompt, build_prompt, draw_prompt
from joycap_queue.captions.quality import CleanupRules
from joycap_queue.config import Settings, tiny_model_info
from joycap_queue.errors import OptionError
from joycap_queue.results.sidecars import OutputOptions


@dataclass(frozen=True)
class RequestOptions:
    """The caption and output options of one command or inbox, named as the CLI names them.

    What they become depends on the settings (the profile follows the model), so they are
    resolved into CaptionRequests by `build_requests`; `outputs`, when set, are the sidecar and
    move options already resolved against a folder (`intake.watch.config.output_options`).
    """

    caption_type: str = prompts.DEFAULT_CAPTION_TYPE
    length: str = prompts.DEFAULT_LENGTH
    extra: tuple[str, ...] = ()
    name: str | None = None
    custom_prompt: tuple[str, ...] = ()
    prompt_file: Path | None = None
    prepend: str = ""
    append: str = ""
    strip_lead_in: bool = False
    drop_sentences: tuple[str, ...] = ()
    dedupe_tags: bool = False
    sidecar: tuple[str, ...] | None = None
    sidecar_mode: str = "skip"
    skip_flagged_sidecars: bool = False
    move: bool = False
    done_dir: str | None = None
    failed_dir: str | None = None
    outputs: OutputOptions | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RequestOptions:
        """From option values named like the CLI's (click's keyword arguments, a TOML table);
        names that are not request options (--broker-url …) are left to the settings."""
        values = {f.name: params[f.name] for f in fields(cls) if params.get(f.name) is not None}
        for name in ("extra", "drop_sentences"):
            if name in values:
                values[name] = tuple(str(item) for item in values[name])
        for name in ("custom_prompt", "sidecar"):
            if name in values:
                value = values[name]
                values[name] = (value,) if isinstance(value, str) else tuple(value)
        for name in ("strip_lead_in", "dedupe_tags", "skip_flagged_sidecars", "move"):
            if name in values:
                values[name] = bool(values[name])
        return cls(**values)


@dataclass(frozen=True)
class CaptionRequest:
    """Everything that decides a caption, apart from the image itself."""

    profile: str
    model: str
    options: CaptionOptions = field(default_factory=CaptionOptions)
    prompt_file: tuple[WeightedPrompt, ...] = ()
    gen_params: dict[str, Any] = field(default_factory=dict)
    prepend: str = ""
    append: str = ""
    outputs: OutputOptions = field(default_factory=OutputOptions)
    quantize: str = "none"
    adapter: str = ""
    adapter_hash: str = ""
    cleanup: CleanupRules = field(default_factory=CleanupRules)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.quantize, self.adapter, self.adapter_hash)

    def prompt_for(self, content_hash: str) -> str:
        # A prompt file draws per image, seeded by the content, so re-submitting the same image
        # draws the same prompt and is recognised as already done.
        if self.prompt_file and not (self.options.custom_prompt or "").strip():
            return draw_prompt(self.prompt_file, content_hash)
        return build_prompt(self.profile, self.options)

    def describe(self) -> dict[str, Any]:
        described = asdict(self)
        described["options"]["extra"] = list(self.options.extra)
        described["prompt_file"] = [asdict(p) for p in self.prompt_file]
        return described


def dedup_key(content_hash: str, prompt: str, request: CaptionRequest) -> str:
    material_list: list[Any] = [
        content_hash,
        request.profile,
        prompt,
        request.model,
        request.gen_params,
        request.prepend,
        request.append,
    ]
    if not request.spec.plain:
        # Only then: keys of plain-model jobs stay what they were before quantization existed.
        material_list.append({"quantize": request.quantize, "adapter": request.adapter_hash})
    if request.cleanup.active:
        # The rules change the stored caption, as prepend and append do.
        material_list.append({"cleanup": request.cleanup.to_json()})
    material = json.dumps(
        material_list,
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def normalize_model(model: str) -> str:
    """A local checkpoint folder as an absolute path, so submitter and worker name it alike."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return model


def profile_of(settings: Settings) -> str:
    if settings.profile:
        return settings.profile
    tiny = tiny_model_info(settings.model)
    if tiny is not None:
        return prompts.resolve_profile(str(tiny.get("profile", "beta-one")))
    return prompts.profile_for_model(settings.model)


def generation_params(settings: Settings) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "greedy": settings.greedy,
    }
    if not settings.greedy:
        params.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        if settings.seed is not None:
            # Only when set: rows and dedup keys written without one still match.
            params["seed"] = settings.seed
    return params


def custom_prompts(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The --prompt values, stripped, each once and in order; a single blank one means none."""
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else list(value)
    if len(values) == 1 and not values[0].strip():
        return ()  # as before --prompt was repeatable: an empty prompt falls back to the options
    for number, text in enumerate(values, start=1):
        if not text.strip():
            raise OptionError("prompt", f"--prompt #{number} is empty")
    return tuple(dict.fromkeys(text.strip() for text in values))


def build_requests(settings: Settings, options: RequestOptions) -> list[CaptionRequest]:
    """One CaptionRequest per prompt, in the order given; OptionError names the bad option.

    Several --prompt values, or a prompt file in mode "all", give several requests (one job per
    image and prompt); anything else gives one.
    """
    texts = custom_prompts(options.custom_prompt)
    prompt_file: tuple[prompts.WeightedPrompt, ...] = ()
    if options.prompt_file is not None:
        if texts:
            raise OptionError("prompt_file", "give either --prompt or --prompt-file, not both")
        parsed = prompts.read_prompt_file(options.prompt_file)
        if parsed.mode == "all":
            texts = tuple(item.prompt for item in parsed.prompts)
        else:
            prompt_file = parsed.prompts
    outputs = options.outputs or OutputOptions()
    if len(texts) > 1 and (outputs.done_dir or outputs.failed_dir):
        # The first caption to finish would move the image away from the jobs of the other prompts.
        raise OptionError("move", f"--move takes one prompt per image, not {len(texts)}")
    base = _build_request(settings, options, texts[0] if texts else None, prompt_file)
    if len(texts) <= 1:
        return [base]
    return [
        dataclasses.replace(base, options=dataclasses.replace(base.options, custom_prompt=text))
        for text in texts
    ]


def build_request(settings: Settings, options: RequestOptions) -> CaptionRequest:
    """The one CaptionRequest for a command that takes one prompt (see `build_requests`)."""
    requests = build_requests(settings, options)
    if len(requests) > 1:
        raise OptionError("prompt", f"this takes one prompt, not {len(requests)}")
    return requests[0]


def _build_request(
    settings: Settings,
    given: RequestOptions,
    custom_prompt: str | None,
    prompt_file: tuple[prompts.WeightedPrompt, ...],
) -> CaptionRequest:
    profile = profile_of(settings)
    options = prompts.CaptionOptions(
        caption_type=prompts.resolve_caption_type(profile, given.caption_type),
        length=prompts.resolve_length(given.length),
        extra=prompts.resolve_extra(profile, given.extra),
        name=given.name,
        custom_prompt=custom_prompt,
    )
    if not prompt_file:
        prompts.build_prompt(profile, options)  # validates the name option before anything is queued
    spec = spec_of(settings.model, settings.quantize, settings.lora)
    try:
        cleanup = CleanupRules(
            strip_lead_in=given.strip_lead_in,
            drop_sentences=given.drop_sentences,
            dedupe_tags=given.dedupe_tags,
        )
    except ValueError as exc:
        raise OptionError("drop_sentences", str(exc)) from None
    return CaptionRequest(
        cleanup=cleanup,
        profile=profile,
        model=settings.model,
        quantize=spec.quantize,
        adapter=spec.adapter,
        adapter_hash=spec.adapter_hash,
        options=options,
        prompt_file=prompt_file,
        gen_params=generation_params(settings),
        prepend=given.prepend,
        append=given.append,
        outputs=given.outputs or OutputOptions(),
    )


def request_columns(request: CaptionRequest) -> dict[str, Any]:
    """The job row's columns that come from the request, not from the image (nor its prompt,
    which a prompt file draws per image): intake writes them, and so does a retry that changes it.
    """
    options = request.options
    # A custom prompt (or a drawn one) is stored as the prompt alone, without the options it replaced.
    custom = bool((options.custom_prompt or "").strip()) or bool(request.prompt_file)
    return {
        "profile": request.profile,
        "caption_type": None if custom else options.caption_type,
        "caption_length": None if custom else options.length,
        "extra_options": json.dumps([] if custom else list(options.extra)),
        "name": options.name,
        "model": request.model,
        "quantize": request.quantize,
        "adapter": request.adapter,
        "adapter_hash": request.adapter_hash,
        "cleanup": request.cleanup.to_json(),
        "gen_params": json.dumps(request.gen_params, sort_keys=True),
        "prepend": request.prepend,
        "append": request.append,
        "outputs": request.outputs.to_json(),
    }
