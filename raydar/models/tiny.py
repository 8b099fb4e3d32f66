"""Tiny but real vision-language models, built from config, for tests and the CPU demo.

No weights can be downloaded here, so raydar builds its own: a byte-level BPE tokenizer trained on
an in-code corpus, a processor and a randomly initialised model of each family, saved in Hugging
Face format so that the code under test loads them exactly as it loads a real checkpoint:

    from transformers import AutoModelForImageTextToText, AutoProcessor
    from raydar.models.tiny import build_tiny_model

    path = build_tiny_model("qwen2_vl")                  # or "qwen2_5_vl", "llava"
    path = build_tiny_model("llava", hidden_size=128)    # any field of TinySize
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)

Without `out_dir` a model lands in `$RAYDAR_MODEL_CACHE` (default `~/.cache/raydar/models`) under
a name that hashes its recipe, and a second call returns it without rebuilding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava")

# Bump when the recipe changes in a way the hashed fields do not show, so caches rebuild.
RECIPE_VERSION = 1
MARKER = "raydar_tiny.json"  # written last; a folder without it is not a finished model


@dataclass(frozen=True)
class TinySize:
    """Sizes of a tiny model; every field is a keyword of `build_tiny_model`."""

    vocab_size: int = 1024  # upper bound for BPE training; the small corpus may stop it earlier
    hidden_size: int = 64  # language model width; also the vision projector's output
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # fewer than the heads, as in the real checkpoints (GQA)
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    patch_size: int = 14
    max_pixels: int = 112 * 112  # Qwen: 224x224 → 112x112 → 8x8 patches → 16 image tokens; more is slower
    image_size: int = 56  # LLaVA: CLIP input side; 56 / 14 → 4x4 patches → 16 image tokens


def build_tiny_model(family: str, out_dir: str | Path | None = None, *, seed: int = 0, corpus: str | None = None,
                     **size) -> Path:
    """Build (or find already built) a tiny `family` model and return its folder. `corpus` is the
    tokenizer's training text (default `CORPUS`); a model that must spell more words in few tokens adds them.

    The folder is written under a temporary name beside `out_dir` and renamed into place, so a
    crash never leaves half a model and concurrent builders (Ray workers) race harmlessly.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    sizes = TinySize(**size)
    corpus = CORPUS if corpus is None else corpus
    recipe = {
        "family": family,
        "seed": seed,
        "size": asdict(sizes),
        "corpus_sha256": hashlib.sha256(corpus.encode()).hexdigest(),
        "recipe_version": RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    if out_dir is None:
        cache = Path(os.environ.get("RAYDAR_MODEL_CACHE") or "~/.cache/raydar/models")
        out_dir = cache / f"{family}-tiny-{digest}"
    out = Path(out_dir).expanduser().resolve()
    if _holds(out, recipe):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_model(family, sizes, seed, tmp, corpus)
        (tmp / MARKER).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private to this user
        try:
            tmp.rename(out)  # atomic; refuses a non-empty target
        except OSError:
            if not _holds(out, recipe):  # not simply another builder that finished first
                raise FileExistsError(f"{out} exists and does not hold this tiny {family} model") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _holds(folder: Path, recipe: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == recipe
    except (OSError, ValueError):
        return False


def _write_model(family: str, size: TinySize, seed: int, folder: Path, corpus: str) -> None:
    tokenizer = train_tokenizer(family, size.vocab_size, corpus)
    if family == "llava":
        processor = _llava_processor(tokenizer, size)
        config = _llava_config(tokenizer, size)
    else:
        processor = _qwen_processor(family, tokenizer, size)
        config = _qwen_config(family, tokenizer, size)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = _generation_config(family, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# Tokenizer -----------------------------------------------------------------------------------

# What the models read and write in raydar: prompts, JSON answers of the five task kinds, class
# names, chat roles. Digits are split one by one, so any number is spelled from these ten.
CORPUS = """\
You are a helpful assistant.
Find every mast cell in this microscopy image, including faint ones. Give one point per cell, at the cell's centre.
Find every object in this image and give its box. Describe what it is and what it is doing.
Describe the image in at most 30 words, naming the entity. Which landmark, artwork or dish is this?
This is a frontal chest radiograph. For each finding listed, give the probability that it is present.
Estimate the calories, proteins, fats and carbs of the food in this image, in kcal and grams.
Classes:
- explicit: a clearly visible cell with a sharp outline and dark granules
- implicit: a faint or partly hidden cell, blurred or out of focus
Answer format: {"points": [{"label": "<class>", "x": <x>, "y": <y>}, ...]} with one entry per object at its centre; x and y are fractions of the image width and height, from 0 to 1, x from the left, y from the top. An image with none: {"points": []}.
Answer format: {"objects": [{"label": "<class>", "box": [x1, y1, x2, y2], "description": "<what it is and what it is doing>"}, ...]}; box corners are integers from 0 to 1000 across the image width and height, (x1, y1) top-left, (x2, y2) bottom-right.
Also give 2 question-answer pairs about the image in "qa": [{"question": "...", "answer": "..."}].
Answer format: {"entity": "<entity name>", "caption": "<description of the image>"}.
Answer format: {"probabilities": {"<finding>": <probability 0-1>, ...}} with every finding listed.
Answer format: {"values": {"<target>": <number>, ...}} with every target. Answer with the JSON only.
{"points": [{"label": "explicit", "x": 0.41, "y": 0.22}, {"label": "implicit", "x": 0.7, "y": 0.58}]}
{"points": [{"label": "implicit", "x": 0.135, "y": 0.9, "score": 0.87}]}
{"points": []}
{"objects": [{"label": "person", "box": [12, 40, 388, 951], "description": "a person riding a bicycle"}]}
{"objects": [{"label": "dog", "box": [0.1, 0.25, 0.5, 0.75], "score": 0.6}], "qa": []}
{"entity": "Eiffel Tower", "caption": "The Eiffel Tower in Paris at night, lit in gold."}
{"probabilities": {"atelectasis": 0.1, "cardiomegaly": 0.72, "effusion": 0.05, "no finding": 0.2}}
{"values": {"calories": 540, "proteins": 32.5, "fats": 18, "carbs": 61.25}}
```json
{"label": "explicit", "x": 0.3, "y": 0.46}
```
0 1 2 3 4 5 6 7 8 9 10 100 1000 0.0 0.5 1.0 -1 +1 3.14 2.718 42 % : ; , . ! ? ' " ( ) [ ] { } < > / \\ | _ - = * & # @ ~ ^ $
system
user
assistant
USER: <image>
What is in this image? ASSISTANT: A cell, a person, a dog, a car, a tree, a building and food on a plate.
The answer is yes. The answer is no. There is none. There are two cells and one is faint.
label labels x y box boxes point points score scores class classes object objects caption entity
question answer values probability probabilities true false null left right top bottom width height
"""

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]

# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, whitespace.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(family: str, vocab_size: int = TinySize.vocab_size,
                    corpus: str = CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `family`'s special tokens and chat template, trained on `corpus`.

    Byte-level, so every string (JSON, any language) encodes and decodes back unchanged.
    """
    specials = _LLAVA_SPECIALS if family == "llava" else _QWEN_SPECIALS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus.splitlines(), trainer)
    if family == "llava":
        names = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
        template = _LLAVA_CHAT_TEMPLATE
    else:
        names = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
        template = _QWEN_CHAT_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        extra_special_tokens=[t for t in specials if t not in names.values()],
        **names,
    )


# Qwen2-VL's own template (Qwen2.5-VL ships the same), so prompts look as they will on the real model.
_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>". The generation
# prompt stops at "ASSISTANT:" so that it tokenizes as the start of a training example does.
_LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %} {% endif %}"
    "{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] if content['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


# Processors and configs ----------------------------------------------------------------------


def _qwen_processor(family: str, tokenizer, size: TinySize):
    pixels = {
        "size": {"shortest_edge": 56 * 56, "longest_edge": size.max_pixels},
        "patch_size": size.patch_size,
    }
    processor_class = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=tokenizer.chat_template,
    )


def _qwen_config(family: str, tokenizer, size: TinySize):
    ids = tokenizer.convert_tokens_to_ids
    half_head = size.hidden_size // size.num_attention_heads // 2
    spatial = half_head * 3 // 8  # Qwen's [16, 24, 24] split of 64 rotary pairs, scaled down
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [half_head - 2 * spatial, spatial, spatial],
        },
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    vision = {
        "depth": size.vision_depth,
        "num_heads": size.vision_num_heads,
        "patch_size": size.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_vl":
        vision |= {"embed_dim": size.vision_hidden_size, "hidden_size": size.hidden_size, "mlp_ratio": 2}
        config_class = Qwen2VLConfig
    else:
        vision |= {
            "hidden_size": size.vision_hidden_size,
            "intermediate_size": 2 * size.vision_hidden_size,
            "out_hidden_size": size.hidden_size,
            "window_size": 4 * size.patch_size * 2,  # 4x4 merged tokens per window, as 112 px is for patch 14
            "fullatt_block_indexes": [size.vision_depth - 1],
        }
        config_class = Qwen2_5_VLConfig
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _llava_processor(tokenizer, size: TinySize) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",  # drop CLIP's CLS token: one image token per patch
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _llava_config(tokenizer, size: TinySize) -> LlavaConfig:
    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden_size,
        intermediate_size=2 * size.vision_hidden_size,
        num_hidden_layers=size.vision_depth,
        num_attention_heads=size.vision_num_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=4096,
        bos_token_id=ids("<s>"),
        eos_token_id=ids("</s>"),
        pad_token_id=ids("<pad>"),
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids("<image>"),
        image_seq_length=(size.image_size // size.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _generation_config(family: str, tokenizer) -> GenerationConfig:
    """Stop at the end of the assistant's turn, as the real chat checkpoints do."""
    ids = tokenizer.convert_tokens_to_ids
    if family == "llava":
        return GenerationConfig(bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"))
    return GenerationConfig(
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"),
    )
