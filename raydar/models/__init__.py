"""Model families, their coordinate conventions, and tiny models built from config for tests and the demo."""

from __future__ import annotations

from pathlib import Path

from raydar.spec import SpecError

TINY_PREFIX = "raydar-tiny-"  # base_model: raydar-tiny-qwen2-vl etc.: built from config, no download


def resolve_base_model(name: str, family: str) -> Path:
    """A local folder, a tiny model built here (`raydar-tiny-<family>`), or a model in the local cache.
    Shared by training and serving, so both load the very same base."""
    if name.startswith(TINY_PREFIX):
        from raydar.models.tiny import TINY_FAMILIES, build_tiny_model

        tiny = name[len(TINY_PREFIX):].replace("-", "_")
        if tiny not in TINY_FAMILIES:
            raise SpecError(f"student.base_model: unknown tiny model {name!r}; expected raydar-tiny-<"
                            f"{'|'.join(f.replace('_', '-') for f in TINY_FAMILIES)}>")
        return build_tiny_model(tiny)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(f"student.base_model: {path} holds no config.json; not a Hugging Face model folder")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise SpecError(
            f"student.base_model: {name!r} is neither a folder nor in the local Hugging Face cache; download it "
            "first (huggingface-cli download) or give its folder"
        ) from None


def load_processor(path: str | Path, max_pixels: int):
    """The model's processor with its pixel budget set to `max_pixels` (the spec's `student.max_pixels`):
    Qwen VL processors resize every image to at most that many pixels, in multiples of 28, so that
    training, evaluation and serving see images alike. Fixed-size encoders (LLaVA's CLIP) ignore it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    if getattr(size, "longest_edge", None) is not None:  # Qwen: a budget of pixels, not a side
        size.longest_edge = max_pixels
        if getattr(image_processor, "max_pixels", None) is not None:
            image_processor.max_pixels = max_pixels
    return processor
