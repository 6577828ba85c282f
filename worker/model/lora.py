"""LoRA adapters as upstream's ``finetuning/train.py`` makes them: applied over a model, merged.

Upstream trains with peft on the whole LLaVA (``LoraConfig(r=64, lora_alpha=64,
target_modules=TARGET_MODULES)``; SigLIP's attention has q/k/v projections too, so those match
as well), saves with ``save_pretrained`` and loads with ``PeftModel.from_pretrained``. vLLM takes
no LoRA on VLMs, so ``merge_lora`` writes the merged checkpoint it (or anyone) can load.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from joycap_queue.config import TINY_MODEL_MARKER
from joycap_queue.errors import first_line
from worker.backends.base import ModelLoadError

log = logging.getLogger(__name__)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Files of a checkpoint folder that are not weights: the tokenizer, the processor, the chat
# template, and the tiny model's marker. Copied as they are so the merged folder works as --model.
_CHECKPOINT_EXTRAS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    TINY_MODEL_MARKER,
)


def apply_adapter(model: Any, folder: str, *, merge: bool) -> Any:
    """``model`` with the peft LoRA adapter in ``folder``; ModelLoadError (one line) if it will not fit.

    Merged into the weights when they are not quantized (no extra matmuls per step, and the very
    model ``merge_lora`` writes); over quantized weights it stays a side branch, since merging into
    8 or 4 bits would round the adapter away.
    """
    try:
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(model, folder)
    except Exception as exc:
        raise ModelLoadError(f"cannot apply the LoRA adapter {folder}: {first_line(exc)}") from exc
    return wrapped.merge_and_unload() if merge else wrapped.get_base_model()


def merge_lora(base: str, adapter: str, out: str | Path, *, dtype: str = "auto") -> Path:
    """Write ``base`` with ``adapter`` merged into its weights to the folder ``out``."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from joycap_queue.captions.modelspec import spec_of
    from worker.model.captioner import DTYPES, source_folder

    spec = spec_of(base, "none", adapter)  # OptionError (one line) for a folder that is no adapter
    source = source_folder(base)
    # The checkpoint's own dtype unless told: a merged bf16 model stays bf16 (16 GB, not 32).
    torch_dtype: Any = "auto" if dtype == "auto" else DTYPES[dtype]
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {base!r}: {first_line(exc)}") from exc
    with torch.inference_mode():
        merged = apply_adapter(model, spec.adapter, merge=True)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if Path(source).is_dir():
        for name in _CHECKPOINT_EXTRAS:
            if (Path(source) / name).is_file() and not (target / name).exists():
                shutil.copy2(Path(source) / name, target / name)
    else:
        _save_processor(source, target)
    log.info("merged %s into %s: %s", spec.adapter, base, target)
    return target


def _save_processor(source: str, target: Path) -> None:
    # A hub checkpoint: its processor files come through transformers, as from_pretrained reads them.
    try:
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(source).save_pretrained(target)
    except Exception as exc:  # noqa: BLE001 - the weights and tokenizer are what captions need
        log.warning("processor files not copied: %s", first_line(exc))


def build_lora_adapter(base: str | Path, out: str | Path, *, seed: int = 0, scale: float = 0.2) -> Path:
    """An adapter for ``base`` built the way upstream's train.py builds one, with random non-zero
    weights (peft starts B at zero, which would change nothing): for tests and benchmarks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    wrapped = get_peft_model(
        model, LoraConfig(r=64, lora_alpha=64, lora_dropout=0.1, target_modules=TARGET_MODULES)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    wrapped.save_pretrained(str(out))
    return Path(out)
