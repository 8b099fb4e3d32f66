"""The fine-tuned student as a detector: base model + LoRA adapter (+ head) from a finetune checkpoint.

    detector = StudentDetector.from_checkpoint("~/.raydar/demo_cells/train/demo_cells-finetune")
    detector.detect([open("cell.png", "rb").read()])
    # [{"label": {"points": [{"label": "explicit", "x": 0.41, "y": 0.22, "score": 0.93}]}, "raw": "...", ...}]

Inference asks exactly what training taught: the same chat prompt (`raydar.sft.SFTExamples`), the
same processor (saved in the checkpoint), greedy decoding, and the answer read back by the task
kind in the family's coordinate convention. VLMs give no confidence, so each object's score is the
geometric mean of its answer tokens' probabilities. Multilabel and regression specs answer with
the head trained beside the adapter, on the hidden states of the prompt and the generated answer
pooled as in training. A point head (`student.point_head`) answers from one forward pass over the
prompt, without generating: each point scored by the head's objectness.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from PIL import Image

from raydar.checkpoint import ADAPTER_DIR, PROCESSOR_DIR, adapter_digest, local_checkpoint, saved_spec
from raydar.heads import HEAD_FILE, PointsHead
from raydar.images import ImageProblem, prepare_image
from raydar.models import load_processor, resolve_base_model
from raydar.sft import SFTExamples
from raydar.spec import DatasetSpec
from raydar.kinds import AnswerError

_ITEM = re.compile(r"\{[^{}]*\}")  # one object of an answer's list: {"label": ..., "x": ..., "y": ...}


class StudentDetector:
    """Greedy, batched detection with one student. Build with `from_checkpoint` or `from_base`."""

    def __init__(self, spec: DatasetSpec, network, processor, *, head=None, model: str, adapter_version: str | None,
                 checkpoint: str | None = None, device: str = "cpu", max_new_tokens: int = 256) -> None:
        self.spec = spec
        self.network = network.eval()
        self.processor = processor
        self.head = head.eval() if head is not None else None
        self.model = model  # the base model's name, as the response reports it
        self.adapter_version = adapter_version  # sha256 of the adapter weights; None for the untuned base
        self.checkpoint = checkpoint
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.builder = SFTExamples.for_student(spec, processor)  # asked as it was trained
        self.kind = self.builder.kind
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        eos = network.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.pad_id}

    # ------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, uri: str, *, device: str | None = None, max_new_tokens: int = 256) -> StudentDetector:
        """A checkpoint folder as the finetune job writes it (raydar.checkpoint; local or any pyarrow URI),
        or a run folder holding several (the best by validation loss is used)."""
        from peft import PeftModel

        folder = local_checkpoint(uri)
        spec = saved_spec(folder)
        device = device or _default_device()
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder / PROCESSOR_DIR)
        network = _load_base(spec, device)
        # Merged into the base weights: the same outputs as the adapter on top, without its extra matmuls.
        network = PeftModel.from_pretrained(network, folder / ADAPTER_DIR).merge_and_unload()
        head = None
        if (folder / HEAD_FILE).is_file():
            from raydar.heads import load_head

            head = load_head(folder).to(device)
        return cls(spec, network.to(device), processor, head=head, model=spec.student.base_model,
                   adapter_version=adapter_digest(folder), checkpoint=str(uri), device=device,
                   max_new_tokens=max_new_tokens)

    @classmethod
    def from_base(cls, spec: DatasetSpec, *, device: str | None = None, max_new_tokens: int = 256) -> StudentDetector:
        """The untuned base model of `spec.student`, asked with the same prompt (the "before" of an evaluation)."""
        device = device or _default_device()
        path = resolve_base_model(spec.student.base_model, spec.student.family)
        processor = load_processor(path, spec.student.max_pixels)
        network = _load_base(spec, device, path)
        return cls(spec, network.to(device), processor, model=spec.student.base_model, adapter_version=None,
                   device=device, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------ detecting
    def detect(self, images: list[bytes]) -> list[dict]:
        """One result per image: `{"label": <schema> | None, "raw": str, "error": str | None, "score": float}`.
        An image that does not decode, or an answer that does not parse, gets `label: None` and the reason."""
        results: list[dict | None] = [None] * len(images)
        ready: list[tuple[int, Image.Image, int, int]] = []
        for i, data in enumerate(images):
            try:
                prepared = prepare_image(data, self.spec.images.max_pixels, self.spec.images.max_image_pixels)
            except ImageProblem as e:
                results[i] = {"label": None, "raw": "", "error": f"image {i}: {e}", "score": 0.0}
                continue
            ready.append((i, prepared.image, prepared.width, prepared.height))
        if ready:
            answer = self._point_head if isinstance(self.head, PointsHead) else self._generate
            for (i, *_), result in zip(ready, answer([image for _, image, _, _ in ready])):
                results[i] = result
        return results

    def _prompt_inputs(self, images: list[Image.Image]) -> dict:
        """The training prompt for each image, left-padded into one batch on the device."""
        return self.processor(text=[self.builder.prompt_text] * len(images), images=images, return_tensors="pt",
                              padding=True, padding_side="left").to(self.device)

    @torch.inference_mode()
    def _point_head(self, images: list[Image.Image]) -> list[dict]:
        """Points from the point head on the image tokens' last hidden states: no text is generated."""
        from raydar.heads import image_token_maps

        inputs = self._prompt_inputs(images)
        hidden = self.network(**inputs, output_hidden_states=True).hidden_states[-1]
        labels = self.head.predict(self.head.outputs(image_token_maps(hidden, inputs, self.network.config)))
        return [{"label": label, "raw": "", "error": None,
                 "score": max((p["score"] for p in label["points"]), default=0.0)} for label in labels]

    @torch.inference_mode()
    def _generate(self, images: list[Image.Image]) -> list[dict]:
        inputs = self._prompt_inputs(images)
        out = self.network.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
        prompt_len = inputs["input_ids"].shape[1]
        new = out.sequences[:, prompt_len:]
        logits = torch.stack(out.logits, dim=1).float()  # (batch, steps, vocab), before any processing
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new[:, : logits.shape[1], None])[..., 0]
        grid = inputs.get("image_grid_thw")
        results = []
        for row, image in enumerate(images):
            ids, lps = [], []
            for token, lp in zip(new[row].tolist(), logprobs[row].tolist()):
                if token in self.stop_ids:
                    break
                ids.append(token)
                lps.append(lp)
            seen = self.builder.seen_size({"image_grid_thw": grid[row: row + 1]} if grid is not None else {}, image)
            results.append(self._read_answer(ids, lps, *seen))
        if self.head is not None:
            for result, label in zip(results, self._head_labels(inputs, new)):
                result.update(label=label, error=None)
        return results

    def _read_answer(self, ids: list[int], logprobs: list[float], width: int, height: int) -> dict:
        """Parse the answer in the family's convention; score each object from its tokens' log-probabilities."""
        tokenizer = self.processor.tokenizer
        raw = tokenizer.decode(ids, skip_special_tokens=True)
        answer_score = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
        try:
            label = self.kind.parse(raw, width, height)
        except AnswerError as e:
            return {"label": None, "raw": raw, "error": f"unusable answer: {e}", "score": answer_score}
        objects = label.get(self.kind.objects_key) if self.kind.objects_key else None
        scores = object_scores(tokenizer, ids, logprobs, len(objects)) if objects is not None else None
        label = self.kind.with_scores(label, scores, answer_score)
        return {"label": label, "raw": raw, "error": None, "score": answer_score}

    def _head_labels(self, inputs, new: torch.Tensor) -> list[dict]:
        """The head on the pooled hidden states of prompt + generated answer: the sequence it was trained on."""
        from raydar.heads import pool_hidden

        answer_mask = torch.ones_like(new)
        for row in range(new.shape[0]):  # the answer ends at its first stop token (kept, as training kept it)
            stops = [j for j, t in enumerate(new[row].tolist()) if t in self.stop_ids]
            if stops:
                answer_mask[row, stops[0] + 1:] = 0
        full = dict(inputs)
        full["input_ids"] = torch.cat([inputs["input_ids"], new], dim=1)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], answer_mask], dim=1)
        if "mm_token_type_ids" in full:  # generated tokens are text (type 0)
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
        hidden = self.network(**full, output_hidden_states=True).hidden_states[-1]
        return self.head.predict(self.head(pool_hidden(hidden, full["attention_mask"])))


def object_scores(tokenizer, ids: list[int], logprobs: list[float], n_objects: int) -> list[float] | None:
    """Per object of an answer's list, exp(mean log-probability) of the tokens that wrote it; None when the
    answer's objects cannot be lined up with its text (the caller then uses the whole answer's score)."""
    prefixes = [ids[: k + 1] for k in range(len(ids))]  # where each token's text ends: decode every prefix
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers decode them all in one call
    texts = backend.decode_batch(prefixes, skip_special_tokens=True) if backend is not None else \
        [tokenizer.decode(p, skip_special_tokens=True) for p in prefixes]
    ends = [len(t) for t in texts]
    text = texts[-1] if texts else ""
    spans = []
    for match in _ITEM.finditer(text):
        try:
            item = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and "label" in item:
            spans.append(match.span())
    if len(spans) != n_objects:
        return None
    scores = []
    for start, end in spans:
        inside = [lp for k, lp in enumerate(logprobs) if ends[k] > start and (ends[k - 1] if k else 0) < end]
        scores.append(math.exp(sum(inside) / len(inside)) if inside else 0.0)
    return scores


# ---------------------------------------------------------------- loading helpers


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_base(spec: DatasetSpec, device: str, path: Path | None = None):
    """The base model in full precision (bf16 on GPUs that have it). A QLoRA adapter applies to it as it
    does to the 4-bit weights it was trained on; serving does not quantise."""
    from transformers import AutoModelForImageTextToText

    path = path or resolve_base_model(spec.student.base_model, spec.student.family)
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
