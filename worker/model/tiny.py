"""A tiny random-weight stand-in for JoyCaption, built offline in seconds for tests and demos.

It has JoyCaption's classes and config keys (LLaVA = SigLIP vision tower at 384 px, patch 14, so
27 x 27 = 729 image tokens, "full" feature selection, layer -2, GELU projector, Llama text model)
and a Llama-3.1-style tokenizer and chat template, so the worker runs the same transformers calls
on it as on the real 8B checkpoint. Its captions are random text.

The image token is ``<|reserved_special_token_69|>``, the reserved Llama-3.1 token JoyCaption's
hf-llava checkpoints use (id 128077 there; a different id here, read it from the config).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from joycap_queue.config import TINY_MODEL_MARKER

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
IMAGE_TOKEN = "<|reserved_special_token_69|>"
SPECIAL_TOKENS = [BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD, IMAGE_TOKEN]

IMAGE_SIZE = 384
PATCH_SIZE = 14
BPE_VOCAB_SIZE = 768
# Llama 3's pre-tokenizer split: keeps "\n\n" after a header one piece, as there.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3.1 layout: BOS once, then "<|start_header_id|>role<|end_header_id|>\n\n" + content +
# "<|eot_id|>" per message. Like JoyCaption's template, the image token opens the first user
# message and any copy the user typed is removed, so a prompt holds exactly one. Content may be a
# string or a list of {"type": "text"|"image"} parts (the processor's format).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set ns = namespace(image_placed=false) %}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '" + START_HEADER + "' + message['role'] + '" + END_HEADER + "\\n\\n' }}"
    "{%- if message['role'] == 'user' and not ns.image_placed %}"
    "{%- set ns.image_placed = true %}"
    "{{- '" + IMAGE_TOKEN + "' + text.replace('" + IMAGE_TOKEN + "', '').lstrip() }}"
    "{%- else %}{{- text }}{%- endif %}"
    "{{- '" + EOT + "' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '" + START_HEADER + "assistant" + END_HEADER + "\\n\\n' }}"
    "{%- endif %}"
)

_WORDS = (  # noqa: SIM905 (a list literal of 90 words would be 90 lines after formatting)
    "a an the this that photo picture image painting drawing render scene of with and in on under "
    "near behind woman man child dog cat bird car tree house street city forest river mountain sky "
    "red green blue yellow white black bright dark soft warm cold light shadow close-up wide shot "
    "standing sitting walking holding wearing looking smiling old young small large wooden stone "
    "glass metal background foreground left right center detailed blurry sharp colorful quiet "
    "evening morning night sunset window table chair flower grass water snow rain cloud road"
).split()


def _prompt_texts() -> Iterator[str]:
    """Every string in JoyCaption's prompt vocabulary, with the placeholders filled in."""
    data = json.loads(
        resources.files("joycap_queue").joinpath("data/joycaption-prompts.json").read_text("utf-8")
    )
    for profile in ("alpha-two", "beta-one"):
        section = data[profile]
        yield section["system_prompt"]
        for templates in section["caption_types"].values():
            for template, length in zip(templates, ("any", "40", "long"), strict=True):
                yield template.format(name="{NAME}", length=length, word_count=length)
        yield from (option.format(name="{NAME}") for option in section["extra_options"])


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = list(_prompt_texts())
    # The chat template's own words, so role names and the blank line become tokens of their own.
    lines += ["system\n\n", "user\n\n", "assistant\n\n"] * 50
    for _ in range(2000):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ".", ",", "!", "?"]))
    return lines


def trained_bpe(seed: int) -> Tokenizer:
    """A byte-level BPE with Llama 3's pre-tokenizer split, trained on the prompt vocabulary;
    no special tokens yet (the tiny model and the benchmark's model place them differently)."""
    # Imports inside: importing this module stays cheap (the CLI lists it without building).
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(seed), trainer=trainer)
    return backend


def llama_tokenizer(backend: Tokenizer, bos_id: int) -> PreTrainedTokenizerFast:
    """``backend`` (holding Llama 3.1's special tokens) as a transformers tokenizer with its
    chat template; plain ``encode`` adds BOS (id ``bos_id``), as Llama 3.1's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    # Like Llama 3.1: plain encode() adds BOS, so a template that also writes it gives two.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        padding_side="left",
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _build_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    backend = trained_bpe(seed)
    # Specials after the learned vocabulary, as in Llama 3 (ids 128000+ there).
    backend.add_special_tokens(SPECIAL_TOKENS)
    bos_id = backend.token_to_id(BOS)
    assert bos_id is not None  # added just above
    return llama_tokenizer(backend, bos_id)


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, profile: str = "beta-one") -> Path:
    """Build a random-weight JoyCaption look-alike in ``out_dir`` (offline, seconds, about 1 MB).

    Loadable with ``LlavaForConditionalGeneration.from_pretrained``, ``AutoTokenizer`` and
    ``AutoProcessor``. Same seed, same weights and tokenizer. ``profile`` only names the prompt
    vocabulary the light side should use with it; it is recorded in the marker file.
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(seed)
    vocab = tokenizer.get_vocab()
    ids = {token: vocab[token] for token in SPECIAL_TOKENS}

    vision_config = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        # LLaVA reads hidden states; SigLIP's pooling head would be dead weight.
        vision_use_head=False,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[END_OF_TEXT]],
        pad_token_id=ids[PAD],
        # At the usual 0.02 the random logits are nearly flat (median top-1 margin 0.03, greedy
        # loops on 3 tokens in 64); at 0.2 the margin is 0.4 and the text varies (13 of 64).
        initializer_range=0.2,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=ids[IMAGE_TOKEN],
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[END_OF_TEXT]], pad_token_id=ids[PAD]
    )
    model.save_pretrained(out)

    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)  # writes the tokenizer files too

    marker = {
        "random_weights": True,
        "profile": profile,
        "note": "captions from this model are random text",
    }
    (out / TINY_MODEL_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    # safetensors writes 0600; a worker running as another user (a container) must read it.
    for path in out.iterdir():
        path.chmod(0o644)
    return out
