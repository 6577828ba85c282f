"""Inboxes to watch and the caption options of each, from the command line or a TOML file.

```toml
settle_seconds = 2        # optional, like the CLI flags
rescan_seconds = 60
polling = false

[defaults]                # applies to every inbox below
length = "long"
sidecar = ["txt"]

[[inbox]]
path = "/srv/inbox/portraits"
caption_type = "Straightforward"
extra = [0, "lighting"]
name = "Alice"
# prompt = ["Describe the lighting.", "List the objects."]   # one job per image and prompt
sidecar = ["txt", "json"]
sidecar_mode = "overwrite"
move = true               # done/ and failed/ inside the inbox (done_dir / failed_dir to choose)
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from joycap_queue.captions.prompts import DEFAULT_CAPTION_TYPE, DEFAULT_LENGTH
from joycap_queue.captions.request import CaptionRequest, RequestOptions, build_requests
from joycap_queue.config import Settings
from joycap_queue.errors import OptionError
from joycap_queue.results.sidecars import SIDECAR_KINDS, OutputOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

INBOX_KEYS = {
    "path": str,
    "caption_type": str,
    "length": (str, int),
    "extra": list,
    "name": str,
    "prompt": (str, list),
    "prompt_file": str,
    "prepend": str,
    "append": str,
    "sidecar": (list, str),
    "sidecar_mode": str,
    "skip_flagged_sidecars": bool,
    "strip_lead_in": bool,
    "drop_sentences": list,
    "dedupe_tags": bool,
    "move": bool,
    "done_dir": str,
    "failed_dir": str,
}
TOP_KEYS = {
    "settle_seconds": (int, float),
    "rescan_seconds": (int, float),
    "incomplete_after_seconds": (int, float),
    "polling": bool,
}


@dataclass(frozen=True)
class InboxConfig:
    """An inbox and its requests: one per prompt, each settled file gets a job from every one."""

    path: Path
    requests: tuple[CaptionRequest, ...]

    @property
    def request(self) -> CaptionRequest:
        # What the requests share (the outputs: sidecars, moves) is read from the first.
        return self.requests[0]


@dataclass
class WatchConfig:
    inboxes: list[InboxConfig] = field(default_factory=list)
    settle_seconds: float | None = None
    rescan_seconds: float | None = None
    polling: bool | None = None
    incomplete_after_seconds: float | None = None


def output_options(
    inbox: Path,
    *,
    sidecar: list[str] | tuple[str, ...] | str,
    sidecar_mode: str = "skip",
    move: bool = False,
    done_dir: str | None = None,
    failed_dir: str | None = None,
    skip_flagged: bool = False,
) -> OutputOptions:
    kinds = [sidecar] if isinstance(sidecar, str) else list(sidecar)
    unknown = [kind for kind in kinds if kind not in (*SIDECAR_KINDS, "none")]
    if unknown:
        raise OptionError("sidecar", f"unknown sidecar kind {unknown[0]!r}; choose txt, json or none")
    if move:
        done_dir = done_dir or str(inbox / "done")
        failed_dir = failed_dir or str(inbox / "failed")
    return OutputOptions(
        txt="txt" in kinds,
        json="json" in kinds,
        mode=sidecar_mode,
        inbox=str(inbox),
        done_dir=str(Path(done_dir).expanduser().resolve()) if done_dir else None,
        failed_dir=str(Path(failed_dir).expanduser().resolve()) if failed_dir else None,
        skip_flagged=skip_flagged,
    )


def inbox_config(path: Path, settings: Settings, options: RequestOptions) -> InboxConfig:
    """One inbox and its caption and output options (caption_type, extra, sidecar, move …)."""
    inbox = Path(path).expanduser().resolve()
    if not inbox.is_dir():
        raise OptionError("inbox", f"inbox {inbox} is not a folder")
    outputs = output_options(
        inbox,
        sidecar=options.sidecar if options.sidecar is not None else ("txt",),
        sidecar_mode=options.sidecar_mode or "skip",
        move=options.move,
        done_dir=options.done_dir,
        failed_dir=options.failed_dir,
        skip_flagged=options.skip_flagged_sidecars,
    )
    requests = build_requests(settings, replace(options, outputs=outputs))
    return InboxConfig(inbox, tuple(requests))


def _check_types(where: str, table: dict[str, Any], allowed: dict[str, Any]) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise OptionError(key, f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(allowed))}")
        if not isinstance(value, allowed[key]):
            raise OptionError(key, f"{where}: {key} has the wrong type ({type(value).__name__})")


def load_watch_config(config_path: Path, settings: Settings) -> WatchConfig:
    """Parse and validate a watch config; every error names the file, the inbox and the key."""
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(
            "config", f"cannot read watch config {config_path}: {exc.strerror or exc}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError("config", f"watch config {config_path} is not valid TOML: {exc}") from None
    defaults = data.pop("defaults", {})
    inboxes = data.pop("inbox", [])
    if not isinstance(defaults, dict) or not isinstance(inboxes, list):
        raise OptionError(
            "config", f"watch config {config_path}: [defaults] is a table, [[inbox]] a list of tables"
        )
    _check_types(f"watch config {config_path}", data, TOP_KEYS)
    _check_types(
        f"watch config {config_path} [defaults]",
        defaults,
        {k: v for k, v in INBOX_KEYS.items() if k != "path"},
    )
    if not inboxes:
        raise OptionError("config", f"watch config {config_path} lists no [[inbox]]")
    config = WatchConfig(
        settle_seconds=data.get("settle_seconds"),
        rescan_seconds=data.get("rescan_seconds"),
        polling=data.get("polling"),
        incomplete_after_seconds=data.get("incomplete_after_seconds"),
    )
    base = config_path.parent
    for number, table in enumerate(inboxes, start=1):
        where = f"watch config {config_path}, inbox #{number}"
        if not isinstance(table, dict) or "path" not in table:
            raise OptionError("path", f"{where}: every [[inbox]] needs a path")
        _check_types(where, table, INBOX_KEYS)
        merged = {**defaults, **table}
        prompt = merged.get("prompt")
        if isinstance(prompt, list) and not all(isinstance(item, str) for item in prompt):
            raise OptionError("prompt", f"{where}: prompt is a string or a list of strings")
        options = RequestOptions.from_params(
            {
                "caption_type": merged.get("caption_type", DEFAULT_CAPTION_TYPE),
                "length": str(merged.get("length", DEFAULT_LENGTH)),
                "extra": [str(item) for item in merged.get("extra", [])],
                "name": merged.get("name"),
                "custom_prompt": prompt,
                "prompt_file": base / merged["prompt_file"] if merged.get("prompt_file") else None,
                "prepend": merged.get("prepend", ""),
                "append": merged.get("append", ""),
                "sidecar": merged.get("sidecar", ["txt"]),
                "sidecar_mode": merged.get("sidecar_mode", "skip"),
                "move": merged.get("move", False),
                "done_dir": str(base / merged["done_dir"]) if merged.get("done_dir") else None,
                "failed_dir": str(base / merged["failed_dir"]) if merged.get("failed_dir") else None,
                "skip_flagged_sidecars": merged.get("skip_flagged_sidecars", False),
                "strip_lead_in": merged.get("strip_lead_in", False),
                "drop_sentences": [str(item) for item in merged.get("drop_sentences", [])],
                "dedupe_tags": merged.get("dedupe_tags", False),
            }
        )
        try:
            config.inboxes.append(inbox_config(base / table["path"], settings, options))
        except OptionError as exc:
            raise OptionError(exc.field, f"{where}: {exc}") from None
    return config
