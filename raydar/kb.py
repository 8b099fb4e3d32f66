"""The knowledge base: every labelled example of a dataset, searchable by text and by image (ChromaDB).

One entry per labelled image (id = the image's sha256) in one Chroma collection per dataset (named
after it): a document saying what the teacher found (classes, counts, the ontology's descriptions,
objects' descriptions, Q&A, captions), metadata to filter on (split, label types, per-class counts,
source URI, teacher, confidence and difficulty when the teacher gave them) and the label itself, plus
one vector holding both embeddings. Chroma keeps one vector space per collection, so the vector is
the document's text embedding and the image's embedding, each scaled to length 1/sqrt(2), side by
side; a text query is its embedding followed by zeros, an image query zeros followed by its
embedding. The cosine between a query and an entry is then the cosine of the searched halves over
sqrt(2): the ranking is exactly that of text alone or image alone, and a hit's distance is converted
back to that half's cosine distance.

Where it lives (`KnowledgeBase.open`):
- an embedded Chroma at `<storage>/<dataset>/kb/chroma` for a local storage root (the default);
- a Chroma server (`chroma run`) when `knowledge_base.server` is set;
- a read-only *snapshot* (`<storage>/<dataset>/kb/snapshot.parquet`, written by every build) that a
  serving replica copies into a local temporary Chroma: any storage root, local or a bucket, and no
  shared database file between processes. A remote storage root without a server works the same way
  for writing: the build restores the snapshot locally, updates it and writes it back (also during a
  long build, so that one killed half way keeps most of what it embedded; see jobs/index.py).

Re-indexing is incremental: a content hash in each entry's metadata says whether its row changed;
only new images are embedded as images, only new or changed rows as text. An entry is one Chroma
record (vector, document, metadata and hash together), so an entry is either stored whole or not at
all, also when a build is killed half way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import shutil
import tempfile
import urllib.parse
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from raydar.embeddings import image_embedder, text_embedder
from raydar.images import ImageProblem, prepare_image
from raydar.sources import read_bytes
from raydar.spec import DatasetSpec
from raydar.kinds import AnswerError, extract_json, kind_of

KB_DIR = "kb"
CHROMA_DIR = "chroma"
SNAPSHOT = "snapshot.parquet"
LIST_KEYS = ("type",)  # metadata holding a list: `type=implicit` means "contains implicit"
_PAGE = 2000


class KnowledgeBaseError(RuntimeError):
    """A knowledge base that cannot answer: missing, empty, read-only, or built with another embedder."""


class QueryImageError(KnowledgeBaseError):
    """A query image that cannot be decoded."""


# ---------------------------------------------------------------- entries from labelled rows


@dataclass
class Entry:
    """One labelled example as it goes into the knowledge base."""

    id: str
    document: str
    metadata: dict[str, Any]
    source_uri: str


@dataclass
class Hit:
    """One search result: smaller distance = more similar (the cosine distance, 0-2, between the query and
    the entry's text embedding for a text query, its image embedding for an image query)."""

    id: str
    distance: float | None
    document: str
    metadata: dict[str, Any]

    @property
    def label(self) -> dict:
        return json.loads(self.metadata["label"])

    def as_dict(self) -> dict:
        meta = {k: v for k, v in self.metadata.items() if k not in ("label", "content_hash")}
        return {"id": self.id, "distance": self.distance, "document": self.document, "label": self.label,
                "metadata": meta}


def entries_from_labels(spec: DatasetSpec, table: pa.Table) -> list[Entry]:
    """An entry per ok row of a labels table (`raydar.labels.LABEL_SCHEMA`)."""
    entries = []
    for row in table.to_pylist():
        if row.get("status", "ok") != "ok" or not row.get("label"):
            continue
        label = json.loads(row["label"])
        raw = _raw_json(row.get("raw_answer"))
        metadata: dict[str, Any] = {
            "image_id": row["image_id"],
            "source_uri": row.get("source_uri") or "",
            "file": (row.get("source_uri") or "").rstrip("/").rsplit("/", 1)[-1],
            "split": row.get("split") or "",
            "task": kind_of(spec.task).name,
            "width": int(row.get("width") or 0),
            "height": int(row.get("height") or 0),
            "teacher_model": row.get("teacher_model") or "",
            "teacher_fingerprint": row.get("teacher_fingerprint") or "",
            "attempts": int(row.get("attempts") or 0),
            "label": json.dumps(label, sort_keys=True),
            **label_metadata(spec.task, label),
        }
        if row.get("labelled_at") is not None:
            metadata["labelled_at"] = row["labelled_at"].isoformat()
        confidence = teacher_confidence(spec.task, label, raw)
        if confidence is not None:
            metadata["teacher_confidence"] = round(confidence, 4)
        if isinstance(raw, dict) and isinstance(raw.get("difficulty"), (str, int, float)):
            metadata["difficulty"] = str(raw["difficulty"])
        document = describe_label(spec.task, label, raw)
        metadata["content_hash"] = hashlib.sha256(
            json.dumps({"document": document, "metadata": metadata}, sort_keys=True).encode()
        ).hexdigest()[:16]
        entries.append(Entry(row["image_id"], document, metadata, metadata["source_uri"]))
    return entries


def _raw_json(raw: str | None) -> Any:
    try:
        return extract_json(raw or "")
    except AnswerError:
        return None


def label_metadata(task, label: dict) -> dict[str, Any]:
    """Filterable facts of a label: `type` (the classes present), per-class counts, probabilities, values."""
    return kind_of(task).metadata(label)


def describe_label(task, label: dict, raw: Any = None) -> str:
    """The document text: what the teacher found, in words a text query can match."""
    parts = kind_of(task).document(label)
    if isinstance(raw, dict) and isinstance(raw.get("notes"), str) and raw["notes"].strip():
        parts.append(f"Notes: {raw['notes'].strip()}")
    return " ".join(parts)


def summarise_label(task, label: dict) -> str:
    """A few words for tables: `2 explicit, 1 implicit`, the entity, the findings, the values."""
    return kind_of(task).summary(label)


def teacher_confidence(task, label: dict, raw: Any) -> float | None:
    """The teacher's confidence when it gave one: a `confidence` field in its answer, else what the kind
    reads off the label (mean object score, multilabel certainty). None when unknown (most VLMs give none)."""
    if isinstance(raw, dict) and isinstance(raw.get("confidence"), (int, float)):
        return float(raw["confidence"])
    return kind_of(task).confidence(label, raw)


def where_filter(where: dict[str, Any] | None) -> dict[str, Any] | None:
    """A Chroma `where` from a simple mapping: `{type: implicit, split: train}` means the label has
    implicit objects and the image is in train; values that are Chroma operators pass through
    (`{n_objects: {$gte: 5}}`, `{$or: [...]}`)."""
    if not where:
        return None
    clauses = []
    for key, value in where.items():
        if key.startswith("$") or isinstance(value, dict):
            clauses.append({key: value})
        elif key in LIST_KEYS:
            clauses.append({key: {"$contains": value}})
        else:
            clauses.append({key: {"$eq": value}})
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


# ---------------------------------------------------------------- images of the entries


class SourceImages:
    """Reads labelled images back by their source URI, through the filesystem (and its options, such as
    an S3 endpoint) of the spec's image source, or the storage root for generated demo images."""

    def __init__(self, spec: DatasetSpec, storage) -> None:
        uri = spec.resolve_uri(spec.images.uri) if spec.images.uri else None
        if uri is None:
            self.fs = storage.fs
        elif "://" in uri:
            self.fs = pafs.FileSystem.from_uri(uri)[0]
        else:
            self.fs = pafs.LocalFileSystem()

    def read(self, source_uri: str) -> bytes:
        try:
            return read_bytes(source_uri, self.fs)
        except (OSError, pa.ArrowException) as e:
            raise KnowledgeBaseError(f"{source_uri}: cannot read the labelled image: {e}") from None


def decode_query_image(data: bytes, spec: DatasetSpec) -> Image.Image:
    """The image a query is about, decoded as the labelling job decodes images; a clear error if not."""
    try:
        return prepare_image(data, spec.images.max_pixels, spec.images.max_image_pixels).image
    except ImageProblem as e:
        raise QueryImageError(f"query image cannot be used: {e}") from None


# ---------------------------------------------------------------- the knowledge base

SIDES = ("text", "image")  # the halves of every stored vector, in this order
_EMBEDDER_KEYS = ("embedder", "embedder_version", "dim")


def collection_name(dataset: str) -> str:
    """The dataset's name, or `<name>.kb` where Chroma refuses it (under 3 characters, or ending in `_` or
    `-`); a dataset name holds no dot, so no two datasets meet."""
    return dataset if len(dataset) >= 3 and dataset[-1].isalnum() else f"{dataset}.kb"


def joint_vectors(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Entries' vectors: each row's text and image embeddings, each of length 1/sqrt(2), side by side."""
    return np.hstack([_unit(text), _unit(image)]) * np.float32(1 / math.sqrt(2))


def half_distance(distance: float) -> float:
    """Chroma's cosine distance between an entry and a one-sided query -> the cosine distance between the
    query and the searched half: the entry's cosine with the query is the halves' cosine over sqrt(2)."""
    return min(2.0, max(0.0, 1 - math.sqrt(2) * (1 - float(distance))))


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.atleast_2d(np.asarray(vectors, np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def _described(embedder) -> dict:
    return {"embedder": embedder.name, "embedder_version": embedder.version, "dim": int(embedder.dim)}


def _embedder_of(metadata: dict, side: str) -> dict:
    """The embedder a collection's `side` half came from, as `_described` gives it."""
    return {key: metadata.get(f"{side}_{key}") for key in _EMBEDDER_KEYS}


@dataclass
class IndexPlan:
    """What an index run must do: embed `new` (text and image), re-embed the text of `changed`,
    keep `unchanged`, delete `removed` (images no longer in the labels)."""

    new: list[Entry] = field(default_factory=list)
    changed: list[Entry] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)


class KnowledgeBase:
    """A dataset's knowledge base. Open with `KnowledgeBase.open(spec, storage)`; close when done."""

    def __init__(self, spec: DatasetSpec, client, *, root, location: str, read_only: bool,
                 temp_dir: str | None = None) -> None:
        self.spec = spec
        self.client = client
        self.root = root  # <storage>/<dataset>/kb, where the snapshot lives
        self.location = location
        self.read_only = read_only
        self.is_copy = temp_dir is not None  # a local copy of the snapshot: writes last only once snapshotted
        # a replica's local copy goes when the object does, or at exit, also if close() is never called
        self._cleanup = weakref.finalize(self, shutil.rmtree, temp_dir, True) if temp_dir else None
        self.name = collection_name(spec.name)
        self._ready = None  # the collection, once known to exist and hold entries

    # opening ------------------------------------------------------------
    @classmethod
    def open(cls, spec: DatasetSpec, storage, *, read_only: bool = False) -> KnowledgeBase:
        """The knowledge base of `spec` under `storage` (a cluster.StorageRoot): see the module docstring."""
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False, allow_reset=False)
        root = storage.child(spec.name, KB_DIR)
        server = spec.knowledge_base.server
        if server:
            url = urllib.parse.urlparse(server)
            try:
                client = chromadb.HttpClient(host=url.hostname, port=url.port or (443 if url.scheme == "https" else 8000),
                                             ssl=url.scheme == "https", settings=settings)
                client.heartbeat()
            except Exception as e:  # the server's own exception types vary by transport
                raise KnowledgeBaseError(f"knowledge_base.server: cannot reach Chroma at {server}: {e}") from None
            return cls(spec, client, root=root, location=server, read_only=read_only)
        if not read_only and getattr(root, "is_local", False):
            path = root.local_path(CHROMA_DIR)
            path.mkdir(parents=True, exist_ok=True)
            return cls(spec, chromadb.PersistentClient(str(path), settings=settings), root=root,
                       location=str(path), read_only=False)
        # a read-only replica, or a remote storage root: a local copy made from the snapshot
        if read_only and not root.exists(SNAPSHOT):
            raise KnowledgeBaseError(
                f"{root.uri_of(SNAPSHOT)}: no knowledge-base snapshot; build one with "
                f"`raydar kb build --spec {spec.source_file or '<spec>'}`"
            )
        temp_dir = tempfile.mkdtemp(prefix=f"raydar-kb-{spec.name}-")
        client = chromadb.PersistentClient(temp_dir, settings=settings)
        kb = cls(spec, client, root=root, location=f"{root.uri_of(SNAPSHOT)} (copy in {temp_dir})",
                 read_only=read_only, temp_dir=temp_dir)
        if root.exists(SNAPSHOT):
            kb._restore(pq.read_table(io.BytesIO(root.read_bytes(SNAPSHOT))))
        return kb

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
        if self._cleanup is not None:
            self._cleanup()  # removes the local copy, once

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # the collection ------------------------------------------------------
    def _collection(self, *, create_with: dict | None = None):
        collection = self._get(self.name)
        if collection is not None:
            return collection
        old = self._old_layout()
        if old:
            raise KnowledgeBaseError(
                f"the knowledge base of {self.spec.name!r} at {self.location} is in the old layout of two "
                f"collections ({', '.join(old)}); rebuild it as one with "
                f"`raydar kb build --spec {self.spec.source_file or '<spec>'} --rebuild`"
            )
        if create_with is None:
            return None
        return self.client.create_collection(self.name, metadata=create_with, embedding_function=None,
                                             configuration={"hnsw": {"space": "cosine"}})

    def _get(self, name: str):
        from chromadb.errors import NotFoundError

        try:
            return self.client.get_collection(name, embedding_function=None)
        except (NotFoundError, ValueError):
            return None

    def _old_layout(self) -> list[str]:
        """The collections of a knowledge base built before one collection per dataset, if any."""
        return [name for name in (f"{self.spec.name}.text", f"{self.spec.name}.image") if self._get(name) is not None]

    def _identity(self, text: dict, image: dict, **extra) -> dict:
        """The collection's metadata: what it holds, and the embedder of each half (as `_described` gives it)."""
        identity = {"raydar": "knowledge-base", "dataset": self.spec.name, "task": self.spec.task.kind,
                    "vectors": "+".join(SIDES), **extra}
        for side, embedder in zip(SIDES, (text, image)):
            identity.update({f"{side}_{key}": embedder[key] for key in _EMBEDDER_KEYS})
        return identity

    def _searchable(self):
        if self._ready is not None:
            return self._ready
        collection = self._collection()
        if collection is None:
            raise KnowledgeBaseError(
                f"no knowledge base for {self.spec.name!r} at {self.location} (collection {self.name} is missing); "
                f"build it with `raydar kb build --spec {self.spec.source_file or '<spec>'}`"
            )
        if collection.count() == 0:
            raise KnowledgeBaseError(
                f"the knowledge base of {self.spec.name!r} at {self.location} is empty; label images "
                "(`raydar label`) and build it (`raydar kb build`)"
            )
        self._ready = collection
        return collection

    @staticmethod
    def _check_embedder(collection, side: str, embedder) -> None:
        """Vectors from two embedders cannot be compared: refuse, saying which is which."""
        ours, theirs = _described(embedder), _embedder_of(collection.metadata or {}, side)
        if ours != theirs:
            described = "{embedder} (version {embedder_version}, {dim} dimensions)".format
            raise _mismatch(collection, side, described(**theirs), f"this query uses {described(**ours)}")

    write_batch = 1000  # entries per Chroma call (under the client's own limit)

    def _chunk(self) -> int:
        return max(1, min(self.client.get_max_batch_size(), self.write_batch))

    def check_embedders(self) -> None:
        """Before indexing: the spec's embedders must be the ones the stored vectors came from (the text
        embedder by name, so that a build with nothing new does not load the model)."""
        collection = self._collection()
        if collection is None:
            return
        self._check_embedder(collection, "image", image_embedder(self.spec.knowledge_base.image_embedder))
        stored = _embedder_of(collection.metadata or {}, "text")["embedder"]
        if stored != self.spec.knowledge_base.embedder:
            raise _mismatch(collection, "text", stored, f"the spec asks for {self.spec.knowledge_base.embedder}")

    def _writable(self) -> None:
        if self.read_only:
            raise KnowledgeBaseError(f"the knowledge base at {self.location} is opened read-only")
        self._ready = None

    def count(self) -> int:
        collection = self._collection()
        return collection.count() if collection is not None else 0

    # indexing ------------------------------------------------------------
    def plan(self, entries: list[Entry]) -> IndexPlan:
        """Compare `entries` with what is stored, by content hash."""
        stored = self._stored_hashes()
        plan = IndexPlan()
        for entry in entries:
            old = stored.get(entry.id)
            if old is None:
                plan.new.append(entry)
            elif old != entry.metadata["content_hash"]:
                plan.changed.append(entry)
            else:
                plan.unchanged += 1
        wanted = {e.id for e in entries}
        plan.removed = sorted(set(stored) - wanted)
        return plan

    def _stored_hashes(self) -> dict[str, str]:
        collection = self._collection()
        if collection is None:
            return {}
        return {id_: meta["content_hash"] for page in self._pages(collection, include=["metadatas"])
                for id_, meta in zip(page["ids"], page["metadatas"]) if (meta or {}).get("content_hash")}

    @staticmethod
    def _pages(collection, include: list[str]) -> Iterable[dict]:
        offset = 0
        while True:
            page = collection.get(include=include, limit=_PAGE, offset=offset)
            if not page["ids"]:
                return
            yield page
            offset += len(page["ids"])

    def image_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        """Stored image embeddings (to keep them for entries whose label changed but image did not)."""
        return self._vectors("image", ids)

    def text_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        return self._vectors("text", ids)

    def _vectors(self, side: str, ids: list[str]) -> dict[str, np.ndarray]:
        collection = self._collection()
        if collection is None or not ids:
            return {}
        got = collection.get(ids=list(ids), include=["embeddings"])
        if not len(got["ids"]):
            return {}
        return dict(zip(got["ids"], self._halves(collection, got["embeddings"])[side]))

    @staticmethod
    def _halves(collection, vectors) -> dict[str, np.ndarray]:
        """Stored vectors split back into unit text and image embeddings."""
        vectors = np.asarray(vectors, np.float32)
        cut = int(collection.metadata["text_dim"])
        return {"text": _unit(vectors[:, :cut]), "image": _unit(vectors[:, cut:])}

    def upsert(self, entries: list[Entry], text_vectors: np.ndarray, image_vectors: np.ndarray, *,
               text_embedder_=None, image_embedder_=None) -> None:
        """Write entries with their text and image vectors (rows in the same order). Each entry is one
        Chroma record, its content hash beside its vector, so a write cut short leaves every entry whole
        or absent: never one that looks stored and is not."""
        self._writable()
        if not entries:
            return
        text_e = text_embedder_ or text_embedder(self.spec.knowledge_base.embedder)
        image_e = image_embedder_ or image_embedder(self.spec.knowledge_base.image_embedder)
        collection = self._collection(create_with=self._identity(_described(text_e), _described(image_e)))
        self._check_embedder(collection, "text", text_e)
        self._check_embedder(collection, "image", image_e)
        vectors = joint_vectors(text_vectors, image_vectors)
        step = self._chunk()
        for start in range(0, len(entries), step):
            chunk = entries[start:start + step]
            collection.upsert(ids=[e.id for e in chunk], embeddings=vectors[start:start + step],
                              documents=[e.document for e in chunk], metadatas=[e.metadata for e in chunk])
        stamp = {"updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        collection.modify(metadata={**(collection.metadata or {}), **stamp})

    def delete(self, ids: list[str]) -> None:
        self._writable()
        collection = self._collection()
        if collection is not None and ids:
            for start in range(0, len(ids), _PAGE):
                collection.delete(ids=ids[start:start + _PAGE])

    def reset(self) -> None:
        """Delete the collection, and those of the old two-collection layout (a rebuild, e.g. after
        changing an embedder)."""
        self._writable()
        names = self._old_layout() + ([self.name] if self._get(self.name) is not None else [])
        for name in names:
            self.client.delete_collection(name)

    # searching -----------------------------------------------------------
    def search_text(self, query: str, n: int = 5, where: dict | None = None) -> list[Hit]:
        """Entries whose document is closest in meaning to `query`."""
        if not query.strip():
            raise KnowledgeBaseError("empty text query")
        embedder = text_embedder(self.spec.knowledge_base.embedder)
        self._check_embedder(self._searchable(), "text", embedder)
        return self._query("text", embedder.embed([query])[0], n, where)

    def search_image(self, image: bytes | Image.Image, n: int = 5, where: dict | None = None,
                     exclude: Iterable[str] = ()) -> list[Hit]:
        """Entries whose image looks most like `image` (encoded bytes or a decoded image)."""
        return self._query("image", self.embed_image(image), n, where, exclude)

    def embed_image(self, image: bytes | Image.Image) -> np.ndarray:
        embedder = image_embedder(self.spec.knowledge_base.image_embedder)
        self._check_embedder(self._searchable(), "image", embedder)
        if isinstance(image, (bytes, bytearray)):
            image = decode_query_image(bytes(image), self.spec)
        return embedder.embed([image])[0]

    def _query(self, side: str, vector: np.ndarray, n: int, where: dict | None,
               exclude: Iterable[str] = ()) -> list[Hit]:
        """The `n` entries nearest to `vector` on the `side` half: the query holds zeros on the other."""
        if n < 1:
            return []
        collection = self._searchable()
        clauses = [c for c in (where_filter(where),) if c]
        exclude = list(exclude)
        if exclude:
            clauses.append({"image_id": {"$nin": exclude}})
        chroma_where = None if not clauses else clauses[0] if len(clauses) == 1 else {"$and": clauses}
        halves = {s: np.zeros(int(collection.metadata[f"{s}_dim"]), np.float32) for s in SIDES}
        halves[side] = _unit(vector)[0]
        result = collection.query(query_embeddings=[np.concatenate([halves[s] for s in SIDES])], n_results=n,
                                  where=chroma_where, include=["documents", "metadatas", "distances"])
        return [Hit(i, half_distance(d), doc, meta) for i, d, doc, meta in
                zip(result["ids"][0], result["distances"][0], result["documents"][0], result["metadatas"][0])]

    def list(self, where: dict | None = None, limit: int | None = 20, offset: int = 0) -> list[Hit]:
        """Entries in id order (Chroma's), optionally filtered."""
        got = self._searchable().get(where=where_filter(where), limit=limit, offset=offset,
                                     include=["documents", "metadatas"])
        return [Hit(i, None, doc, meta) for i, doc, meta in zip(got["ids"], got["documents"], got["metadatas"])]

    def stats(self) -> dict:
        """Counts by split and label type, per-class object totals, embedders, where it lives."""
        collection = self._collection()
        out: dict[str, Any] = {"dataset": self.spec.name, "collection": self.name, "location": self.location,
                               "read_only": self.read_only,
                               "entries": collection.count() if collection is not None else 0}
        if collection is None:
            return out
        splits: dict[str, int] = {}
        types: dict[str, int] = {}
        objects: dict[str, int] = {}
        for page in self._pages(collection, include=["metadatas"]):
            for meta in page["metadatas"]:
                splits[meta.get("split", "")] = splits.get(meta.get("split", ""), 0) + 1
                for t in meta.get("type", []):
                    types[t] = types.get(t, 0) + 1
                for key, value in meta.items():
                    if key.startswith("n_") and isinstance(value, int):
                        objects[key] = objects.get(key, 0) + value
        out.update(splits=dict(sorted(splits.items())), types=dict(sorted(types.items())),
                   objects=dict(sorted(objects.items())))
        identity = collection.metadata or {}
        for side in SIDES:
            out[f"{side}_embedder"] = _embedder_of(identity, side)
        out["updated_at"] = identity.get("updated_at")
        return out

    # snapshots -----------------------------------------------------------
    def write_snapshot(self) -> str:
        """Every entry with its text and image vectors, as one Parquet file beside the knowledge base;
        returns its URI."""
        collection = self._collection()
        if collection is None:
            raise KnowledgeBaseError(f"nothing to snapshot: the knowledge base of {self.spec.name!r} is missing")
        ids, documents, metadatas = [], [], []
        vectors: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
        for page in self._pages(collection, include=["documents", "metadatas", "embeddings"]):
            ids += page["ids"]
            documents += page["documents"]
            metadatas += [json.dumps(meta, sort_keys=True) for meta in page["metadatas"]]
            for side, halves in self._halves(collection, page["embeddings"]).items():
                vectors[side].append(halves)
        identity = collection.metadata or {}
        header = {side: _embedder_of(identity, side) for side in SIDES}
        header["updated_at"] = identity.get("updated_at")
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "document": pa.array(documents, pa.string()),
                "metadata": pa.array(metadatas, pa.string()),
                **{f"{side}_vector": _fixed_size_list(vectors[side], int(header[side]["dim"])) for side in SIDES},
            }
        ).replace_schema_metadata({"raydar_kb": json.dumps(header, sort_keys=True)})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.root.write_bytes(buf.getvalue(), SNAPSHOT)
        return self.root.uri_of(SNAPSHOT)

    def _restore(self, table: pa.Table) -> None:
        # `text` and `image` hold each half's embedder, as in snapshots of the old two-collection layout
        # (which kept `updated_at` in them)
        header = json.loads((table.schema.metadata or {}).get(b"raydar_kb", b"{}"))
        if not header:
            raise KnowledgeBaseError(f"{self.root.uri_of(SNAPSHOT)}: not a raydar knowledge-base snapshot")
        updated_at = header.get("updated_at") or header["text"].get("updated_at")
        extra = {"updated_at": updated_at} if updated_at else {}
        collection = self._collection(create_with=self._identity(header["text"], header["image"], **extra))
        for batch in table.to_batches(max_chunksize=self._chunk()):
            collection.add(ids=batch.column("id").to_pylist(), documents=batch.column("document").to_pylist(),
                           metadatas=[json.loads(m) for m in batch.column("metadata").to_pylist()],
                           embeddings=joint_vectors(_numpy(batch.column("text_vector")),
                                                    _numpy(batch.column("image_vector"))))


def _mismatch(collection, side: str, built_with: str, asked: str) -> KnowledgeBaseError:
    setting = "embedder" if side == "text" else "image_embedder"
    return KnowledgeBaseError(
        f"embedder mismatch in collection {collection.name} ({side} vectors): it was built with {built_with} "
        f"but {asked}; set the spec's knowledge_base.{setting} back, or rebuild with `raydar kb build --rebuild`"
    )


def _fixed_size_list(parts: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    flat = np.concatenate([p.reshape(-1) for p in parts]).astype(np.float32) if parts else np.zeros(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)


def _numpy(column: pa.FixedSizeListArray) -> np.ndarray:
    # flatten(), not .values: a batch is a slice of the table, and .values ignores the slice's offset
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
