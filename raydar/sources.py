"""Where a dataset's images are and how they are read: a folder or any pyarrow filesystem URI.

    source = resolve_source(spec, storage.child(spec.name))   # the folder or URI of the images
    fs, paths, prefix = list_files(source, spec.images.extensions)
    data = read_bytes(prefix + paths[0])                      # retried on the errors Ray Data retries
    truths = read_ground_truth(source)                        # ground_truth.jsonl beside the images

Nothing heavier than pyarrow is imported with this module: a Ray worker running `with_file_bytes`
imports only what reading needs, not what its caller's module imports.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs

if TYPE_CHECKING:
    from raydar.spec import DatasetSpec

GROUND_TRUTH_FILE = "ground_truth.jsonl"


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid if hasattr(pafs, "ArrowInvalid") else ValueError, OSError) as e:
        raise ValueError(f"{uri}: not a storage URI pyarrow can open: {e}") from None


def list_files(uri: str, extensions: list[str] | None = None) -> tuple[pafs.FileSystem, list[str], str]:
    """Sorted files under `uri` (recursive) whose suffix is in `extensions`, skipping hidden files.

    Returns (filesystem, paths, prefix), where prefix + path is the file's URI.
    """
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such folder")
    if info.type == pafs.FileType.File:
        entries = [info]
    else:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    wanted = {e.lower() for e in extensions} if extensions else None
    paths = sorted(
        e.path
        for e in entries
        if e.type == pafs.FileType.File
        and not any(part.startswith(".") for part in Path(e.path).relative_to(root).parts if part)
        and (wanted is None or Path(e.path).suffix.lower() in wanted)
    ) if info.type != pafs.FileType.File else [info.path]
    prefix = "" if isinstance(fs, pafs.LocalFileSystem) else uri.split("://", 1)[0] + "://"
    return fs, paths, prefix


def read_bytes(uri: str, filesystem: pafs.FileSystem | None = None, *, attempts: int = 5) -> bytes:
    """The bytes of the file `uri` names: through `filesystem` when given (the path after any scheme), else
    through the filesystem the URI names. The transient errors Ray Data retries (S3's SLOW_DOWN, 503, ...)
    are retried with backoff; any other error (a file gone, no credentials, a path this node cannot see)
    is raised at once."""
    if filesystem is None:
        filesystem, path = resolve(uri)
    else:
        path = uri.split("://", 1)[-1]
    attempt = 1
    while True:
        try:
            with filesystem.open_input_stream(path) as f:
                return f.readall()
        except FileNotFoundError:
            raise
        except OSError as e:
            if attempt == attempts or not _transient(e):
                raise
        time.sleep(min(5.0, 0.2 * 2 ** attempt) * (0.5 + random.random()))  # callers read on threads of their own
        attempt += 1


def _transient(error: OSError) -> bool:
    """Whether Ray Data would retry `error` (its context's `retried_io_errors`, which a user may extend)."""
    from ray.data import DataContext  # only once a read has failed

    return any(message in str(error) for message in DataContext.get_current().retried_io_errors)


def with_file_bytes(batch: pa.Table, source: str) -> pa.Table:
    """`batch` with the bytes of the file each row's `source_uri` names (a path or URI under `source`'s
    filesystem) added as column `image`: a Ray Data map function."""
    fs, _ = resolve(source)
    data = [read_bytes(uri, fs) for uri in batch["source_uri"].to_pylist()]
    return batch.append_column("image", pa.array(data, pa.binary()))


def read_ground_truth(source: str | os.PathLike) -> list[dict]:
    """The records of `ground_truth.jsonl` (GROUND_TRUTH_FILE) beside the images of `source` (a folder or
    URI): one JSON object per line with `label` in the task's schema and `image_id` or `file` (a record
    with only `file` gets the image id of that file's bytes). FileNotFoundError when there is none."""
    from raydar.images import image_id
    from raydar.spec import SpecError

    fs, folder = resolve(source)
    name = f"{folder.rstrip('/')}/{GROUND_TRUTH_FILE}"
    try:
        with fs.open_input_stream(name) as f:
            text = f.read().decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no ground truth here (raydar.demo.make_demo_cells writes one)") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "label" not in record:
                raise KeyError("label")
            if "image_id" not in record:
                record["image_id"] = image_id(read_bytes(f"{folder.rstrip('/')}/{record['file']}", fs))
        except (ValueError, KeyError, TypeError) as e:
            raise SpecError(f"{name}:{n}: expected JSON with `label` and `image_id` or `file` ({e})") from None
        except OSError as e:
            raise SpecError(f"{name}:{n}: cannot read the image it names: {e}") from None
        records.append(record)
    return records


def image_folder(spec: DatasetSpec) -> str:
    """The spec's `images.uri`, resolved against the spec file, checked to exist: a missing folder or bucket
    prefix (or one this machine cannot read) is a SpecError naming the spec file, the field and the path."""
    from raydar.spec import SpecError

    uri = spec.resolve_uri(spec.images.uri)
    where = f"{spec.source_file or spec.name}: images.uri"
    try:
        fs, path = resolve(uri)
        found = fs.get_file_info(path).type != pafs.FileType.NotFound
    except (OSError, ValueError) as e:
        raise SpecError(f"{where}: {uri}: cannot be read: {e}") from None
    if not found:
        raise SpecError(f"{where}: {uri}: no such folder; put the images there or point images.uri at them")
    return uri


def resolve_source(spec: DatasetSpec, root) -> str:
    """The folder or URI of the images; synthetic ones are made on first use under `root`, the dataset's
    folder of the storage root (a cluster.StorageRoot)."""
    from raydar.demo import make_demo_cells

    if spec.images.uri:
        return image_folder(spec)
    gen = spec.images.generate
    folder = root.child("source", f"{gen.kind}-n{gen.n}-s{gen.size}-seed{gen.seed}")
    if folder.exists(GROUND_TRUTH_FILE):
        return folder.uri
    if folder.is_local:
        make_demo_cells(folder.path, gen.n, gen.size, gen.seed)
        return folder.uri
    with tempfile.TemporaryDirectory() as tmp:  # a remote root: make locally, then upload
        made = make_demo_cells(tmp, gen.n, gen.size, gen.seed)
        for path in sorted(made.iterdir(), key=lambda p: p.name == GROUND_TRUTH_FILE):
            folder.write_bytes(path.read_bytes(), path.name)  # ground truth last: it marks "complete"
    return folder.uri
