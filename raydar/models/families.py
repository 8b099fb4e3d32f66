"""Model families and how each one writes positions, applied at the model boundary only.

Labels keep coordinates normalised to [0, 1] of the original image. A student answers in its
family's own convention, and getting that wrong is the most reported bug in VLM grounding
fine-tunes:
- `qwen2_vl`: integers 0-1000 across the image;
- `qwen2_5_vl` (and later Qwen VL models): pixels of the image as the model sees it, after its
  processor resized it to multiples of 28 within its pixel budget;
- `llava`: fractions of the image, 0-1.

    family = FAMILIES["qwen2_5_vl"]
    w, h = family.model_image_size(1000, 500, max_pixels=401408)       # (896, 448)
    target = kind_of(spec.task, family.coordinates).answer_text(label, w, h)
"""

from __future__ import annotations

from dataclasses import dataclass

QWEN_PATCH = 28  # 14-pixel patches merged 2x2: Qwen2-VL's processor sizes images in multiples of 28
QWEN_MIN_PIXELS = 56 * 56


@dataclass(frozen=True)
class Family:
    name: str
    coordinates: str  # a convention of raydar.kinds: normalized, per_mille or pixels
    patch_multiple: int | None  # sides the processor rounds the image to, or None for a fixed-size encoder

    def model_image_size(self, width: int, height: int, max_pixels: int) -> tuple[int, int]:
        """(width, height) of the image as the model sees it; the extent `pixels` coordinates refer to."""
        if self.patch_multiple is None:
            return width, height  # positions are fractions: the encoder's own size does not enter
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=self.patch_multiple, min_pixels=QWEN_MIN_PIXELS,
                            max_pixels=max_pixels)
        return w, h


FAMILIES = {
    "qwen2_vl": Family("qwen2_vl", "per_mille", QWEN_PATCH),
    "qwen2_5_vl": Family("qwen2_5_vl", "pixels", QWEN_PATCH),
    "llava": Family("llava", "normalized", None),
}
