"""The knowledge base on real Chroma in temporary folders (embedded, `chroma run`, a snapshot in an S3
bucket), filled from labels the simulated teacher gave over real HTTP; the RAG detector against the
simulated teacher's request log; the `raydar kb` command.

"Similar" is defined from the demo's ground truth: the same dominant cell kind (explicit, implicit or
none) and a cell count within 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cluster import StorageRoot
from jobs.cli import main as raydar
from jobs.index import index_labels
from raydar.demo import make_demo_cells
from raydar.sources import read_ground_truth
from raydar.embeddings import text_embedder
from raydar.images import prepare_image, teacher_payload
from raydar.kb import (
    KnowledgeBase,
    KnowledgeBaseError,
    QueryImageError,
    entries_from_labels,
)
from raydar.labels import LabelStore, answered_row
from raydar.metrics import score
from raydar.rag import RagDetector
from raydar.kinds import kind_of
from raydar.teacher.client import TeacherClient, teacher_fingerprint
from tests.conftest import REPO, demo_spec, s3_server, start_teacher


def label_with_teacher(spec, folder, records, storage: StorageRoot, source: str | None = None) -> None:
    """Label `records` of `folder` as the label job does (TeacherClient over HTTP, LabelStore parts and
    snapshot), without starting Ray. `source`: the URI prefix the rows name the images by."""
    source = source or f"{folder}/"
    kind = kind_of(spec.task, spec.teacher.coordinates)
    fingerprint = teacher_fingerprint(spec.teacher, kind, spec.images.max_pixels)

    async def ask_all():
        client = TeacherClient(spec.teacher, kind)
        rows = []
        for record in records:
            data = (folder / record["file"]).read_bytes()
            prepared = prepare_image(data, spec.images.max_pixels, spec.images.max_image_pixels)
            rows.append((record, prepared, client.label(*_payload(spec, data, prepared))))
        answers = await asyncio.gather(*[r[2] for r in rows])
        await client.close()
        return [(record, prepared, answer) for (record, prepared, _), answer in zip(rows, answers)]

    out = []
    for record, prepared, answer in asyncio.run(ask_all()):
        assert answer.ok, answer.error
        out.append(answered_row(
            image_id=record["image_id"], source_uri=source + record["file"], width=prepared.width,
            height=prepared.height, split=spec.split.split_of(record["image_id"]), task="points",
            label=json.dumps(answer.label), teacher_model=spec.teacher.model, teacher_fingerprint=fingerprint,
            run_id="test", raw_answer=answer.raw, attempts=answer.attempts, latency_s=answer.latency_s,
        ))
    store = LabelStore(storage.child(spec.name, "labels"))
    store.append(out, f"test-{time.time_ns()}", 0)
    store.write_snapshot(fingerprint)


def _payload(spec, data, prepared):
    payload, media_type = teacher_payload(data, prepared, spec.teacher.image_format)
    return payload, *prepared.image.size, media_type


def summary(record: dict) -> tuple[int, str]:
    """(cell count, dominant kind) from the ground truth."""
    points = record["label"]["points"]
    n_explicit = sum(p["label"] == "explicit" for p in points)
    dominant = "none" if not points else "explicit" if 2 * n_explicit >= len(points) else "implicit"
    return len(points), dominant


def similar(a: dict, b: dict) -> bool:
    (na, da), (nb, db) = summary(a), summary(b)
    return da == db and abs(na - nb) <= 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """80 demo images, half of them held out (split.test=0.5), labelled by the simulated teacher and
    indexed into an embedded Chroma under a temporary storage root."""
    folder = make_demo_cells(tmp_path_factory.mktemp("kb") / "cells", n=80, size=96, seed=11)
    teacher = start_teacher(folder, latency_s=0)
    spec = demo_spec(folder, teacher.base_url, **{"split.test": 0.5, "split.val": 0.0})
    storage = StorageRoot(tmp_path_factory.mktemp("store"))
    records = read_ground_truth(folder)
    label_with_teacher(spec, folder, records, storage)
    result = index_labels(spec, storage)
    kb = KnowledgeBase.open(spec, storage)
    yield type("Built", (), dict(folder=folder, teacher=teacher, spec=spec, storage=storage, records=records,
                                 result=result, kb=kb))
    kb.close()
    teacher.stop()


# ---------------------------------------------------------------- building and searching


def test_build_makes_one_entry_per_labelled_image_with_its_metadata(built):
    result, kb, records = built.result, built.kb, built.records
    assert result.labelled == result.new == len(records) and result.changed == result.removed == 0
    assert kb.count() == len(records)
    assert [c.name for c in kb.client.list_collections()] == ["demo_cells"]  # text and image vectors in one
    stats = kb.stats()
    assert stats["collection"] == "demo_cells" and stats["entries"] == len(records)
    assert stats["text_embedder"] == {"embedder": "all-MiniLM-L6-v2", "embedder_version": "st-384d", "dim": 384}
    assert stats["image_embedder"]["embedder"] == "blob-colour-texture"
    assert set(stats["splits"]) == {"train", "test"}
    assert built.storage.exists("demo_cells", "kb", "snapshot.parquet")

    hit = kb.list(where={"n_objects": {"$gte": 2}}, limit=1)[0]
    meta = hit.metadata
    assert meta["image_id"] == hit.id and meta["source_uri"].endswith(meta["file"])
    assert meta["task"] == "points" and meta["teacher_model"] == "raydar-simulated-teacher"
    assert meta["n_objects"] == meta["n_explicit"] + meta["n_implicit"] == len(hit.label["points"])
    assert set(meta["type"]) == {p["label"] for p in hit.label["points"]}
    for name in meta["type"]:  # the document carries the ontology's words for what was found
        assert built.spec.task.ontology[name].description in hit.document


def test_image_search_returns_truly_similar_examples(built):
    """precision@5 against the ground truth, each image queried by its bytes with itself excluded."""
    kb, records = built.kb, built.records
    by_id = {r["image_id"]: r for r in records}
    precision, chance = [], []
    for record in records:
        hits = kb.search_image((built.folder / record["file"]).read_bytes(), n=5, exclude=[record["image_id"]])
        assert len(hits) == 5 and record["image_id"] not in {h.id for h in hits}
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)
        precision.append(np.mean([similar(record, by_id[h.id]) for h in hits]))
        chance.append(np.mean([similar(record, other) for other in records if other is not record]))
    p_at_5, base = float(np.mean(precision)), float(np.mean(chance))
    print(f"image search precision@5 = {p_at_5:.3f}, chance = {base:.3f}")
    assert p_at_5 >= 0.55 and p_at_5 >= 1.6 * base

    # a hit's distance is the cosine distance between the two images' embeddings
    query = kb.embed_image((built.folder / records[0]["file"]).read_bytes())
    hits = kb.search_image((built.folder / records[0]["file"]).read_bytes(), n=5)
    stored = kb.image_vectors([h.id for h in hits])
    cosines = [float(stored[h.id] @ query / np.linalg.norm(query)) for h in hits]
    assert [h.distance for h in hits] == pytest.approx([1 - c for c in cosines], abs=1e-4)


def test_text_search_finds_images_with_what_the_words_describe(built):
    kb = built.kb
    faint = kb.search_text("faint lilac cells fading into the tissue", n=5)
    dark = kb.search_text("dark granular cells with a nucleus", n=5)
    assert all("implicit" in h.metadata["type"] for h in faint)
    assert all("explicit" in h.metadata["type"] for h in dark)
    share = lambda hits: np.mean([h.metadata["n_implicit"] / h.metadata["n_objects"] for h in hits])
    everything = [h for h in kb.list(limit=None) if h.metadata["n_objects"]]
    print(f"implicit share: faint query {share(faint):.2f}, dark query {share(dark):.2f}, all {share(everything):.2f}")
    assert share(faint) >= 0.75 and share(dark) <= 0.25

    # a hit's distance is the cosine distance between the query's and the document's text embeddings
    query = text_embedder(built.spec.knowledge_base.embedder).embed(["faint lilac cells fading into the tissue"])[0]
    stored = kb.text_vectors([h.id for h in faint])
    cosines = [float(stored[h.id] @ query / np.linalg.norm(query)) for h in faint]
    assert [h.distance for h in faint] == pytest.approx([1 - c for c in cosines], abs=1e-4)


def test_metadata_filters(built):
    kb, records = built.kb, built.records
    with_implicit = [r for r in records if any(p["label"] == "implicit" for p in r["label"]["points"])]
    hits = kb.search_image((built.folder / records[0]["file"]).read_bytes(), n=5, where={"type": "implicit"})
    assert hits and all("implicit" in h.metadata["type"] for h in hits)
    tests = kb.search_text("cells", n=50, where={"split": "test"})
    assert tests and {h.metadata["split"] for h in tests} == {"test"}
    both = kb.list(where={"type": "implicit", "split": "train"}, limit=None)
    assert all("implicit" in h.metadata["type"] and h.metadata["split"] == "train" for h in both)
    crowded = kb.list(where={"n_objects": {"$gte": 6}}, limit=None)
    assert {h.id for h in crowded} == {h.id for h in kb.list(limit=None) if h.metadata["n_objects"] >= 6}
    # what the teacher saw, not the ground truth, decides: the counts agree with the stored labels
    assert len(kb.list(where={"type": "implicit"}, limit=None)) == sum(
        any(p["label"] == "implicit" for p in h.label["points"]) for h in kb.list(limit=None))
    assert abs(len(kb.list(where={"type": "implicit"}, limit=None)) - len(with_implicit)) <= 8


def test_incremental_index_adds_exactly_the_new_rows(built, tmp_path):
    spec, records = built.spec, built.records
    storage = StorageRoot(tmp_path / "store")
    label_with_teacher(spec, built.folder, records[:20], storage)
    first = index_labels(spec, storage)
    assert (first.new, first.unchanged) == (20, 0)

    label_with_teacher(spec, built.folder, records[20:30], storage)  # ten more images
    second = index_labels(spec, storage)
    assert (second.labelled, second.new, second.changed, second.unchanged, second.removed) == (30, 10, 0, 20, 0)
    with KnowledgeBase.open(spec, storage) as kb:
        assert kb.count() == 30
        ids = {h.id for h in kb.list(limit=None)}
        assert ids == {r["image_id"] for r in records[:30]}
        before = kb.image_vectors([records[0]["image_id"]])[records[0]["image_id"]]

    snapshot = storage.local_path(spec.name, "kb", "snapshot.parquet")
    stamp = snapshot.stat().st_mtime_ns
    third = index_labels(spec, storage)  # nothing new: nothing embedded, the snapshot left alone
    assert (third.new, third.changed, third.unchanged) == (0, 0, 30) and snapshot.stat().st_mtime_ns == stamp

    # one image relabelled (another teacher model): its text is re-embedded, its image vector kept
    relabelled = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"model": "teacher-b"})})
    label_with_teacher(relabelled, built.folder, records[:1] + records[1:30], storage)
    fourth = index_labels(relabelled, storage)
    assert (fourth.new, fourth.changed, fourth.unchanged) == (0, 30, 0)
    with KnowledgeBase.open(spec, storage) as kb:
        hit = kb.list(where={"image_id": records[0]["image_id"]})[0]
        assert hit.metadata["teacher_model"] == "teacher-b"
        assert np.allclose(kb.image_vectors([hit.id])[hit.id], before)


def test_read_only_replica_holds_every_entry_with_the_same_vectors(built, monkeypatch):
    monkeypatch.setattr(KnowledgeBase, "write_batch", 7)  # restored in many Chroma calls, as a large base is
    ids = [h.id for h in built.kb.list(limit=None)]
    with KnowledgeBase.open(built.spec, built.storage, read_only=True) as replica:
        assert replica.count() == len(ids) == len(built.records)
        for vectors in ("image_vectors", "text_vectors"):
            mine, theirs = getattr(built.kb, vectors)(ids), getattr(replica, vectors)(ids)
            assert all(mine[i].shape == theirs[i].shape and np.allclose(mine[i], theirs[i], atol=1e-6) for i in ids)
        assert {h.id: (h.document, h.metadata) for h in replica.list(limit=None)} == \
            {h.id: (h.document, h.metadata) for h in built.kb.list(limit=None)}


@pytest.mark.slow
def test_a_build_killed_half_way_is_completed_by_the_next_one(built, tmp_path, capsys):
    """`raydar kb build` in a subprocess, 8 entries a batch, is killed (SIGKILL) once it has written two
    batches. The third batch's first image is a FIFO no one writes to, so the build cannot get further
    (nor finish first): the kill always finds exactly two batches written. The next build embeds the rest."""
    spec, records, batch = built.spec, built.records[:40], 8
    images = tmp_path / "images"
    images.mkdir()
    for record in records:
        shutil.copy(built.folder / record["file"], images / record["file"])
    storage = StorageRoot(tmp_path / "store")
    label_with_teacher(spec, built.folder, records, storage, source=f"{images}/")
    order = [e.id for e in entries_from_labels(spec, LabelStore(storage.child(spec.name, "labels")).read_labels())]
    blocker = images / next(r["file"] for r in records if r["image_id"] == order[2 * batch])
    blocker.unlink()
    os.mkfifo(blocker)

    args = ["--spec", spec.source_file, "--storage", storage.uri, "--set", f"images.uri={images}",
            "--set", "images.generate=null", "--batch-size", str(batch), "--no-ray"]
    build = subprocess.Popen([sys.executable, "-m", "jobs.cli", "kb", "build", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        shown, deadline = b"", time.monotonic() + 180
        while b" 16/40 " not in shown.replace(b"\r", b" "):  # its progress bar, updated per batch written
            ready = select.select([build.stderr], [], [], max(0.0, deadline - time.monotonic()))[0]
            chunk = os.read(build.stderr.fileno(), 4096) if ready else b""
            assert chunk, f"the build ended or stalled before writing two batches: {shown.decode(errors='replace')}"
            shown += chunk
    finally:
        os.kill(build.pid, signal.SIGKILL)
        build.wait(timeout=30)
        build.stderr.close()
    assert build.returncode == -signal.SIGKILL
    with KnowledgeBase.open(spec, storage) as kb:  # strictly partial: the two batches, whole
        assert sorted(h.id for h in kb.list(limit=None)) == sorted(order[:2 * batch])

    blocker.unlink()
    shutil.copy(built.folder / blocker.name, blocker)
    assert raydar(["kb", "build", *args, "--quiet"]) == 0
    assert "40 labelled -> 24 new, 0 changed, 16 unchanged, 0 removed" in capsys.readouterr().out
    with KnowledgeBase.open(spec, storage) as kb:
        ids = [h.id for h in kb.list(limit=None)]
        assert kb.count() == len(ids) == len(set(ids)) == 40 and set(ids) == set(order)
        hit = kb.search_image(blocker.read_bytes(), n=1)[0]
        assert hit.id == order[2 * batch] and hit.distance < 1e-4
        assert kb.search_text("faint lilac cells", n=3)


# ---------------------------------------------------------------- bad input


def test_clear_errors_for_missing_and_empty_bases_mismatched_embedders_and_bad_images(built, tmp_path):
    spec = built.spec
    nowhere = StorageRoot(tmp_path / "empty")
    with KnowledgeBase.open(spec, nowhere) as kb:
        with pytest.raises(KnowledgeBaseError, match="no knowledge base for 'demo_cells'.*raydar kb build"):
            kb.search_text("cells")
    with pytest.raises(KnowledgeBaseError, match="no knowledge-base snapshot"):
        KnowledgeBase.open(spec, nowhere, read_only=True)

    storage = StorageRoot(tmp_path / "store")
    label_with_teacher(spec, built.folder, built.records[:3], storage)
    index_labels(spec, storage)
    with KnowledgeBase.open(spec, storage) as kb:
        kb.delete([h.id for h in kb.list(limit=None)])
        with pytest.raises(KnowledgeBaseError, match="is empty"):
            kb.search_image((built.folder / built.records[0]["file"]).read_bytes())

    with pytest.raises(QueryImageError, match="query image cannot be used: not_an_image"):
        built.kb.search_image(b"this is not an image")
    with pytest.raises(QueryImageError, match="truncated"):
        built.kb.search_image((built.folder / built.records[0]["file"]).read_bytes()[:400])

    other = spec.model_copy(update={"knowledge_base": spec.knowledge_base.model_copy(
        update={"image_embedder": "tests.test_rag:GreyHistogram"})})
    with KnowledgeBase.open(other, built.storage) as kb:
        with pytest.raises(KnowledgeBaseError, match="embedder mismatch.*built with blob-colour-texture.*"
                                                     "this query uses grey-histogram.*--rebuild"):
            kb.search_image((built.folder / built.records[0]["file"]).read_bytes())
    with pytest.raises(KnowledgeBaseError, match="embedder mismatch.*--rebuild"):  # a build notices it too
        index_labels(other, storage)
    rebuilt = index_labels(other, storage, rebuild=True)
    assert rebuilt.new == 3
    with KnowledgeBase.open(other, storage) as kb:
        assert kb.stats()["image_embedder"]["embedder"] == "grey-histogram"
    with KnowledgeBase.open(spec, built.storage, read_only=True) as replica:
        with pytest.raises(KnowledgeBaseError, match="read-only"):
            replica.delete([built.records[0]["image_id"]])


def test_a_knowledge_base_in_the_old_two_collection_layout_must_be_rebuilt(built, tmp_path):
    spec = built.spec
    storage = StorageRoot(tmp_path / "store")
    label_with_teacher(spec, built.folder, built.records[:3], storage)
    with KnowledgeBase.open(spec, storage) as kb:  # as an older raydar left it
        for side in ("text", "image"):
            kb.client.create_collection(f"demo_cells.{side}", embedding_function=None).add(
                ids=["x"], embeddings=[[1.0, 0.0]])
        with pytest.raises(KnowledgeBaseError, match=r"old layout of two collections \(demo_cells.text, "
                                                     r"demo_cells.image\).*kb build --spec .* --rebuild"):
            kb.search_text("cells")
    with pytest.raises(KnowledgeBaseError, match="old layout.*--rebuild"):
        index_labels(spec, storage)
    assert index_labels(spec, storage, rebuild=True).new == 3
    with KnowledgeBase.open(spec, storage) as kb:
        assert [c.name for c in kb.client.list_collections()] == ["demo_cells"] and kb.count() == 3


# ---------------------------------------------------------------- the command


def test_kb_command_builds_searches_lists_and_reports(built, capsys):
    spec_args = ["--spec", built.spec.source_file, "--storage", built.storage.uri,
                 "--set", f"images.uri={built.folder}", "--set", "images.generate=null",
                 "--set", "split.test=0.5", "--set", "split.val=0.0"]
    assert raydar(["kb", "build", *spec_args, "--quiet"]) == 0
    assert "80 labelled -> 0 new, 0 changed, 80 unchanged, 0 removed" in capsys.readouterr().out

    assert raydar(["kb", "search", "faint lilac cell", *spec_args, "--n", "3", "--where", "split=train"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["#", "distance", "image", "split", "file", "found"] and len(lines) == 4
    assert all(" train " in line and "implicit" in line for line in lines[1:])

    query = built.folder / built.records[5]["file"]
    assert raydar(["kb", "search", "--image", str(query), *spec_args, "--n", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hits"][0]["id"] == built.records[5]["image_id"] and out["hits"][0]["distance"] < 1e-4
    assert "points" in out["hits"][1]["label"] and out["hits"][1]["metadata"]["file"].startswith("cells_")

    assert raydar(["kb", "list", *spec_args, "--where", "n_objects>=8", "--limit", "100"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows and len(rows) == len(built.kb.list(where={"n_objects": {"$gte": 8}}, limit=None))

    assert raydar(["kb", "stats", *spec_args]) == 0
    stats = capsys.readouterr().out
    assert "entries         80" in stats and "blob-colour-texture" in stats

    bad = built.folder.parent / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert raydar(["kb", "search", "--image", str(bad), *spec_args]) == 1
    assert "error: query image cannot be used: corrupt" in capsys.readouterr().err
    assert raydar(["kb", "search", *spec_args]) == 1
    assert "give a text query or --image" in capsys.readouterr().err


# ---------------------------------------------------------------- where it lives


def test_chroma_server_mode(built, tmp_path):
    """`chroma run` from the installed chromadb on 127.0.0.1, through the HTTP client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chroma = os.path.join(os.path.dirname(sys.executable), "chroma")
    server = subprocess.Popen([chroma, "run", "--path", str(tmp_path / "chroma"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        spec = built.spec.model_copy(update={"knowledge_base": built.spec.knowledge_base.model_copy(
            update={"server": f"http://127.0.0.1:{port}"})})
        storage = StorageRoot(tmp_path / "store")
        label_with_teacher(spec, built.folder, built.records[:12], storage)
        deadline = time.monotonic() + 30
        while True:
            try:
                result = index_labels(spec, storage)
                break
            except KnowledgeBaseError as e:
                if "cannot reach Chroma" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert result.new == 12 and result.location == f"http://127.0.0.1:{port}"
        with KnowledgeBase.open(spec, storage) as kb:
            record = built.records[3]
            assert kb.search_image((built.folder / record["file"]).read_bytes(), n=1)[0].id == record["image_id"]
            assert kb.count() == 12
    finally:
        server.terminate()
        server.wait(timeout=10)
    down = built.spec.model_copy(update={"knowledge_base": built.spec.knowledge_base.model_copy(
        update={"server": f"http://127.0.0.1:{port}"})})
    with pytest.raises(KnowledgeBaseError, match=f"cannot reach Chroma at http://127.0.0.1:{port}"):
        KnowledgeBase.open(down, storage)


def test_snapshot_in_a_bucket_serves_a_read_only_replica(built, tmp_path):
    """Images, labels, the knowledge base and its snapshot in S3 (moto on 127.0.0.1): the build works on a
    local copy and writes the snapshot back; a replica loads it read-only and reads example images from
    the bucket."""
    import pyarrow.fs as pafs

    from raydar.kb import SourceImages

    with s3_server() as options:
        fs, _ = pafs.FileSystem.from_uri(f"s3://raydar-kb?{options}&allow_bucket_creation=true")
        fs.create_dir("raydar-kb")
        records = built.records[:10]
        for record in records:
            with fs.open_output_stream(f"raydar-kb/images/{record['file']}") as f:
                f.write((built.folder / record["file"]).read_bytes())
        spec = built.spec.model_copy(update={"images": built.spec.images.model_copy(
            update={"uri": f"s3://raydar-kb/images?{options}"})})
        storage = StorageRoot(f"s3://raydar-kb/store?{options}")
        label_with_teacher(spec, built.folder, records, storage, source="s3://raydar-kb/images/")  # as the label job names them

        result = index_labels(spec, storage)
        assert result.new == 10 and result.snapshot == "s3://raydar-kb/store/demo_cells/kb/snapshot.parquet"
        assert fs.get_file_info("raydar-kb/store/demo_cells/kb/snapshot.parquet").size > 0
        again = index_labels(spec, storage)  # the next build starts from the snapshot in the bucket
        assert (again.new, again.unchanged) == (0, 10)

        with KnowledgeBase.open(spec, storage, read_only=True) as replica:
            assert replica.count() == 10 and replica.read_only
            hit = replica.search_image((built.folder / records[4]["file"]).read_bytes(), n=1)[0]
            assert hit.id == records[4]["image_id"] and hit.metadata["source_uri"].startswith("s3://raydar-kb/images/")
            assert SourceImages(spec, storage).read(hit.metadata["source_uri"]) == \
                (built.folder / records[4]["file"]).read_bytes()


# ---------------------------------------------------------------- the RAG detector


def test_rag_prompt_reaching_the_endpoint_carries_the_retrieved_examples(built):
    spec, teacher = built.spec, built.teacher
    by_id = {r["image_id"]: r for r in built.records}
    query = next(r for r in built.records if spec.split.split_of(r["image_id"]) == "test")

    async def run():
        rag = RagDetector.from_spec(spec, built.storage, base_url=teacher.base_url, k=3, where={"split": "train"})
        try:
            return await rag.detect((built.folder / query["file"]).read_bytes())
        finally:
            await rag.close()

    teacher.reset_log()
    result = asyncio.run(run())
    assert len(result["examples"]) == 3 and query["image_id"] not in result["examples"]
    assert all(spec.split.split_of(i) == "train" for i in result["examples"])
    assert "points" in result["label"] and json.loads(result["raw"])["points"] is not None
    (entry,) = teacher.log
    assert entry.n_images == 4 and entry.image == query["file"]  # the question is about the last image
    assert entry.examples == [by_id[i]["file"] for i in result["examples"]]  # the teacher recognised each one
    kind = kind_of(spec.task, spec.teacher.coordinates)
    for i in result["examples"]:  # each example's label went along as the answer to its image
        hit = built.kb.list(where={"image_id": i})[0]
        assert kind.answer_text(hit.label, hit.metadata["width"], hit.metadata["height"]) in entry.prompt
    assert entry.credit  # ...and the teacher could check them against what it knows
    for description in (c.description for c in spec.task.ontology.values()):
        assert description in entry.prompt
    assert "Example 3 of 3" in entry.prompt


def test_rag_beats_zero_shot_on_held_out_images(built):
    """The simulated teacher overlooks faint (implicit) cells zero-shot; shown retrieved, labelled train
    examples it overlooks fewer (the rule is in raydar/teacher/simulated.py). Measured on the test split."""
    sim = start_teacher(built.folder, latency_s=0, zero_shot_miss={"implicit": 0.4},
                        zero_shot_flip={"implicit": 0.1})
    spec = built.spec
    held_out = [r for r in built.records if spec.split.split_of(r["image_id"]) == "test"]

    async def run(k: int) -> list[dict]:
        rag = RagDetector.from_spec(spec, built.storage, base_url=sim.base_url, k=k, where={"split": "train"})
        try:
            return [(await rag.detect((built.folder / r["file"]).read_bytes()))["label"] for r in held_out]
        finally:
            await rag.close()

    try:
        zero, rag = asyncio.run(run(0)), asyncio.run(run(3))
    finally:
        sim.stop()
    truths = [r["label"] for r in held_out]
    zero_m, rag_m = score(spec.task, zero, truths), score(spec.task, rag, truths)
    print(f"{len(held_out)} held-out images: F1 zero-shot {zero_m['overall']['f1']:.3f}, RAG (k=3) "
          f"{rag_m['overall']['f1']:.3f}; implicit recall {zero_m['per_class']['implicit']['recall']:.3f} -> "
          f"{rag_m['per_class']['implicit']['recall']:.3f}")
    assert len(held_out) >= 30
    assert rag_m["per_class"]["implicit"]["recall"] >= zero_m["per_class"]["implicit"]["recall"] + 0.15
    assert rag_m["overall"]["f1"] >= zero_m["overall"]["f1"] + 0.05


# ---------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_embedding_on_ray_data_gives_the_same_vectors_as_in_process(built, tmp_path):
    import ray

    from cluster import connect

    spec = built.spec
    here, there = StorageRoot(tmp_path / "here"), StorageRoot(tmp_path / "there")
    for storage in (here, there):
        label_with_teacher(spec, built.folder, built.records[:16], storage)
    connect(num_cpus=2)
    try:
        on_ray = index_labels(spec, there, use_ray=True)
    finally:
        ray.shutdown()
    in_process = index_labels(spec, here, use_ray=False)
    assert on_ray.on_ray and not in_process.on_ray and on_ray.new == in_process.new == 16
    with KnowledgeBase.open(spec, here) as a, KnowledgeBase.open(spec, there) as b:
        ids = [h.id for h in a.list(limit=None)]
        for vectors in ("image_vectors", "text_vectors"):
            va, vb = getattr(a, vectors)(ids), getattr(b, vectors)(ids)
            assert len(va) == 16 and all(np.allclose(va[i], vb[i], atol=1e-5) for i in ids)
        record = built.records[7]
        assert b.search_image((built.folder / record["file"]).read_bytes(), n=1)[0].id == record["image_id"]
