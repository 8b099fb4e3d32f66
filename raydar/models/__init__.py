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
