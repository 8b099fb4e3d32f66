"""The knowledge base: every labelled example of a dataset, searchable by text and by image (ChromaDB).

One entry per labelled image (id = the image's sha256): a document saying what the teacher found
(classes, counts, the ontology's descriptions, objects' descriptions, Q&A, captions), metadata to
filter on (split, label types, per-class counts, source URI, teacher, confidence and difficulty when
the teacher gave them) and the label itself, plus two vectors: the document's text embedding and the
image's embedding. Chroma keeps one vector space per collection, so a dataset's knowledge base is a
pair of collections with the same ids and metadata: `<dataset>.text` and `<dataset>.image`.

Where it lives (`KnowledgeBase.open`):
- an embedded Chroma at `<storage>/<dataset>/kb/chroma` for a local storage root (the default);
- a Chroma server (`chroma run`) when `knowledge_base.server` is set;
- a read-only *snapshot* (`<storage>/<dataset>/kb/snapshot.parquet`, written by every build) that a
  serving replica copies into a local temporary Chroma: any storage root, local or a bucket, and no
  shared database file between processes. A remote storage root without a server works the same way
  for writing: the build restores the snapshot locally, updates it and writes it back.

Re-indexing is incremental: a content hash in each entry's metadata says whether its row changed;
only new images are embedded as images, only new or changed rows as text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
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
from raydar.spec import DatasetSpec
from raydar.tasks import AnswerError, extract_json

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
    """One search result: smaller distance = more similar (cosine distance, 0-2)."""

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
            "task": spec.task.kind,
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


def metadata_key(prefix: str, name: str) -> str:
    """`n_explicit`, `p_pleural_thickening`: a class or target name as a metadata key."""
    return prefix + (re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_") or "x")


def label_metadata(task, label: dict) -> dict[str, Any]:
    """Filterable facts of a label: `type` (the classes present), per-class counts, probabilities, values."""
    meta: dict[str, Any] = {}
    if task.kind in ("points", "boxes"):
        items = label["points"] if task.kind == "points" else label["objects"]
        meta["n_objects"] = len(items)
        counts = {name: 0 for name in task.ontology}
        for item in items:
            counts[item["label"]] = counts.get(item["label"], 0) + 1
        meta.update({metadata_key("n_", name): n for name, n in counts.items()})
        present = [name for name, n in counts.items() if n]
    elif task.kind == "caption":
        meta["entity"] = label["entity"]
        present = [label["entity"]]
    elif task.kind == "multilabel":
        probs = label["probabilities"]
        meta.update({metadata_key("p_", name): float(p) for name, p in probs.items()})
        present = [name for name, p in probs.items() if p >= task.threshold]
    else:
        meta.update({metadata_key("v_", name): float(v) for name, v in label["values"].items()})
        present = []
    if present:
        meta["type"] = present  # Chroma refuses empty lists; no key means "none"
    return meta


def describe_label(task, label: dict, raw: Any = None) -> str:
    """The document text: what the teacher found, in words a text query can match."""
    ontology = getattr(task, "ontology", {})
    if task.kind in ("points", "boxes"):
        # "2 explicit: <its description>. 1 implicit: <...>." in ontology order: a text query about what
        # things look like then ranks the entries where such things make up more of the image first
        items = label["points"] if task.kind == "points" else label["objects"]
        counts = {name: sum(item["label"] == name for item in items) for name in ontology}
        parts = [f"{n} {name}: {ontology[name].description}." for name, n in counts.items() if n] or ["Nothing found."]
        if task.kind == "boxes":
            parts += [f"{o['label']}: {o['description']}." for o in items if o.get("description")]
            parts += [f"Q: {qa['question']} A: {qa['answer']}" for qa in label.get("qa", [])]
    elif task.kind == "caption":
        entity = label["entity"]
        parts = [f"{entity}: {label['caption']}"]
        if entity in ontology:
            parts.append(f"{entity}: {ontology[entity].description}.")
    elif task.kind == "multilabel":
        present = [(n, p) for n, p in label["probabilities"].items() if p >= task.threshold]
        if present:
            parts = ["Findings: " + ", ".join(f"{n} ({p:.2f})" for n, p in present) + "."]
            parts += [f"{n}: {ontology[n].description}." for n, _ in present if n in ontology]
        else:
            parts = [f"No finding above {task.threshold:g}."]
    else:
        parts = [", ".join(f"{n} {v:g} {task.targets[n].unit}".strip() for n, v in label["values"].items()) + "."]
    if isinstance(raw, dict) and isinstance(raw.get("notes"), str) and raw["notes"].strip():
        parts.append(f"Notes: {raw['notes'].strip()}")
    return " ".join(parts)


def summarise_label(task, label: dict) -> str:
    """A few words for tables: `2 explicit, 1 implicit`, the entity, the findings, the values."""
    if task.kind in ("points", "boxes"):
        items = label["points"] if task.kind == "points" else label["objects"]
        counts = {name: sum(item["label"] == name for item in items) for name in task.ontology}
        return ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "nothing"
    if task.kind == "caption":
        return label["entity"]
    if task.kind == "multilabel":
        return ", ".join(n for n, p in label["probabilities"].items() if p >= task.threshold) or "no finding"
    return ", ".join(f"{n} {v:g}" for n, v in label["values"].items())


def teacher_confidence(task, label: dict, raw: Any) -> float | None:
    """The teacher's confidence when it gave one: mean object score, multilabel certainty, or a
    `confidence` field in its answer. None when unknown (most VLMs give none)."""
    if isinstance(raw, dict) and isinstance(raw.get("confidence"), (int, float)):
        return float(raw["confidence"])
    if task.kind == "multilabel":
        probs = list(label["probabilities"].values())
        return float(np.mean([max(p, 1 - p) for p in probs])) if probs else None
    if task.kind in ("points", "boxes") and isinstance(raw, dict):
        items = raw.get("points" if task.kind == "points" else "objects")
        scores = [i.get("score", i.get("confidence")) for i in items or [] if isinstance(i, dict)]
        scores = [float(s) for s in scores if isinstance(s, (int, float))]
        if scores:
            return float(np.mean(scores))
    return None


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
        path = source_uri.split("://", 1)[1] if "://" in source_uri else source_uri
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (OSError, pa.ArrowException) as e:
            raise KnowledgeBaseError(f"{source_uri}: cannot read the labelled image: {e}") from None


def decode_query_image(data: bytes, spec: DatasetSpec) -> Image.Image:
    """The image a query is about, decoded as the labelling job decodes images; a clear error if not."""
    try:
        return prepare_image(data, spec.images.max_pixels, spec.images.max_image_pixels).image
    except ImageProblem as e:
        raise QueryImageError(f"query image cannot be used: {e}") from None


# ---------------------------------------------------------------- the knowledge base


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
        # a replica's local copy goes when the object does, or at exit, also if close() is never called
        self._cleanup = weakref.finalize(self, shutil.rmtree, temp_dir, True) if temp_dir else None
        self.text_name = f"{spec.name}.text"
        self.image_name = f"{spec.name}.image"
        self._ready: dict[str, Any] = {}  # collections known to exist and hold entries

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

    # collections --------------------------------------------------------
    def _collection(self, name: str, *, create_with: dict | None = None):
        from chromadb.errors import NotFoundError

        try:
            return self.client.get_collection(name, embedding_function=None)
        except (NotFoundError, ValueError):
            if create_with is None:
                return None
        return self.client.create_collection(name, metadata=create_with, embedding_function=None,
                                             configuration={"hnsw": {"space": "cosine"}})

    def _identity(self, vectors: str, embedder) -> dict:
        return {"raydar": "knowledge-base", "dataset": self.spec.name, "task": self.spec.task.kind,
                "vectors": vectors, "embedder": embedder.name, "embedder_version": embedder.version,
                "dim": int(embedder.dim)}

    def _searchable(self, name: str):
        if name in self._ready:
            return self._ready[name]
        collection = self._collection(name)
        if collection is None:
            raise KnowledgeBaseError(
                f"no knowledge base for {self.spec.name!r} at {self.location} (collection {name} is missing); "
                f"build it with `raydar kb build --spec {self.spec.source_file or '<spec>'}`"
            )
        if collection.count() == 0:
            raise KnowledgeBaseError(
                f"the knowledge base of {self.spec.name!r} at {self.location} is empty; label images "
                "(`raydar label`) and build it (`raydar kb build`)"
            )
        self._ready[name] = collection
        return collection

    @staticmethod
    def _check_embedder(collection, embedder) -> None:
        """Vectors from two embedders cannot be compared: refuse, saying which is which."""
        stored = collection.metadata or {}
        ours = (embedder.name, embedder.version, int(embedder.dim))
        theirs = (stored.get("embedder"), stored.get("embedder_version"), stored.get("dim"))
        if ours != theirs:
            raise KnowledgeBaseError(
                f"embedder mismatch in collection {collection.name}: it was built with {theirs[0]} "
                f"(version {theirs[1]}, {theirs[2]} dimensions) but this query uses {ours[0]} (version {ours[1]}, "
                f"{ours[2]} dimensions); set the spec's knowledge_base embedder back, or rebuild with "
                "`raydar kb build --rebuild`"
            )

    write_batch = 1000  # entries per Chroma call (under the client's own limit)

    def _chunk(self) -> int:
        return max(1, min(self.client.get_max_batch_size(), self.write_batch))

    def check_embedders(self) -> None:
        """Before indexing: the spec's embedders must be the ones the stored vectors came from (the text
        embedder by name, so that a build with nothing new does not load the model)."""
        text, image = self._collection(self.text_name), self._collection(self.image_name)
        if image is not None:
            self._check_embedder(image, image_embedder(self.spec.knowledge_base.image_embedder))
        stored = (text.metadata or {}).get("embedder") if text is not None else None
        if stored is not None and stored != self.spec.knowledge_base.embedder:
            raise KnowledgeBaseError(
                f"embedder mismatch in collection {text.name}: it was built with {stored} but the spec asks for "
                f"{self.spec.knowledge_base.embedder}; set it back, or rebuild with `raydar kb build --rebuild`"
            )

    def _writable(self) -> None:
        if self.read_only:
            raise KnowledgeBaseError(f"the knowledge base at {self.location} is opened read-only")
        self._ready.clear()

    def count(self) -> int:
        collection = self._collection(self.text_name)
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

    def _stored_hashes(self) -> dict[str, str | None]:
        text, image = self._collection(self.text_name), self._collection(self.image_name)
        if text is None or image is None:
            return {}
        in_image = set(self._all_ids(image))
        hashes = {}
        for page in self._pages(text, include=["metadatas"]):
            for id_, meta in zip(page["ids"], page["metadatas"]):
                # an entry whose image vector is missing (an interrupted build) counts as new
                hashes[id_] = (meta or {}).get("content_hash") if id_ in in_image else None
        return {k: v for k, v in hashes.items() if v is not None}

    def _all_ids(self, collection) -> list[str]:
        return [i for page in self._pages(collection, include=[]) for i in page["ids"]]

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
        """Stored image vectors (to keep them for entries whose label changed but image did not)."""
        return self._vectors(self.image_name, ids)

    def text_vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        return self._vectors(self.text_name, ids)

    def _vectors(self, name: str, ids: list[str]) -> dict[str, np.ndarray]:
        collection = self._collection(name)
        if collection is None or not ids:
            return {}
        got = collection.get(ids=list(ids), include=["embeddings"])
        return {i: np.asarray(v, np.float32) for i, v in zip(got["ids"], got["embeddings"])}

    def upsert(self, entries: list[Entry], text_vectors: np.ndarray, image_vectors: np.ndarray, *,
               text_embedder_=None, image_embedder_=None) -> None:
        """Write entries with their vectors (rows in the same order) into both collections."""
        self._writable()
        if not entries:
            return
        text_e = text_embedder_ or text_embedder(self.spec.knowledge_base.embedder)
        image_e = image_embedder_ or image_embedder(self.spec.knowledge_base.image_embedder)
        text = self._collection(self.text_name, create_with=self._identity("text", text_e))
        image = self._collection(self.image_name, create_with=self._identity("image", image_e))
        self._check_embedder(text, text_e)
        self._check_embedder(image, image_e)
        step = self._chunk()
        for start in range(0, len(entries), step):
            chunk = entries[start:start + step]
            ids = [e.id for e in chunk]
            docs = [e.document for e in chunk]
            metas = [e.metadata for e in chunk]
            # the image collection first: an entry counts as stored once its text side (with the hash) is
            text_part, image_part = text_vectors[start:start + step], image_vectors[start:start + step]
            image.upsert(ids=ids, embeddings=image_part, documents=docs, metadatas=metas)
            text.upsert(ids=ids, embeddings=text_part, documents=docs, metadatas=metas)
        stamp = {"updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        for collection in (text, image):
            collection.modify(metadata={**(collection.metadata or {}), **stamp})

    def delete(self, ids: list[str]) -> None:
        self._writable()
        for name in (self.text_name, self.image_name):
            collection = self._collection(name)
            if collection is not None and ids:
                for start in range(0, len(ids), _PAGE):
                    collection.delete(ids=ids[start:start + _PAGE])

    def reset(self) -> None:
        """Delete both collections (a rebuild, e.g. after changing the embedder)."""
        self._writable()
        for name in (self.text_name, self.image_name):
            if self._collection(name) is not None:
                self.client.delete_collection(name)

    # searching -----------------------------------------------------------
    def search_text(self, query: str, n: int = 5, where: dict | None = None) -> list[Hit]:
        """Entries whose document is closest in meaning to `query`."""
        if not query.strip():
            raise KnowledgeBaseError("empty text query")
        collection = self._searchable(self.text_name)
        embedder = text_embedder(self.spec.knowledge_base.embedder)
        self._check_embedder(collection, embedder)
        return self._query(collection, embedder.embed([query])[0], n, where)

    def search_image(self, image: bytes | Image.Image, n: int = 5, where: dict | None = None,
                     exclude: Iterable[str] = ()) -> list[Hit]:
        """Entries whose image looks most like `image` (encoded bytes or a decoded image)."""
        collection = self._searchable(self.image_name)
        vector = self.embed_image(image, collection)
        return self._query(collection, vector, n, where, exclude)

    def embed_image(self, image: bytes | Image.Image, collection=None) -> np.ndarray:
        collection = collection or self._searchable(self.image_name)
        embedder = image_embedder(self.spec.knowledge_base.image_embedder)
        self._check_embedder(collection, embedder)
        if isinstance(image, (bytes, bytearray)):
            image = decode_query_image(bytes(image), self.spec)
        return embedder.embed([image])[0]

    def _query(self, collection, vector: np.ndarray, n: int, where: dict | None,
               exclude: Iterable[str] = ()) -> list[Hit]:
        if n < 1:
            return []
        clauses = [c for c in (where_filter(where),) if c]
        exclude = list(exclude)
        if exclude:
            clauses.append({"image_id": {"$nin": exclude}})
        chroma_where = None if not clauses else clauses[0] if len(clauses) == 1 else {"$and": clauses}
        result = collection.query(query_embeddings=[np.asarray(vector, np.float32)], n_results=n,
                                  where=chroma_where, include=["documents", "metadatas", "distances"])
        return [Hit(i, float(d), doc, meta) for i, d, doc, meta in
                zip(result["ids"][0], result["distances"][0], result["documents"][0], result["metadatas"][0])]

    def list(self, where: dict | None = None, limit: int | None = 20, offset: int = 0) -> list[Hit]:
        """Entries in id order (Chroma's), optionally filtered."""
        collection = self._searchable(self.text_name)
        got = collection.get(where=where_filter(where), limit=limit, offset=offset,
                             include=["documents", "metadatas"])
        return [Hit(i, None, doc, meta) for i, doc, meta in zip(got["ids"], got["documents"], got["metadatas"])]

    def stats(self) -> dict:
        """Counts by split and label type, per-class object totals, embedders, where it lives."""
        text = self._collection(self.text_name)
        image = self._collection(self.image_name)
        out: dict[str, Any] = {"dataset": self.spec.name, "location": self.location, "read_only": self.read_only,
                               "entries": text.count() if text is not None else 0,
                               "image_entries": image.count() if image is not None else 0}
        if text is None:
            return out
        splits: dict[str, int] = {}
        types: dict[str, int] = {}
        objects: dict[str, int] = {}
        for page in self._pages(text, include=["metadatas"]):
            for meta in page["metadatas"]:
                splits[meta.get("split", "")] = splits.get(meta.get("split", ""), 0) + 1
                for t in meta.get("type", []):
                    types[t] = types.get(t, 0) + 1
                for key, value in meta.items():
                    if key.startswith("n_") and isinstance(value, int):
                        objects[key] = objects.get(key, 0) + value
        out.update(splits=dict(sorted(splits.items())), types=dict(sorted(types.items())),
                   objects=dict(sorted(objects.items())))
        for name, collection in (("text_embedder", text), ("image_embedder", image)):
            meta = (collection.metadata or {}) if collection is not None else {}
            out[name] = {k: meta.get(k) for k in ("embedder", "embedder_version", "dim")}
        out["updated_at"] = (text.metadata or {}).get("updated_at")
        return out

    # snapshots -----------------------------------------------------------
    def write_snapshot(self) -> str:
        """Every entry with both vectors, as one Parquet file beside the knowledge base; returns its URI."""
        text, image = self._collection(self.text_name), self._collection(self.image_name)
        if text is None or image is None:
            raise KnowledgeBaseError(f"nothing to snapshot: the knowledge base of {self.spec.name!r} is missing")
        rows: dict[str, dict] = {}
        for page in self._pages(text, include=["documents", "metadatas", "embeddings"]):
            for i, doc, meta, vec in zip(page["ids"], page["documents"], page["metadatas"], page["embeddings"]):
                rows[i] = {"id": i, "document": doc, "metadata": json.dumps(meta, sort_keys=True),
                           "text_vector": np.asarray(vec, np.float32)}
        for page in self._pages(image, include=["embeddings"]):
            for i, vec in zip(page["ids"], page["embeddings"]):
                if i in rows:
                    rows[i]["image_vector"] = np.asarray(vec, np.float32)
        complete = [r for r in rows.values() if "image_vector" in r]
        identity = {"text": text.metadata, "image": image.metadata}
        table = pa.table(
            {
                "id": pa.array([r["id"] for r in complete], pa.string()),
                "document": pa.array([r["document"] for r in complete], pa.string()),
                "metadata": pa.array([r["metadata"] for r in complete], pa.string()),
                "text_vector": _vectors([r["text_vector"] for r in complete], text.metadata["dim"]),
                "image_vector": _vectors([r["image_vector"] for r in complete], image.metadata["dim"]),
            }
        ).replace_schema_metadata({"raydar_kb": json.dumps(identity, sort_keys=True)})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.root.write_bytes(buf.getvalue(), SNAPSHOT)
        return self.root.uri_of(SNAPSHOT)

    def _restore(self, table: pa.Table) -> None:
        identity = json.loads((table.schema.metadata or {}).get(b"raydar_kb", b"{}"))
        if not identity:
            raise KnowledgeBaseError(f"{self.root.uri_of(SNAPSHOT)}: not a raydar knowledge-base snapshot")
        text = self._collection(self.text_name, create_with=identity["text"])
        image = self._collection(self.image_name, create_with=identity["image"])
        for batch in table.to_batches(max_chunksize=self._chunk()):
            ids = batch.column("id").to_pylist()
            docs = batch.column("document").to_pylist()
            metas = [json.loads(m) for m in batch.column("metadata").to_pylist()]
            text.add(ids=ids, documents=docs, metadatas=metas, embeddings=_numpy(batch.column("text_vector")))
            image.add(ids=ids, documents=docs, metadatas=metas, embeddings=_numpy(batch.column("image_vector")))


def _vectors(rows: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(rows).astype(np.float32) if rows else np.zeros(0, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), int(dim))


def _numpy(column: pa.FixedSizeListArray) -> np.ndarray:
    # flatten(), not .values: a batch is a slice of the table, and .values ignores the slice's offset
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
