"""The two members of the ensemble, each a Serve deployment the ingress asks through its handle.

- `FineTunedMember`: the fine-tuned student (base + LoRA adapter + head) from finetune checkpoints, several
  adapters by name through model multiplexing, requests grouped by `@serve.batch`. The adapters are
  its `user_config`, so `serve deploy` with a new adapter reconfigures the running replicas in place.
- `RagMember`: `raydar.rag.RagDetector`, a VLM shown the most similar labelled examples from the
  knowledge base.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from raydar.spec import DatasetSpec
from serving.args import AdapterConfig


@serve.deployment(name="FineTunedMember")
class FineTunedMember:
    """The fine-tuned student. The ingress picks the adapter by name; the multiplexed model id is the
    adapter's checkpoint URI, so a name can be pointed at a new version without serving a stale one."""

    def __init__(self, spec: dict, *, batching: bool, max_batch_size: int, batch_wait_timeout_s: float,
                 max_new_tokens: int, device: str | None) -> None:
        self.spec = DatasetSpec.model_validate(spec)
        self.batching = batching
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.config: AdapterConfig | None = None
        self._one_at_a_time = asyncio.Lock()  # without batching the model still runs one request at a time
        # The model answers on one thread: torch on several threads of a pool gives each its own OpenMP
        # team, and with more teams' threads than cores libgomp stops spinning between ops (slower steps).
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._detect_batch.set_max_batch_size(max_batch_size)
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._in_flight = 0  # requests inside a batch, queued or running
        self._batch_ended = asyncio.Event()  # set (and replaced) when a batch ends

    async def reconfigure(self, config: dict) -> None:
        """New adapters: the new default is loaded before it is switched to, so no request waits for it."""
        from raydar.checkpoint import resolve_reference

        new = AdapterConfig.model_validate(config)
        # A pointer (`train/latest`) is followed now: the multiplexed id is the checkpoint it names, so a
        # redeploy after a new run serves the new one, never a stale copy under the pointer's name.
        resolved = {name: uri if uri == "base" else await asyncio.to_thread(resolve_reference, uri)
                    for name, uri in new.adapters.items()}
        new = AdapterConfig(adapters=resolved, default=new.default)
        await self.load(new.adapters[new.default])
        self.config = new

    @serve.multiplexed(max_num_models_per_replica=3)  # adapters kept loaded per replica; the least used goes
    async def load(self, uri: str):
        from raydar.predict import StudentDetector

        # Built on a thread that then ends (not a pool's, which would live on with an OpenMP team of its own),
        # while the model thread goes on answering with the adapters already loaded.
        if uri == "base":
            return await _on_a_passing_thread(StudentDetector.from_base, self.spec, device=self.device,
                                              max_new_tokens=self.max_new_tokens)
        return await _on_a_passing_thread(StudentDetector.from_checkpoint, uri, device=self.device,
                                          max_new_tokens=self.max_new_tokens)

    async def adapters(self) -> dict:
        """{"default": name, "adapters": {name: uri}}: what the ingress maps adapter names with."""
        return {"default": self.config.default, "adapters": dict(self.config.adapters), "model": self.spec.student.base_model}

    async def detect(self, image: bytes) -> dict:
        uri = serve.get_multiplexed_model_id() or self.config.adapters[self.config.default]
        if self.batching:
            # Serve closes a batch `batch_wait_timeout_s` after its first request, even while the model is
            # still busy with the last one; the closed batches then queue for the model, each small. So a
            # request that finds the model busy waits here for the running batch to end, and all that waited
            # enter the next batch together (up to max_batch_size): the model takes in, each time it is
            # free, everything that arrived while it ran. A request that finds it idle starts a batch at once.
            busy = bool(self._in_flight)
            if busy:
                await self._batch_ended.wait()
            self._detect_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s if busy else 0.0)
            self._in_flight += 1
            try:
                return await self._detect_batch(uri, image)
            finally:
                self._in_flight -= 1
                if not self._in_flight:  # none left in a batch (one cancelled before it ran): nothing to wait for
                    self._end_of_batch()
        async with self._one_at_a_time:
            return (await self._run(uri, [image]))[0]

    def _end_of_batch(self) -> None:
        """Let the requests that waited for the running batch go, together, into the next one."""
        ended, self._batch_ended = self._batch_ended, asyncio.Event()
        ended.set()

    @serve.batch  # its size (in __init__) and its wait (in detect) come from ServeArgs
    async def _detect_batch(self, uris: list[str], images: list[bytes]) -> list[dict]:
        results: list[dict] = [{}] * len(images)
        try:
            for uri in dict.fromkeys(uris):  # one adapter per group
                rows = [i for i, u in enumerate(uris) if u == uri]
                for i, result in zip(rows, await self._run(uri, [images[i] for i in rows])):
                    results[i] = result
        finally:
            self._end_of_batch()
        return results

    async def _run(self, uri: str, images: list[bytes]) -> list[dict]:
        try:
            detector = await self.load(uri)
        except Exception as e:  # a broken checkpoint fails its requests, not the replica
            return [{"label": None, "raw": "", "error": f"adapter {uri} does not load: {e}"} for _ in images]
        results = await asyncio.get_running_loop().run_in_executor(self._model_thread, detector.detect, images)
        return [{**r, "model": detector.model, "adapter_version": detector.adapter_version, "batch_size": len(images)}
                for r in results]


async def _on_a_passing_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a thread of its own, which ends when it returns."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    finally:
        executor.shutdown(wait=False)  # the thread exits once the load is done


@serve.deployment(name="RagMember")
class RagMember:
    """raydar.rag.RagDetector: the knowledge base's most similar labelled examples in a VLM's prompt."""

    def __init__(self, spec: dict, storage: str, base_url: str | None) -> None:
        from cluster import StorageRoot
        from raydar.rag import RagDetector

        self.spec = DatasetSpec.model_validate(spec)
        self.detector = RagDetector.from_spec(self.spec, StorageRoot(storage), base_url=base_url)

    async def detect(self, image: bytes) -> dict:
        result = await self.detector.detect(image)
        return {**result, "model": self.spec.teacher.model}

    async def describe(self) -> dict:
        return {"model": self.spec.teacher.model, "examples_per_prompt": self.detector.k,
                "knowledge_base_entries": await asyncio.to_thread(self.detector.kb.count)}

    def __del__(self) -> None:
        """Serve calls this when the replica stops: close the knowledge base (and its local snapshot copy)."""
        detector = getattr(self, "detector", None)
        if detector is not None:
            detector.kb.close()
