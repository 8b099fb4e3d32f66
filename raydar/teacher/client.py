"""Asking an OpenAI-compatible teacher about an image, the way a long labelling job must.

One `TeacherClient` per labelling actor: an `openai.AsyncOpenAI` client, a semaphore bounding the
requests in flight, an optional job-wide rate limiter, and retries with exponential backoff on 429,
5xx, timeouts and unparseable answers. A 429's Retry-After is honoured over our own backoff.
The client's own retries are off so that every attempt is counted here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import time
from dataclasses import dataclass

import openai
import orjson
from openai.types.chat import ChatCompletion

from raydar.spec import TeacherSpec
from raydar.kinds import AnswerError, TaskKind

MAX_RETRY_AFTER_S = 120.0  # a server asking us to wait longer than this is treated as failing


@dataclass
class TeacherAnswer:
    """The outcome of asking about one image: a parsed label, or the error after the last attempt."""

    label: dict | None
    raw: str
    attempts: int
    error: str
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.label is not None


def teacher_fingerprint(spec: TeacherSpec, task: TaskKind, max_pixels: int) -> str:
    """Identifies what the teacher was asked: a change to any of these labels everything again."""
    params = {
        "kind": spec.kind,
        "model": spec.model,
        "prompt": task.prompt(),
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
        "coordinates": spec.coordinates,
        "image_format": spec.image_format,
        "max_pixels": max_pixels,
    }
    if spec.kind == "simulated":  # the simulator's noise decides its answers
        simulated = spec.simulated.model_dump(exclude={"latency_s", "max_concurrency", "workers", "host"})
        if not simulated["zero_shot_miss"] and not simulated["zero_shot_flip"]:
            # without zero-shot rates, few-shot settings change no answer: labels made before they existed stay valid
            for key in ("zero_shot_miss", "zero_shot_flip", "example_gain"):
                simulated.pop(key)
        params["simulated"] = simulated
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def image_message(prompt: str, image: bytes, fmt: str) -> list[dict]:
    """A chat message with the task text and the image as a base64 data URL."""
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, image_part(image, fmt)]}]


def image_part(image: bytes, fmt: str) -> dict:
    """A message content part holding the image as a base64 data URL."""
    return {"type": "image_url", "image_url": {"url": f"data:image/{fmt};base64,{base64.b64encode(image).decode()}"}}


class TeacherClient:
    """Labels images through an OpenAI-compatible endpoint. Use from one event loop."""

    def __init__(
        self,
        spec: TeacherSpec,
        task: TaskKind,
        *,
        base_url: str | None = None,
        rate_limiter=None,
    ) -> None:
        self.spec = spec
        self.task = task
        self.prompt = task.prompt()
        self.rate_limiter = rate_limiter
        self._client = openai.AsyncOpenAI(
            base_url=base_url or spec.base_url,
            api_key=spec.api_key(),
            max_retries=0,
            timeout=spec.timeout_s,
        )
        self._semaphore = asyncio.Semaphore(spec.concurrency)
        self.requests = 0  # attempts sent, for reporting

    async def close(self) -> None:
        await self._client.close()

    async def label(self, image: bytes, width: int, height: int, media_type: str = "png") -> TeacherAnswer:
        """Ask about one encoded image (`media_type`: png, jpeg, webp) of `width` x `height` pixels as sent."""
        return await self.ask(image_message(self.prompt, image, media_type), width, height)

    async def ask(self, messages: list[dict], width: int, height: int) -> TeacherAnswer:
        """Send a whole conversation (e.g. a few-shot prompt) whose answer is about an image of
        `width` x `height` pixels as sent; retried and parsed as `label` is."""
        start = time.perf_counter()
        raw, error = "", ""
        attempt = 0
        for attempt in range(1, self.spec.retries + 2):
            wait = 0.0
            try:
                raw = await self._ask(messages)
                label = self.task.parse(raw, width, height)
                return TeacherAnswer(label, raw, attempt, "", time.perf_counter() - start)
            except AnswerError as e:
                error = f"unusable answer: {e}"
            except openai.RateLimitError as e:
                error = f"rate limited (429): {_short(e)}"
                wait = _retry_after(e)
            except openai.APITimeoutError:
                error = f"no answer within {self.spec.timeout_s:g} s"
            except openai.APIConnectionError as e:
                error = f"cannot reach the teacher at {self._client.base_url}: {_short(e)}"
            except openai.InternalServerError as e:
                error = f"teacher error {e.status_code}: {_short(e)}"
                wait = _retry_after(e)
            except openai.APIStatusError as e:  # 4xx other than 429: retrying will not help
                error = f"teacher refused the request ({e.status_code}): {_short(e)}"
                break
            if attempt > self.spec.retries:
                break
            if wait > MAX_RETRY_AFTER_S:
                error += f"; asked to wait {wait:g} s, more than {MAX_RETRY_AFTER_S:g} s"
                break
            backoff = self.spec.backoff_s * (2 ** (attempt - 1)) * (0.75 + 0.5 * random.random())
            await asyncio.sleep(max(wait, backoff))
        return TeacherAnswer(None, raw, attempt, error, time.perf_counter() - start)

    async def _ask(self, messages: list[dict]) -> str:
        async with self._semaphore:
            if self.rate_limiter is not None:
                await self.rate_limiter.wait()
            self.requests += 1
            # The client's own `post` rather than `chat.completions.create`: the same request, auth and typed
            # response, without the SDK walking a large image message through its TypedDict transform, and the
            # body made JSON by orjson, a fraction of json.dumps's CPU (bench/RESULTS.md); the SDK's default
            # headers say it is JSON. The options take numpy numbers and non-str keys, as json.dumps does.
            response = await self._client.post(
                "/chat/completions",
                content=orjson.dumps({
                    "model": self.spec.model,
                    "messages": messages,
                    "temperature": self.spec.temperature,
                    "max_tokens": self.spec.max_tokens,
                }, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY),
                cast_to=ChatCompletion,
                options={"security": {"bearer_auth": True}},
            )
        if not response.choices:
            raise AnswerError("the answer has no choices")
        return response.choices[0].message.content or ""


def _retry_after(error: openai.APIStatusError) -> float:
    headers = error.response.headers if error.response is not None else {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue  # an HTTP date; rare for these APIs, fall back to our backoff
    return 0.0


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:199] + "…"
