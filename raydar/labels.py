"""Labelled rows: their Parquet schema, and the store that keeps them safe across crashes and re-runs.

The store is an append-only log of small Parquet parts (`label_log/`), each written whole or not at
all, plus a snapshot (`labels.parquet`) of the newest row per image for one teacher fingerprint,
which later stages read. A killed run loses at most the rows it had not yet flushed; a re-run asks
the teacher only for images with no stored answer.

The store is handed a storage root (cluster.StorageRoot or anything with the same methods), so this
module stays free of how Ray and storage are reached.
"""

from __future__ import annotations

import datetime as dt
import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LABEL_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the file's bytes
        pa.field("source_uri", pa.string()),
        pa.field("width", pa.int32()),  # after EXIF orientation, before resizing
        pa.field("height", pa.int32()),
        pa.field("split", pa.string()),  # train / val / test, from the content hash
        pa.field("task", pa.string()),
        pa.field("label", pa.string()),  # JSON of the task kind's schema, coordinates normalised
        pa.field("teacher_model", pa.string()),
        pa.field("teacher_fingerprint", pa.string()),  # model + prompt + parameters
        pa.field("raw_answer", pa.string()),
        pa.field("status", pa.string()),  # ok / failed
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("latency_s", pa.float32()),
        pa.field("labelled_at", pa.timestamp("ms", tz="UTC")),
        pa.field("run_id", pa.string()),
    ]
)


def answered_row(*, image_id: str, source_uri: str, width: int, height: int, split: str, task: str, label: str,
                 teacher_model: str, teacher_fingerprint: str, run_id: str, raw_answer: str = "", attempts: int = 1,
                 latency_s: float = 0.0) -> dict[str, Any]:
    """One labelled row (status ok) of LABEL_SCHEMA, labelled now; `label` is the kind's JSON."""
    return {
        "image_id": image_id, "source_uri": source_uri, "width": width, "height": height, "split": split,
        "task": task, "label": label, "teacher_model": teacher_model, "teacher_fingerprint": teacher_fingerprint,
        "raw_answer": raw_answer, "status": "ok", "error": "", "attempts": attempts, "latency_s": latency_s,
        "labelled_at": dt.datetime.now(dt.timezone.utc), "run_id": run_id,
    }


LOG_DIR = "label_log"
SNAPSHOT = "labels.parquet"
MANIFEST = "manifest.json"


class Storage(Protocol):
    def join(self, *parts: str) -> str: ...
    def uri_of(self, *parts: str) -> str: ...
    def exists(self, *parts: str) -> bool: ...
    def list(self, *parts: str, suffix: str = "") -> list[str]: ...
    def read_bytes(self, *parts: str) -> bytes: ...
    def write_bytes(self, data: bytes, *parts: str) -> str: ...
    def write_json(self, value: Any, *parts: str) -> str: ...
    def read_json(self, *parts: str) -> Any: ...


@dataclass(frozen=True)
class CacheEntry:
    """What the store knows of one image under one fingerprint."""

    ok: bool
    failed_runs: int


class LabelStore:
    """The labels of one dataset under a storage root (`<root>/<dataset>/labels/`)."""

    def __init__(self, root: Storage) -> None:
        self.root = root

    # writing ------------------------------------------------------------
    def append(self, rows: pa.Table | list[dict], run_id: str, seq: int) -> str | None:
        """Write rows as one new part of the log; returns its path (None for no rows)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
        if table.num_rows == 0:
            return None
        table = table.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.root.write_bytes(buf.getvalue(), LOG_DIR, f"{run_id}-{seq:06d}.parquet")

    def write_snapshot(self, fingerprint: str) -> tuple[str, int]:
        """Newest row per image for `fingerprint` (an ok row wins over a later failure)."""
        table = self.read_log(fingerprint=fingerprint)
        if table.num_rows:
            # ok rows first, then newest first; keep the first row of each image.
            order = pc.sort_indices(
                pa.table(
                    {
                        "ok": pc.equal(table["status"], "ok"),
                        "t": table["labelled_at"],
                    }
                ),
                sort_keys=[("ok", "descending"), ("t", "descending")],
            )
            table = table.take(order)
            table = table.take(pa.array(_first_of_each(table["image_id"].to_pylist()))).sort_by("image_id")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.root.write_bytes(buf.getvalue(), SNAPSHOT), table.num_rows

    def write_manifest(self, manifest: dict) -> None:
        self.root.write_json(manifest, "runs", f"{manifest['run_id']}.json")
        self.root.write_json(manifest, MANIFEST)

    # reading ------------------------------------------------------------
    def read_log(self, fingerprint: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Every row ever written (optionally for one fingerprint). Unreadable parts are reported."""
        tables = []
        for name in self.root.list(LOG_DIR, suffix=".parquet"):
            try:
                part = pq.read_table(io.BytesIO(self.root.read_bytes(LOG_DIR, name)), columns=columns)
            except (pa.ArrowInvalid, OSError) as e:
                raise RuntimeError(f"{self.root.uri_of(LOG_DIR, name)}: unreadable label part: {e}") from None
            if fingerprint is not None:
                part = part.filter(pc.equal(part["teacher_fingerprint"], fingerprint))
            tables.append(part)
        if not tables:
            schema = LABEL_SCHEMA if columns is None else pa.schema([LABEL_SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def cache_index(self, fingerprint: str) -> dict[str, CacheEntry]:
        """image id -> whether an ok label is stored, and how many runs failed on it."""
        log = self.read_log(fingerprint=fingerprint, columns=["image_id", "status", "teacher_fingerprint"])
        ok: set[str] = set()
        failed: dict[str, int] = defaultdict(int)
        for image, status in zip(log["image_id"].to_pylist(), log["status"].to_pylist()):
            if status == "ok":
                ok.add(image)
            else:
                failed[image] += 1
        return {i: CacheEntry(ok=i in ok, failed_runs=failed.get(i, 0)) for i in ok | set(failed)}

    def read_labels(self, status: str | None = "ok") -> pa.Table:
        """The snapshot later stages read (ok rows by default)."""
        if not self.root.exists(SNAPSHOT):
            raise FileNotFoundError(
                f"{self.root.uri_of(SNAPSHOT)}: no labels yet; run `raydar label --spec <spec>` first"
            )
        table = pq.read_table(io.BytesIO(self.root.read_bytes(SNAPSHOT)))
        return table if status is None else table.filter(pc.equal(table["status"], status))

    def manifest(self) -> dict | None:
        return self.root.read_json(MANIFEST) if self.root.exists(MANIFEST) else None


def _first_of_each(keys: list[str]) -> list[int]:
    """Index of the first occurrence of each key."""
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        seen.setdefault(k, i)
    return list(seen.values())
