"""The RAG-augmented detector: a VLM shown the most similar labelled examples before the question.

For a query image: find the k labelled examples whose images look most like it (the knowledge
base's image search, optionally filtered, never the query image itself), and send one few-shot
conversation to an OpenAI-compatible VLM (the teacher's endpoint or a locally served model):

    system     the task prompt: instruction, the ontology's classes and descriptions, answer format
    user       "Example 1 (...)" + example image 1          (base64 data URLs)
    assistant  example 1's label, as the answer the model should give, in the teacher's coordinates
    ...        one user/assistant pair per example
    user       "Now this image." + the query image

The answer is parsed by the task kind, as the label job parses the teacher's, so the result is in the
kind's schema with coordinates normalised to [0, 1]. With `examples_per_prompt: 0` (or an empty
filter result) it asks zero-shot, exactly as the label job asks the teacher: the baseline RAG is
measured against.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass

from raydar.images import ImageProblem, image_id, prepare_image, teacher_payload
from raydar.kb import (
    Hit,
    KnowledgeBase,
    KnowledgeBaseError,
    QueryImageError,
    SourceImages,
)
from raydar.spec import DatasetSpec
from raydar.kinds import kind_of
from raydar.teacher.client import TeacherClient, image_message, image_part

log = logging.getLogger(__name__)

SYSTEM_INTRO = (
    "You label images for the task below. Before the image you are asked about, you are shown labelled "
    "examples of similar images from the same collection, each followed by its correct answer: use them to "
    "see what each class looks like here, including the hard ones. Then answer for the last image only, in "
    "the same format."
)


class RagError(RuntimeError):
    """The VLM gave no usable answer (after the client's retries), or the detector cannot be built."""


@dataclass(frozen=True)
class Example:
    """A retrieved example as it goes into the prompt."""

    hit: Hit
    payload: bytes
    media_type: str
    answer: str


class RagDetector:
    """Detects with a VLM prompted with retrieved labelled examples. Use from one event loop."""

    def __init__(self, spec: DatasetSpec, kb: KnowledgeBase, client: TeacherClient, *,
                 images: SourceImages | None = None, k: int | None = None, where: dict | None = None,
                 cache_size: int = 256) -> None:
        self.spec = spec
        self.kb = kb
        self.client = client
        self.kind = kind_of(spec.task, spec.teacher.coordinates)
        self.k = spec.knowledge_base.examples_per_prompt if k is None else k
        self.where = dict(spec.knowledge_base.where) if where is None else where
        self.images = images
        self._cache: OrderedDict[str, Example] = OrderedDict()  # example id -> encoded image and answer
        self._cache_size = cache_size

    @classmethod
    def from_spec(cls, spec: DatasetSpec, storage, *, base_url: str | None = None, read_only: bool = True,
                  k: int | None = None, where: dict | None = None) -> RagDetector:
        """The knowledge base of `spec` under `storage` (its snapshot, read-only, by default) and a
        client for `base_url`, else the spec's teacher endpoint."""
        url = base_url or spec.teacher.base_url
        if spec.teacher.kind == "simulated" and not url:
            raise RagError(
                "the spec's teacher is the simulated one and has no base_url: start it "
                "(`raydar teacher serve --ground-truth <images>`) and pass its URL as base_url"
            )
        kb = KnowledgeBase.open(spec, storage, read_only=read_only)
        client = TeacherClient(spec.teacher, kind_of(spec.task, spec.teacher.coordinates), base_url=url)
        return cls(spec, kb, client, images=SourceImages(spec, storage), k=k, where=where)

    async def close(self) -> None:
        await self.client.close()
        self.kb.close()

    # ------------------------------------------------------------------
    async def detect(self, image: bytes, *, where: dict | None = None) -> dict:
        """`{"label": <the kind's schema>, "raw": <the VLM's answer>, "examples": [image ids shown]}`."""
        try:
            prepared = prepare_image(image, self.spec.images.max_pixels, self.spec.images.max_image_pixels)
        except ImageProblem as e:
            raise QueryImageError(f"query image cannot be used: {e}") from None
        examples = await self.examples_for(prepared.image, image_id(image), where)
        payload, media_type = teacher_payload(image, prepared, self.spec.teacher.image_format)
        messages = self.messages(examples, payload, media_type)
        answer = await self.client.ask(messages, *prepared.image.size)
        if not answer.ok:
            raise RagError(f"the VLM gave no usable answer: {answer.error}")
        return {"label": answer.label, "raw": answer.raw, "examples": [e.hit.id for e in examples]}

    async def examples_for(self, image, query_id: str, where: dict | None = None) -> list[Example]:
        """The k most similar labelled examples (not the query itself), ready for the prompt."""
        if self.k <= 0:
            return []
        merged = {**self.where, **(where or {})}
        hits = await asyncio.to_thread(self.kb.search_image, image, self.k, merged or None, [query_id])
        examples = []
        for hit in hits:
            try:
                examples.append(await self._example(hit))
            except (KnowledgeBaseError, ImageProblem) as e:  # a moved or damaged file: show the others
                log.warning("example %s left out of the prompt: %s", hit.id[:12], e)
        return examples

    async def _example(self, hit: Hit) -> Example:
        if hit.id in self._cache:
            self._cache.move_to_end(hit.id)
            return self._cache[hit.id]
        if self.images is None:
            raise KnowledgeBaseError("the detector has no way to read example images (images=None)")
        data = await asyncio.to_thread(self.images.read, hit.metadata["source_uri"])
        prepared = prepare_image(data, self.spec.images.max_pixels, self.spec.images.max_image_pixels)
        payload, media_type = teacher_payload(data, prepared, self.spec.teacher.image_format)
        answer = self.kind.answer_text(hit.label, *prepared.image.size)  # the size the VLM sees
        example = Example(hit, payload, media_type, answer)
        self._cache[hit.id] = example
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return example

    def messages(self, examples: list[Example], payload: bytes, media_type: str) -> list[dict]:
        """The few-shot conversation (see the module docstring); with no examples, the labelling prompt."""
        if not examples:
            return image_message(self.kind.prompt(), payload, media_type)
        messages: list[dict] = [{"role": "system", "content": f"{SYSTEM_INTRO}\n\n{self.kind.prompt()}"}]
        for n, example in enumerate(examples, 1):
            messages.append({"role": "user", "content": [
                {"type": "text", "text": f"Example {n} of {len(examples)}:"},
                image_part(example.payload, example.media_type),
            ]})
            messages.append({"role": "assistant", "content": example.answer})
        messages.append({"role": "user", "content": [
            {"type": "text", "text": "Now this image. Answer with the JSON only."},
            image_part(payload, media_type),
        ]})
        return messages

