"""Supervised fine-tuning examples: a labelled image becomes a chat the student learns to finish.

The user turn holds the image and the task's prompt; the assistant turn is the label written by the
task kind (`TaskKind.answer_text`) in the student family's coordinate convention, for the image
size the processor really produced (Qwen resizes to multiples of 28 within its pixel budget, and
Qwen2.5-VL answers in those pixels). The loss is on the answer tokens only: every prompt and
image token is labelled -100.

    builder = SFTExamples(processor, FAMILIES["qwen2_vl"], kind_of(spec.task, "per_mille"), prompt)
    batch = collate([builder.example(image, label) for image, label in rows], processor)
    loss = model(**batch).loss
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from raydar.models.families import FAMILIES, Family
from raydar.kinds import TaskKind, kind_of

IGNORE = -100  # the label torch's cross-entropy skips


def student_prompt(spec, kind: TaskKind) -> str:
    """What the student is trained and asked with: `student.prompt`, else the teacher's prompt."""
    return spec.student.prompt or kind.prompt()


# The eight symmetries of a square as (PIL transpose or None, the same map on normalised coordinates).
_SYMMETRIES = [
    (None, lambda x, y: (x, y)),
    (Image.Transpose.FLIP_LEFT_RIGHT, lambda x, y: (1 - x, y)),
    (Image.Transpose.FLIP_TOP_BOTTOM, lambda x, y: (x, 1 - y)),
    (Image.Transpose.ROTATE_180, lambda x, y: (1 - x, 1 - y)),
    (Image.Transpose.TRANSPOSE, lambda x, y: (y, x)),
    (Image.Transpose.TRANSVERSE, lambda x, y: (1 - y, 1 - x)),
    (Image.Transpose.ROTATE_90, lambda x, y: (y, 1 - x)),  # counter-clockwise
    (Image.Transpose.ROTATE_270, lambda x, y: (1 - y, x)),
]


def augmented(image: Image.Image, label: dict, kind: TaskKind, rng) -> tuple[Image.Image, dict]:
    """The image flipped or turned by a quarter at random (`rng.integers`), and its label moved along."""
    op, move = _SYMMETRIES[int(rng.integers(len(_SYMMETRIES)))]
    if op is None:
        return image, label
    return image.transpose(op), kind.moved(label, move)


def user_turn(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


@dataclass
class SFTExamples:
    """Builds examples for one student: its processor and family, one task kind and prompt."""

    processor: object
    family: Family
    kind: TaskKind  # built with the family's coordinate convention
    prompt: str

    @classmethod
    def for_student(cls, spec, processor) -> SFTExamples:
        """The builder of the spec's student: its family's coordinates and `student_prompt`. Training and
        inference both take it from here, so the student is asked exactly as it was taught."""
        family = FAMILIES[spec.student.family]
        kind = kind_of(spec.task, family.coordinates)
        return cls(processor, family, kind, student_prompt(spec, kind))

    def __post_init__(self) -> None:
        if self.kind.coordinates != self.family.coordinates:
            raise ValueError(
                f"the task kind writes {self.kind.coordinates} coordinates but {self.family.name} models use "
                f"{self.family.coordinates}: build it with kind_of(spec, FAMILIES[{self.family.name!r}].coordinates)"
            )
        self.prompt_text = self.processor.apply_chat_template(
            user_turn(self.prompt), add_generation_prompt=True, tokenize=False
        )

    def example(self, image: Image.Image, label: dict | None = None) -> dict[str, torch.Tensor]:
        """Tensors for one image; with a label, also the answer tokens and their training labels."""
        inputs = self.processor(text=[self.prompt_text], images=[image.convert("RGB")], return_tensors="pt")
        example = {k: v for k, v in inputs.items()}
        if label is None:
            return example
        answer = self.kind.answer_text(label, *self.seen_size(inputs, image))
        full_text = self.processor.apply_chat_template(
            user_turn(self.prompt) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            tokenize=False,
        )
        if not full_text.startswith(self.prompt_text):
            raise ValueError(f"{self.family.name}: the chat template does not extend the prompt with the answer")
        answer_ids = self.processor.tokenizer(
            full_text[len(self.prompt_text):], add_special_tokens=False, return_tensors="pt"
        )["input_ids"]
        prompt_ids = example["input_ids"]
        example["input_ids"] = torch.cat([prompt_ids, answer_ids], dim=1)
        example["attention_mask"] = torch.ones_like(example["input_ids"])
        if "mm_token_type_ids" in example:  # text tokens are type 0
            example["mm_token_type_ids"] = torch.cat(
                [example["mm_token_type_ids"], torch.zeros_like(answer_ids)], dim=1
            )
        example["labels"] = torch.cat([torch.full_like(prompt_ids, IGNORE), answer_ids], dim=1)
        return example

    def seen_size(self, inputs: dict, image: Image.Image) -> tuple[int, int]:
        """(width, height) of the image as the model sees it, from what the processor returned."""
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return image.size  # fixed-size encoders: positions are fractions, the size does not enter
        patch = self.processor.image_processor.patch_size
        _, rows, cols = (int(v) for v in grid[0])
        return cols * patch, rows * patch


def collate(examples: list[dict[str, torch.Tensor | np.ndarray]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the token sequences (labels with -100) and join the images as the family expects.

    Padded and joined with numpy, not torch: the fine-tuning worker runs this on its prefetch thread, and
    a parallel torch op on a second thread starts a second OpenMP thread team. On a machine whose cores
    the training thread's team fills, libgomp then stops spinning between ops, and the training thread's
    steps took 1.2-1.3x as long (2 cores, bench/prefetch_thread.py)."""
    arrays = [{key: np.asarray(value) for key, value in e.items()} for e in examples]
    longest = max(e["input_ids"].shape[1] for e in arrays)
    batch: dict[str, torch.Tensor] = {}
    for key in arrays[0]:
        values = [e[key] for e in arrays]
        if key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
            fill = {"input_ids": pad_token_id, "labels": IGNORE}.get(key, 0)
            values = [np.pad(v, ((0, 0), (0, longest - v.shape[1])), constant_values=fill) for v in values]
        # images: Qwen's patches one image after another (with image_grid_thw), LLaVA's stacked
        batch[key] = torch.from_numpy(np.concatenate(values, axis=0))
    return batch


def pack_example(example: dict[str, torch.Tensor]) -> bytes:
    """An example's tensors as bytes (an uncompressed .npz), for the trainer's Ray Data rows."""
    unsupported = [key for key, value in example.items() if value.dtype == torch.bfloat16]
    if unsupported:
        raise TypeError(f"example tensors {', '.join(unsupported)}: bfloat16 has no numpy dtype; examples are "
                        "the processor's float32 outputs")
    buffer = io.BytesIO()
    np.savez(buffer, **{key: value.detach().cpu().numpy() for key, value in example.items()})
    return buffer.getvalue()


def unpack_example(data: bytes) -> dict[str, np.ndarray]:
    """`pack_example`'s arrays, read without torch (see `collate`) and without pickle."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}
