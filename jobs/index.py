"""Index a dataset's labelled examples into its knowledge base (ChromaDB), and search it.

    raydar kb build --spec datasets/demo_cells.yaml          # after `raydar label`
    ray job submit --working-dir . -- python -m jobs.index --spec datasets/demo_cells.yaml
    raydar kb search "faint cell fading into the tissue" --spec datasets/demo_cells.yaml --n 5 --where type=implicit
    raydar kb search --image some.png --spec datasets/demo_cells.yaml --json
    raydar kb list --spec datasets/demo_cells.yaml --where split=test
    raydar kb stats --spec datasets/demo_cells.yaml

Reads `<storage>/<name>/labels/labels.parquet`, makes one entry per ok row (document, metadata,
content hash), embeds only new images and new or changed documents, writes them into the
knowledge base a batch at a time (a build killed half way keeps the batches it wrote; the next one
embeds only the rest; on a bucket without a Chroma server, the batches in its last snapshot, written
every SNAPSHOT_EVERY_S), deletes entries whose image is no longer labelled, and writes the read-only
snapshot that serving replicas load. Embedding runs in this process, or on Ray Data actors for large
sets with cores to spread over (`--ray` / `--no-ray` to choose; see RAY_MIN_ENTRIES and bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from cluster import StorageRoot
from jobs.arguments import add_common_arguments, spec_from_args
from raydar.embeddings import EmbedderError, image_embedder, text_embedder
from raydar.images import ImageProblem, prepare_image
from raydar.kb import (
    SNAPSHOT,
    Entry,
    Hit,
    KnowledgeBase,
    KnowledgeBaseError,
    SourceImages,
    entries_from_labels,
    summarise_label,
)
from raydar.labels import LabelStore
from raydar.spec import DatasetSpec

# Ray Data actors (one process per CPU; the image descriptor holds the GIL, so processes, not threads) embed
# large sets when there are more cores than the driver's to spread over: on a cluster, or a bigger machine.
# On two cores they are no faster than the driver and cost their start-up (bench/kb.py, bench/RESULTS.md).
RAY_MIN_ENTRIES = 5000
BATCH = 64  # entries embedded, then written, per step
# A build on a local copy of the snapshot (a bucket, no Chroma server) writes the snapshot at least this often,
# so that a build killed half way keeps what it embedded. Each write is the whole knowledge base, so not per
# batch (that would make a build quadratic); a minute keeps the overhead to a few percent.
SNAPSHOT_EVERY_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydar kb build", description=__doc__.split("\n")[0])
    _build_arguments(parser)
    return build(parser.parse_args(argv))


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--rebuild", action="store_true",
                        help="Delete the knowledge base and index everything again (after changing an embedder).")
    parser.add_argument("--batch-size", type=_positive, default=BATCH, metavar="N",
                        help=f"Entries embedded and written per step (default {BATCH}); a build stopped half way "
                             "keeps the steps it wrote.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ray", dest="use_ray", action="store_true", default=None, help="Embed on Ray Data actors.")
    where.add_argument("--no-ray", dest="use_ray", action="store_false", help="Embed in this process.")


def build(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    try:
        result = index_labels(spec, StorageRoot(args.storage), rebuild=args.rebuild, use_ray=args.use_ray,
                              address=args.address, batch_size=args.batch_size, progress=not args.quiet)
    except (KnowledgeBaseError, EmbedderError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1, got {text!r}")
    return int(text)


# ---------------------------------------------------------------- the index run


@dataclass
class IndexResult:
    dataset: str
    labelled: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    on_ray: bool = False
    duration_s: float = 0.0
    location: str = ""
    snapshot: str = ""

    def summary(self) -> str:
        where = "nothing to embed" if not (self.new or self.changed) else \
            f"embedded {'on Ray Data' if self.on_ray else 'in this process'}"
        return (
            f"{self.dataset}: {self.labelled} labelled -> {self.new} new, {self.changed} changed, "
            f"{self.unchanged} unchanged, {self.removed} removed ({where}) in {self.duration_s:.1f} s; "
            f"knowledge base {self.location}, snapshot {self.snapshot}"
        )


def index_labels(spec: DatasetSpec, storage: StorageRoot, *, rebuild: bool = False, use_ray: bool | None = None,
                 address: str | None = None, batch_size: int = BATCH, progress: bool = False) -> IndexResult:
    """Bring the knowledge base of `spec` up to date with its labels; see the module docstring."""
    started = time.time()
    labels = LabelStore(storage.child(spec.name, "labels")).read_labels()
    entries = entries_from_labels(spec, labels)
    result = IndexResult(spec.name, labelled=len(entries))
    with KnowledgeBase.open(spec, storage) as kb:
        if rebuild:
            kb.reset()
        kb.check_embedders()
        plan = kb.plan(entries)
        todo = plan.new + plan.changed
        result.new, result.changed, result.unchanged, result.removed = (
            len(plan.new), len(plan.changed), plan.unchanged, len(plan.removed))
        if todo:
            kept = kb.image_vectors([e.id for e in plan.changed])  # same image, new label: keep its vector
            more_cores = bool(address or os.environ.get("RAY_ADDRESS")) or (os.cpu_count() or 1) > 2
            result.on_ray = (len(todo) >= RAY_MIN_ENTRIES and more_cores) if use_ray is None else use_ray
            embed = embed_on_ray if result.on_ray else embed_here
            if result.on_ray:
                from cluster import connect

                connect(address)
            # an update per batch written, each shown (mininterval=0): a user, or a test, sees how far it got
            bar = tqdm(total=len(todo), desc=f"index {spec.name}", unit="entry", disable=not progress,
                       file=sys.stderr, mininterval=0)
            # not in a rebuild: until it ends, serving replicas keep loading the whole old snapshot
            checkpoint = kb.is_copy and not rebuild
            snapshotted = time.monotonic()
            for batch, text, image in embed(spec, storage, todo, need_image=[e.id not in kept for e in todo],
                                            batch_size=batch_size):
                image = np.stack([kept.get(e.id, vector) for e, vector in zip(batch, image)])
                kb.upsert(batch, text, image)  # before the next batch is embedded
                bar.update(len(batch))
                if checkpoint and time.monotonic() - snapshotted >= SNAPSHOT_EVERY_S:
                    kb.write_snapshot()
                    snapshotted = time.monotonic()
            bar.close()
        if plan.removed:
            kb.delete(plan.removed)
        result.location = kb.location
        fresh = not (todo or plan.removed or rebuild) and kb.root.exists(SNAPSHOT)
        result.snapshot = kb.root.uri_of(SNAPSHOT) if fresh else kb.write_snapshot()
    result.duration_s = time.time() - started
    return result


class EmbedEntries:
    """Text and image vectors for a batch of entries: the model and the image reader are built once
    (per Ray actor, or once in the driver). Input columns: document, source_uri, need_image."""

    def __init__(self, spec: DatasetSpec, storage: StorageRoot, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.spec = spec
        self.text = text_embedder(spec.knowledge_base.embedder)
        self.image = image_embedder(spec.knowledge_base.image_embedder)
        self.images = SourceImages(spec, storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        documents = [str(d) for d in batch["document"]]
        text = self.text.embed(documents)
        image = np.zeros((len(documents), self.image.dim), np.float32)
        wanted = [i for i, need in enumerate(batch["need_image"]) if need]
        if wanted:
            decoded = [self._decode(str(batch["source_uri"][i])) for i in wanted]
            image[wanted] = self.image.embed(decoded)
        return {"id": batch["id"], "text_vector": text, "image_vector": image}

    def _decode(self, source_uri: str):
        data = self.images.read(source_uri)
        try:
            return prepare_image(data, self.spec.images.max_pixels, self.spec.images.max_image_pixels).image
        except ImageProblem as e:  # it was labelled, so it decoded then: it changed since
            raise KnowledgeBaseError(f"{source_uri}: labelled image no longer decodes: {e}") from None


def _columns(entries: list[Entry], need_image: list[bool]) -> dict[str, np.ndarray]:
    return {
        "id": np.array([e.id for e in entries], dtype=object),
        "document": np.array([e.document for e in entries], dtype=object),
        "source_uri": np.array([e.source_uri for e in entries], dtype=object),
        "need_image": np.array(need_image, dtype=bool),
    }


Embedded = Iterator[tuple[list[Entry], np.ndarray, np.ndarray]]  # (entries, their text vectors, image vectors)


def embed_here(spec: DatasetSpec, storage: StorageRoot, entries: list[Entry], *, need_image: list[bool],
               batch_size: int = BATCH) -> Embedded:
    """Embed in this process, a batch at a time, each batch as it is needed."""
    embed = EmbedEntries(spec, storage)
    columns = _columns(entries, need_image)
    for start in range(0, len(entries), batch_size):
        out = embed({k: v[start:start + batch_size] for k, v in columns.items()})
        yield entries[start:start + batch_size], out["text_vector"], out["image_vector"]


def embed_on_ray(spec: DatasetSpec, storage: StorageRoot, entries: list[Entry], *, need_image: list[bool],
                 batch_size: int = BATCH) -> Embedded:
    """Embed on a pool of Ray Data actors (one per CPU of the cluster, each with one thread), in the order
    the batches finish."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own
    columns = _columns(entries, need_image)
    rows = [{k: columns[k][i] for k in columns} for i in range(len(entries))]
    actors = max(1, min(int(ray.cluster_resources().get("CPU", 1)), -(-len(entries) // batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=max(actors, len(entries) // (4 * batch_size) or 1))
    ds = ds.map_batches(EmbedEntries, fn_constructor_kwargs={"spec": spec, "storage": storage, "threads": 1},
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=1)
    by_id = {e.id: e for e in entries}
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield [by_id[i] for i in batch["id"]], batch["text_vector"], batch["image_vector"]


# ---------------------------------------------------------------- the `raydar kb` command


def kb_main(argv: list[str] | None = None) -> int:
    """`raydar kb build|search|list|stats`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"build": None, "search": search, "list": list_entries, "stats": stats}
    if not argv or argv[0] not in commands:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print("usage: raydar kb {build,search,list,stats} --spec SPEC [options]\n\n" + __doc__.split("\n\n")[1],
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    command, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"raydar kb {command}")
    if command == "build":
        _build_arguments(parser)
        return build(parser.parse_args(rest))
    add_common_arguments(parser)
    if command == "search":
        parser.add_argument("query", nargs="?", help="What to look for, in words.")
        parser.add_argument("--image", help="Search by this image instead of words.")
        parser.add_argument("--n", type=int, default=5, help="How many results.")
    if command == "list":
        parser.add_argument("--limit", type=int, default=20)
        parser.add_argument("--offset", type=int, default=0)
    if command in ("search", "list"):
        parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                            help="Metadata filter, repeatable: type=implicit, split=test, n_objects>=5.")
    parser.add_argument("--json", action="store_true", help="Machine-readable output.")
    args = parser.parse_args(rest)
    spec = spec_from_args(args)
    try:
        where = parse_where(getattr(args, "where", []))
        with KnowledgeBase.open(spec, StorageRoot(args.storage)) as kb:
            return commands[command](kb, args, where)
    except (KnowledgeBaseError, EmbedderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def search(kb: KnowledgeBase, args: argparse.Namespace, where: dict) -> int:
    if bool(args.query) == bool(args.image):
        raise ValueError("give a text query or --image PATH (one of them)")
    if args.image:
        try:
            data = Path(args.image).read_bytes()
        except OSError as e:
            raise ValueError(f"--image {args.image}: cannot read it: {e.strerror or e}") from None
        hits = kb.search_image(data, n=args.n, where=where)
    else:
        hits = kb.search_text(args.query, n=args.n, where=where)
    if args.json:
        print(json.dumps({"query": args.query or args.image, "where": where, "hits": [h.as_dict() for h in hits]},
                         indent=2))
    else:
        print(hits_table(kb.spec.task, hits, distance=True))
    return 0


def list_entries(kb: KnowledgeBase, args: argparse.Namespace, where: dict) -> int:
    hits = kb.list(where=where, limit=args.limit, offset=args.offset)
    if args.json:
        print(json.dumps({"where": where, "entries": [h.as_dict() for h in hits]}, indent=2))
    else:
        print(hits_table(kb.spec.task, hits, distance=False))
    return 0


def stats(kb: KnowledgeBase, args: argparse.Namespace, where: dict) -> int:
    out = kb.stats()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(k) for k in out)
    for key, value in out.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        print(f"{key:<{width}}  {value}")
    return 0


def hits_table(task, hits: list[Hit], *, distance: bool) -> str:
    """One line per entry: rank, distance, short image id, split, file, and what the teacher found."""
    if not hits:
        return "(no entries match)"
    header = ["#", *(["distance"] if distance else []), "image", "split", "file", "found"]
    rows = []
    for n, hit in enumerate(hits, 1):
        found = summarise_label(task, hit.label)
        rows.append([str(n), *([f"{hit.distance:.3f}"] if distance else []), hit.id[:12],
                     str(hit.metadata.get("split", "")), str(hit.metadata.get("file", "")),
                     found if len(found) <= 60 else found[:59] + "…"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in [header, *rows])


_WHERE = re.compile(r"^\s*([^=<>!\s]+)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")
_OPERATORS = {">=": "$gte", "<=": "$lte", "!=": "$ne", ">": "$gt", "<": "$lt"}


def parse_where(items: list[str]) -> dict:
    """`["type=implicit", "n_objects>=5"]` -> `{"type": "implicit", "n_objects": {"$gte": 5}}` (see
    raydar.kb.where_filter for how that becomes a Chroma filter)."""
    where: dict = {}
    for item in items:
        match = _WHERE.match(item)
        if not match:
            raise ValueError(f"--where {item!r}: expected KEY=VALUE (or KEY>=VALUE, KEY<=VALUE, KEY!=VALUE, ...)")
        key, op, text = match.groups()
        value = yaml.safe_load(text) if text else ""
        if op == "=":
            where[key] = value
        elif key == "type" and op == "!=":
            where[key] = {"$not_contains": value}
        else:
            where[key] = {_OPERATORS[op]: value}
    return where


if __name__ == "__main__":
    sys.exit(main())
