"""The serving feedback log: what the endpoint answered, where its members disagreed, what users corrected.

Under `<storage>/<dataset>/feedback/`:

    log/<writer>-<seq>.parquet    rows appended as small Parquet parts, each written whole or not at all
    images/<sha256>.<ext>         the images answered (content-addressed, stored once), for the teacher

A `detection` row per answered image: its sha256, each member's label (or error), the fused label, the
members' agreement, whether that makes it a *hard example* (agreement below the endpoint's
threshold), model and adapter versions, latency. A `feedback` row per user correction: the image and
the corrected label. `raydar label --from-feedback` sends hard examples to the teacher and turns
corrections into labelled rows, so both become training data. A serving replica writes through a
`FeedbackWriter`, which buffers rows and images and writes them in the background.

Like `raydar.labels.LabelStore`, the log is handed a storage root (cluster.StorageRoot or anything
with the same methods), so this module stays free of how storage is reached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import re
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydar.labels import Storage

logger = logging.getLogger(__name__)

FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # detection / feedback
        pa.field("request_id", pa.string()),
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the image's bytes
        pa.field("image_file", pa.string()),  # name under images/, "" when the image was not kept
        pa.field("at", pa.timestamp("ms", tz="UTC")),
        pa.field("dataset", pa.string()),
        pa.field("task", pa.string()),
        pa.field("members", pa.string()),  # JSON: member -> label (null for a member that failed)
        pa.field("member_errors", pa.string()),  # JSON: member -> why it failed
        pa.field("fused", pa.string()),  # JSON of the fused label
        pa.field("agreement", pa.float32()),  # in [0, 1]; null with fewer than two members answering
        pa.field("hard", pa.bool_()),  # the members disagreed: worth asking the teacher
        pa.field("model", pa.string()),  # the student's base model
        pa.field("adapter", pa.string()),  # adapter name and version, "name@sha256:..."
        pa.field("latency_s", pa.float32()),
        pa.field("label", pa.string()),  # feedback rows: JSON of the user's corrected label
        pa.field("comment", pa.string()),
    ]
)

LOG_DIR = "log"
IMAGES_DIR = "images"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_image_id(value: str) -> bool:
    return bool(_SHA256.match(value or ""))


def image_file_name(image_id: str, fmt: str) -> str:
    """The file an image is kept as under images/: its sha256 and the format's usual extension."""
    return f"{image_id}.{'jpg' if fmt == 'jpeg' else fmt}"


class FeedbackLog:
    """The feedback of one dataset under a storage root (`<root>/<dataset>/feedback/`)."""

    def __init__(self, root: Storage) -> None:
        self.root = root

    # writing ------------------------------------------------------------
    def append(self, rows: list[dict], writer: str, seq: int) -> str | None:
        """Write rows as one new part of the log; returns its path (None for no rows)."""
        if not rows:
            return None
        table = pa.Table.from_pylist([{**_EMPTY_ROW, **row} for row in rows], schema=FEEDBACK_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.root.write_bytes(buf.getvalue(), LOG_DIR, f"{writer}-{seq:06d}.parquet")

    def keep_image(self, data: bytes, image_id: str, fmt: str) -> str:
        """Store an image once under its sha256; returns its file name."""
        name = image_file_name(image_id, fmt)
        if not self.root.exists(IMAGES_DIR, name):
            self.root.write_bytes(data, IMAGES_DIR, name)
        return name

    # reading ------------------------------------------------------------
    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every row written so far, in the order the parts were written."""
        tables = []
        for name in self.root.list(LOG_DIR, suffix=".parquet"):
            try:
                tables.append(pq.read_table(io.BytesIO(self.root.read_bytes(LOG_DIR, name)), columns=columns))
            except (pa.ArrowInvalid, OSError) as e:
                raise RuntimeError(f"{self.root.uri_of(LOG_DIR, name)}: unreadable feedback part: {e}") from None
        if not tables:
            schema = FEEDBACK_SCHEMA if columns is None else pa.schema([FEEDBACK_SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def image_file(self, image_id: str, formats: list[str]) -> str | None:
        """The stored file of an image kept in one of `formats`, or None if it was not kept."""
        for fmt in formats:
            name = image_file_name(image_id, fmt)
            if self.root.exists(IMAGES_DIR, name):
                return name
        return None

    def images_uri(self) -> str:
        return self.root.uri_of(IMAGES_DIR)

    def hard_examples(self) -> dict[str, str]:
        """image id -> image file, for the images the members disagreed on whose image was kept; oldest first."""
        table = self.read(["kind", "image_id", "image_file", "hard"])
        table = table.filter(pc.and_(pc.equal(table["kind"], "detection"),
                                     pc.and_(pc.fill_null(table["hard"], False), pc.not_equal(table["image_file"], ""))))
        return dict(zip(table["image_id"].to_pylist(), table["image_file"].to_pylist()))

    def corrections(self) -> dict[str, dict]:
        """image id -> the newest correction users sent for it (the label, the image file, when)."""
        table = self.read()
        table = table.filter(pc.equal(table["kind"], "feedback"))
        newest: dict[str, dict] = {}
        for row in table.to_pylist():
            if row["label"] and (row["image_id"] not in newest or row["at"] >= newest[row["image_id"]]["at"]):
                newest[row["image_id"]] = {"label": json.loads(row["label"]), "image_file": row["image_file"],
                                           "at": row["at"], "comment": row["comment"] or ""}
        return newest

    def detection(self, request_id: str) -> str | None:
        """The image id of the logged detection `request_id`, or None."""
        table = self.read(["kind", "request_id", "image_id"])
        table = table.filter(pc.and_(pc.equal(table["kind"], "detection"), pc.equal(table["request_id"], request_id)))
        return table["image_id"][0].as_py() if table.num_rows else None

    def counts(self) -> dict[str, int]:
        """Rows and distinct images by kind: what the endpoint has collected for training."""
        table = self.read(["kind", "image_id", "hard"])
        detections = table.filter(pc.equal(table["kind"], "detection"))
        hard = detections.filter(pc.fill_null(detections["hard"], False))
        feedback = table.filter(pc.equal(table["kind"], "feedback"))
        return {
            "detections": detections.num_rows,
            "images": len(set(detections["image_id"].to_pylist())),
            "hard_examples": len(set(hard["image_id"].to_pylist())),
            "corrections": len(set(feedback["image_id"].to_pylist())),
        }


_EMPTY_ROW = {name: None for name in FEEDBACK_SCHEMA.names} | {"image_file": "", "comment": ""}


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class FeedbackBuffer:
    """Rows waiting to be appended to the log as a part of their own, every `rows` rows or `seconds`.
    One per serving replica (`writer` keeps the parts of replicas apart). `take` hands out the rows and
    the part's number; `give_back` returns them when the write failed, so nothing is lost."""

    def __init__(self, *, rows: int = 64, seconds: float = 2.0, writer: str | None = None) -> None:
        self.rows, self.seconds = rows, seconds
        self.writer = writer or f"{now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.pending: list[dict] = []
        self.seq = 0
        self.last = time.monotonic()

    def add(self, row: dict) -> None:
        self.pending.append(row)

    def due(self) -> bool:
        return len(self.pending) >= self.rows or (bool(self.pending) and time.monotonic() - self.last >= self.seconds)

    def take(self) -> tuple[list[dict], int]:
        rows, self.pending, self.last = self.pending, [], time.monotonic()
        seq = self.seq
        if rows:
            self.seq += 1
        return rows, seq

    def give_back(self, rows: list[dict]) -> None:
        self.pending = rows + self.pending


class FeedbackWriter:
    """A serving replica's write-behind to the log: rows and images wait in memory and are written in the
    background (every `rows` rows or `seconds`), so no answer waits on storage; a write that fails is
    retried with the next one."""

    def __init__(self, log: FeedbackLog, *, rows: int, seconds: float, keep_images: bool) -> None:
        self.log = log
        self.seconds = seconds
        self.keep_images = keep_images
        self.buffer = FeedbackBuffer(rows=rows, seconds=seconds)
        self.pending_images: dict[str, tuple[bytes, str]] = {}
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def keep(self, data: bytes, image_id: str, fmt: str) -> str:
        """The file the image will be kept as (written with the next rows), or "" when images are not kept."""
        if not self.keep_images:
            return ""
        self.pending_images.setdefault(image_id, (data, fmt))
        return image_file_name(image_id, fmt)

    async def keep_corrected(self, data: bytes, image_id: str, fmt: str) -> str:
        """The file of an image a user corrected: kept even when images are not, since the correction needs it."""
        return self.keep(data, image_id, fmt) or await asyncio.to_thread(self.log.keep_image, data, image_id, fmt)

    async def stored_image(self, image_id: str, formats: list[str]) -> str | None:
        """The file of an image kept (or waiting to be) in one of `formats`, or None."""
        if image_id in self.pending_images:
            return image_file_name(image_id, self.pending_images[image_id][1])
        return await asyncio.to_thread(self.log.image_file, image_id, formats)

    async def answered_image(self, request_id: str) -> str | None:
        """The image id of the detection `request_id` answered, from this replica's waiting rows or the log;
        None when there is none. A detection by another replica reaches the log within `seconds`, so the log
        is read again once after that long."""
        for attempt in range(2):
            for row in self.buffer.pending:
                if row.get("kind") == "detection" and row.get("request_id") == request_id:
                    return row["image_id"]
            found = await asyncio.to_thread(self.log.detection, request_id)
            if found is not None or attempt:
                return found
            await asyncio.sleep(self.seconds)
        return None

    def add(self, row: dict) -> None:
        """A row, written within `seconds` (sooner once `rows` rows or images are waiting)."""
        self.buffer.add(row)
        if self.buffer.due() or len(self.pending_images) >= self.buffer.rows:
            self._background(self.flush())
        elif self._flusher is None or self._flusher.done():
            self._flusher = self._background(self._flush_later())

    async def write_now(self, row: dict) -> None:
        """A row written before this returns, with every row waiting."""
        self.buffer.add(row)
        await self.flush()

    async def flush(self) -> None:
        """Images first, then the rows naming them, each part written atomically; on failure kept for later."""
        async with self._flush_lock:
            images, self.pending_images = self.pending_images, {}
            rows, seq = self.buffer.take()
            try:
                for image_id, (data, fmt) in images.items():
                    await asyncio.to_thread(self.log.keep_image, data, image_id, fmt)
                if rows:
                    await asyncio.to_thread(self.log.append, rows, self.buffer.writer, seq)
            except Exception as e:
                logger.warning("feedback log: write failed, will retry: %s", e)
                self.pending_images = {**images, **self.pending_images}
                self.buffer.give_back(rows)

    def _background(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)  # held until done: the event loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.seconds)
        await self.flush()
