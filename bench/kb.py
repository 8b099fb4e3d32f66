"""Knowledge base: build throughput and query latency at 10,000 entries, embedded Chroma vs `chroma run`.

    python bench/kb.py                      # 10,000 entries
    python bench/kb.py --entries 2000       # quicker

The entries are demo images (128x128 PNG, made once under --cache) with their ground truth written as
labels (a LabelStore snapshot, as the label job leaves it; no teacher is needed to time an index).
Measured:
- embedding, in this process (text: all-MiniLM-L6-v2; images: blob-colour-texture), and, for
  --ray-entries of them, in this process again and on Ray Data actors back to back (twice, to tell Ray's
  start-up from its rate): where Ray Data starts to pay (jobs/index.py's RAY_MIN_ENTRIES);
- writing all entries into each backend (an embedded PersistentClient in a temporary folder, and a
  `chroma run` server on 127.0.0.1 started and stopped here), and the build = embedding + writing;
- a re-index with nothing new (reading the content hashes back);
- query latency p50 / p99 over --queries queries: Chroma alone (a ready vector), and end to end
  (`search_image` from PNG bytes, `search_text` from words), with and without a metadata filter;
- the snapshot: writing it, its size, and loading it into a read-only replica.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cluster import StorageRoot  # noqa: E402
from jobs.index import embed_here, embed_on_ray  # noqa: E402
from raydar.demo import make_demo_cells  # noqa: E402
from raydar.kb import KnowledgeBase, entries_from_labels  # noqa: E402
from raydar.labels import LabelStore  # noqa: E402
from raydar.sources import read_ground_truth  # noqa: E402
from raydar.spec import load_spec  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "datasets" / "demo_cells.yaml"
TEXT_QUERIES = ["faint lilac cells fading into the tissue", "dark granular cell with a nucleus", "many cells",
                "mast cell with central nucleus", "an empty field with no cells", "touching cells"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--ray-entries", type=int, default=2000, help="Entries embedded on Ray Data (timed).")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/raydar/bench"))
    args = parser.parse_args()

    started = time.perf_counter()
    folder = make_demo_cells(Path(args.cache) / f"cells-{args.entries}-128", n=args.entries, size=128, seed=1)
    print(f"{args.entries} demo images (128x128 PNG) ready in {time.perf_counter() - started:.0f} s; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="raydar-bench-kb-"))
    try:
        run(args, folder, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, folder: Path, work: Path) -> None:
    spec = load_spec(SPEC, overrides={"images.uri": str(folder), "images.generate": None})
    storage = StorageRoot(work / "store")
    write_labels(spec, folder, storage)
    entries = entries_from_labels(spec, LabelStore(storage.child(spec.name, "labels")).read_labels())
    need = [True] * len(entries)

    embed_all(spec, storage, entries[:64], need[:64])  # load the models outside the timings
    t, cpu = time.perf_counter(), time.process_time()
    text, image = embed_all(spec, storage, entries, need)
    embed_s, embed_cpu = time.perf_counter() - t, time.process_time() - cpu
    from raydar.embeddings import image_embedder, text_embedder

    sample = entries[:500]
    t, cpu = time.perf_counter(), time.process_time()
    text_embedder().embed([e.document for e in sample])
    text_per_s, text_cpu = len(sample) / (time.perf_counter() - t), (time.process_time() - cpu) / len(sample)
    decode = [folder / Path(e.source_uri).name for e in sample]
    from PIL import Image

    t, cpu = time.perf_counter(), time.process_time()
    image_embedder().embed([Image.open(p).convert("RGB") for p in decode])
    image_per_s, image_cpu = len(sample) / (time.perf_counter() - t), (time.process_time() - cpu) / len(sample)
    print(f"\nembedding in this process: {len(entries)} entries in {embed_s:.1f} s = {len(entries) / embed_s:.0f} "
          f"entries/s, {embed_cpu / len(entries) * 1000:.1f} ms CPU per entry (text alone {text_per_s:.0f}/s, "
          f"{text_cpu * 1000:.1f} ms CPU each; images alone incl. decoding {image_per_s:.0f}/s, "
          f"{image_cpu * 1000:.1f} ms CPU each); load average now {os.getloadavg()[0]:.1f}", flush=True)

    # driver vs Ray Data on the same entries, back to back; Ray twice (n and n/4) to separate its start-up
    # (starting Ray, the actors, their models) from its rate: T(n) = start + n / rate
    n_ray = min(args.ray_entries, len(entries))
    t = time.perf_counter()
    embed_all(spec, storage, entries[:n_ray], need[:n_ray])
    here_rate = n_ray / (time.perf_counter() - t)
    small = max(1, n_ray // 4)
    big_s = ray_embed(spec, storage, entries[:n_ray], need[:n_ray])
    small_s = ray_embed(spec, storage, entries[:small], need[:small])
    ray_rate = (n_ray - small) / max(big_s - small_s, 1e-9)
    start_s = max(0.0, big_s - n_ray / ray_rate)
    faster = ray_rate > here_rate
    even = start_s / (1 / here_rate - 1 / ray_rate) if faster else float("inf")
    print(f"embedding {n_ray} entries: this process {here_rate:.0f}/s; Ray Data {big_s:.1f} s for {n_ray} and "
          f"{small_s:.1f} s for {small} -> start-up {start_s:.0f} s, then {ray_rate:.0f}/s; Ray Data pays from about "
          f"{even:,.0f} entries; load average now {os.getloadavg()[0]:.1f}", flush=True)

    results = {}
    for mode in ("embedded", "server"):
        with backend(mode, spec, work) as mode_spec:
            results[mode] = measure(mode, mode_spec, storage, entries, text, image, embed_s, folder, args)

    print("\n| | embedded (PersistentClient) | server (`chroma run`, HTTP) |\n| --- | --- | --- |")
    for key in results["embedded"]:
        print(f"| {key} | {results['embedded'][key]} | {results['server'][key]} |")


def write_labels(spec, folder: Path, storage: StorageRoot) -> None:
    """Ground truth as labelled rows, as if a noiseless teacher had answered."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    rows = [{
        "image_id": r["image_id"], "source_uri": str(folder / r["file"]), "width": r["width"], "height": r["height"],
        "split": spec.split.split_of(r["image_id"]), "task": "points", "label": json.dumps(r["label"]),
        "teacher_model": "ground-truth", "teacher_fingerprint": "bench", "raw_answer": json.dumps(r["label"]),
        "status": "ok", "error": "", "attempts": 1, "latency_s": 0.0, "labelled_at": now, "run_id": "bench",
    } for r in read_ground_truth(folder)]
    store = LabelStore(storage.child(spec.name, "labels"))
    store.append(rows, "bench", 0)
    store.write_snapshot("bench")


def embed_all(spec, storage, entries, need) -> tuple[np.ndarray, np.ndarray]:
    """Every entry's text and image vectors, embedded in this process (batches come in entry order)."""
    batches = list(embed_here(spec, storage, entries, need_image=need))
    return np.concatenate([b[1] for b in batches]), np.concatenate([b[2] for b in batches])


def ray_embed(spec, storage, entries, need) -> float:
    import ray

    from cluster import connect

    t = time.perf_counter()
    connect()
    try:
        for _ in embed_on_ray(spec, storage, entries, need_image=need):
            pass
    finally:
        elapsed = time.perf_counter() - t
        ray.shutdown()
    return elapsed


class backend:
    """The spec pointed at an embedded Chroma (default) or at a `chroma run` started here."""

    def __init__(self, mode: str, spec, work: Path) -> None:
        self.mode, self.spec, self.work, self.process = mode, spec, work, None

    def __enter__(self):
        if self.mode == "embedded":
            return self.spec
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        chroma = os.path.join(os.path.dirname(sys.executable), "chroma")
        self.process = subprocess.Popen([chroma, "run", "--path", str(self.work / "server"), "--host", "127.0.0.1",
                                         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("chroma run did not start") from None
                time.sleep(0.1)
        kb = self.spec.knowledge_base.model_copy(update={"server": url})
        return self.spec.model_copy(update={"knowledge_base": kb})

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def measure(mode, spec, storage, entries, text, image, embed_s, folder, args) -> dict:
    out = {}
    mode_storage = storage.child(mode)
    with KnowledgeBase.open(spec, mode_storage) as kb:
        kb.reset()
        t = time.perf_counter()
        kb.upsert(entries, text, image)
        write_s = time.perf_counter() - t
        out["write (vectors ready)"] = f"{len(entries) / write_s:,.0f} entries/s ({write_s:.1f} s)"
        out["build = embed + write"] = f"{len(entries) / (embed_s + write_s):,.0f} entries/s ({embed_s + write_s:.0f} s)"
        t = time.perf_counter()
        plan = kb.plan(entries)
        assert not plan.new and not plan.changed, "a fresh index should hold every entry"
        out["re-index, nothing new"] = f"{time.perf_counter() - t:.2f} s"

        rng = random.Random(0)
        picks = [rng.randrange(len(entries)) for _ in range(args.queries)]
        out["image query, Chroma only"] = latency(lambda i: kb._query("image", image[i], 5, None), picks)
        out["image query, filtered (type=implicit)"] = latency(
            lambda i: kb._query("image", image[i], 5, {"type": "implicit"}), picks)
        out["text query, Chroma only"] = latency(lambda i: kb._query("text", text[i], 5, None), picks)
        pngs = {i: (folder / Path(entries[i].source_uri).name).read_bytes() for i in set(picks)}
        out["search_image from PNG bytes"] = latency(lambda i: kb.search_image(pngs[i], n=5), picks)
        out["search_text from words"] = latency(lambda i: kb.search_text(TEXT_QUERIES[i % len(TEXT_QUERIES)], n=5),
                                                picks)
        t = time.perf_counter()
        uri = kb.write_snapshot()
        out["snapshot write"] = f"{time.perf_counter() - t:.1f} s, {_size(mode_storage, uri) / 1e6:.0f} MB"
    t = time.perf_counter()
    with KnowledgeBase.open(spec.model_copy(update={"knowledge_base": spec.knowledge_base.model_copy(
            update={"server": None})}), mode_storage, read_only=True) as replica:
        assert replica.count() == len(entries)
        out["replica load (read-only snapshot)"] = f"{time.perf_counter() - t:.1f} s"
    print(f"{mode}: " + "; ".join(f"{k} {v}" for k, v in out.items()), flush=True)
    return out


def latency(query, picks) -> str:
    times = []
    for i in picks:
        t = time.perf_counter()
        query(i)
        times.append(time.perf_counter() - t)
    p50, p99 = np.percentile(times, [50, 99]) * 1000
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"


def _size(storage: StorageRoot, uri: str) -> int:
    return storage.fs.get_file_info(uri.split("://", 1)[-1]).size


if __name__ == "__main__":
    main()
