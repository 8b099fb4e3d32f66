"""The label job on a real local Ray against a real simulated teacher over HTTP, writing real Parquet.

Every cache, resume and re-label behaviour is counted on the teacher's own request log.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib

import pyarrow.parquet as pq
import pytest
import ray

from cluster import StorageRoot, connect
from jobs.label import block_rows, label_images
from raydar.labels import LabelStore
from raydar.teacher.simulated import Fault
from tests.conftest import REPO, demo_spec, ground_truth_files, start_teacher


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    connect(num_cpus=2)
    yield
    ray.shutdown()


def store_of(storage: StorageRoot, spec) -> LabelStore:
    return LabelStore(storage.child(spec.name, "labels"))


def test_labels_every_image_and_writes_rows_and_manifest(tmp_path, image_folder, teacher):
    spec = demo_spec(image_folder, teacher.base_url)
    storage = StorageRoot(tmp_path / "store")
    result = label_images(spec, storage, progress=False)

    files = ground_truth_files(image_folder)
    assert result.images == len(files) == result.ok_new
    assert sorted(e.image for e in teacher.log) == sorted(files)  # one request per image, each recognised
    prompt = teacher.log[0].prompt
    assert "explicit" in prompt and "implicit" in prompt and "fractions of the image" in prompt

    table = pq.read_table(storage.local_path(spec.name, "labels", "labels.parquet"))
    assert table.num_rows == len(files)
    row = table.to_pylist()[0]
    assert len(row["image_id"]) == 64 and row["status"] == "ok" and row["attempts"] == 1
    assert row["split"] in ("train", "val", "test") and row["teacher_fingerprint"] == result.fingerprint
    assert row["source_uri"].startswith(str(image_folder))
    label = json.loads(row["label"])
    assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in label["points"])

    manifest = store_of(storage, spec).manifest()
    assert manifest["counts"]["ok"] == len(files) and manifest["counts"]["teacher_requests"] == len(files)
    assert manifest["teacher"]["fingerprint"] == result.fingerprint


def test_second_run_makes_no_teacher_calls(tmp_path, image_folder, teacher):
    spec = demo_spec(image_folder, teacher.base_url)
    storage = StorageRoot(tmp_path / "store")
    label_images(spec, storage, progress=False)
    teacher.reset_log()

    again = label_images(spec, storage, progress=False)
    assert teacher.log == []
    assert again.cached == again.images and again.ok_new == 0 and again.requests == 0


def test_adding_ten_images_makes_exactly_ten_calls(tmp_path, image_folder, teacher):
    new_folder = tmp_path / "new"
    new_folder.mkdir()
    files = ground_truth_files(image_folder)
    for name in files[-10:]:  # set ten aside, label the rest, then bring them back
        shutil.move(image_folder / name, new_folder / name)
    spec = demo_spec(image_folder, teacher.base_url)
    storage = StorageRoot(tmp_path / "store")
    first = label_images(spec, storage, progress=False)
    assert first.ok_new == len(files) - 10
    teacher.reset_log()

    for name in files[-10:]:
        shutil.move(new_folder / name, image_folder / name)
    second = label_images(spec, storage, progress=False)
    assert sorted(e.image for e in teacher.log) == sorted(files[-10:])
    assert second.ok_new == 10 and second.cached == len(files) - 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "change", [{"teacher.model": "another-teacher"}, {"task.prompt": "Point at every cell. JSON only."}]
)
def test_changing_model_or_prompt_labels_everything_again(tmp_path, image_folder, teacher, change):
    storage = StorageRoot(tmp_path / "store")
    before = label_images(demo_spec(image_folder, teacher.base_url), storage, progress=False)
    teacher.reset_log()

    after = label_images(demo_spec(image_folder, teacher.base_url, **change), storage, progress=False)
    assert len(teacher.log) == before.images and after.ok_new == before.images
    assert after.fingerprint != before.fingerprint
    if "teacher.model" in change:
        assert {e.model for e in teacher.log} == {"another-teacher"}
    else:
        assert {e.prompt for e in teacher.log} == {"Point at every cell. JSON only."}


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "attempts"),
    [
        (Fault("rate_limit", per_image=1, retry_after_s=0.4), 2),
        (Fault("server_error", per_image=2), 3),
        (Fault("hang", per_image=1), 2),
        (Fault("malformed_json", per_image=1), 2),
        (Fault("prose", per_image=1), 1),
    ],
    ids=lambda v: v.kind if isinstance(v, Fault) else str(v),
)
def test_every_injected_fault_is_survived(tmp_path, image_folder, fault, attempts):
    with start_teacher(image_folder, faults=[fault]) as sim:
        spec = demo_spec(image_folder, sim.base_url, **{"teacher.timeout_s": 1.0})
        storage = StorageRoot(tmp_path / "store")
        result = label_images(spec, storage, limit=6, progress=False)

    assert result.ok_new == 6 and result.failed == 0
    rows = store_of(storage, spec).read_labels().to_pylist()
    assert [r["attempts"] for r in rows] == [attempts] * 6
    assert result.requests == 6 * attempts == len(sim.log)
    assert sum(e.fault == fault.kind for e in sim.log) == 6 * fault.per_image
    if fault.kind == "rate_limit":  # Retry-After was honoured: the retry came after the wait it asked for
        for image in {e.image for e in sim.log}:
            first, second = sorted(sim.requests_for(image), key=lambda e: e.time)
            assert second.time - first.time >= 0.4 - 0.05


@pytest.mark.slow
def test_teacher_that_keeps_failing_gives_failed_rows_retried_on_later_runs_then_given_up(tmp_path, image_folder):
    with start_teacher(image_folder, faults=[Fault("server_error", per_image=100)]) as sim:
        spec = demo_spec(image_folder, sim.base_url, **{"teacher.retries": 1, "teacher.max_failed_runs": 2})
        storage = StorageRoot(tmp_path / "store")
        first = label_images(spec, storage, limit=4, progress=False)
        assert first.failed == 4 and first.ok_total == 0 and first.failures == {"teacher error 500": 4}
        rows = store_of(storage, spec).read_labels(status="failed").to_pylist()
        assert len(rows) == 4 and all(r["attempts"] == 2 and "500" in r["error"] for r in rows)

        second = label_images(spec, storage, limit=4, progress=False)  # retried: 2 more attempts each
        assert second.failed == 4 and len(sim.log) == 16
        third = label_images(spec, storage, limit=4, progress=False)  # failed twice: given up, not asked
        assert third.gave_up == 4 and len(sim.log) == 16


def test_unknown_model_is_not_retried_and_says_so(tmp_path, image_folder):
    from raydar.spec import SimulatedTeacherSettings
    from raydar.teacher.simulated import SimulatedTeacher

    with SimulatedTeacher(image_folder, SimulatedTeacherSettings(latency_s=0), known_models=["gpt-x"]) as sim:
        spec = demo_spec(image_folder, sim.base_url, **{"teacher.model": "gpt-typo"})
        result = label_images(spec, StorageRoot(tmp_path / "store"), limit=3, progress=False)
    assert result.failed == 3 and len(sim.log) == 3
    assert list(result.failures) == ["teacher refused the request (404)"]


def test_an_unreachable_teacher_is_one_failure_reason_without_its_address(tmp_path, image_folder):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = demo_spec(image_folder, f"http://127.0.0.1:{port}/v1", **{"teacher.retries": 0})
    result = label_images(spec, StorageRoot(tmp_path / "store"), limit=3, progress=False)
    assert result.failed == 3 and result.failures == {"cannot reach the teacher": 3}


@pytest.mark.slow
def test_concurrency_cap_and_one_rate_for_the_whole_job(tmp_path, image_folder):
    with start_teacher(image_folder, latency_s=0.05) as sim:
        capped = demo_spec(image_folder, sim.base_url, **{"teacher.concurrency": 3, "teacher.actors": 1})
        label_images(capped, StorageRoot(tmp_path / "a"), progress=False)
        assert 1 <= sim.peak_concurrency <= 3

        sim.reset_log()
        rated = demo_spec(image_folder, sim.base_url, **{"teacher.rate_per_s": 20.0, "teacher.actors": 2,
                                                         "teacher.concurrency": 16})
        label_images(rated, StorageRoot(tmp_path / "b"), progress=False)
    times = sorted(e.time for e in sim.log)
    assert len(times) == 40
    assert times[-1] - times[0] >= 39 / 20.0 * 0.9  # 40 requests at 20/s across both actors
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 22


def test_blocks_hold_four_rounds_of_an_actors_requests_and_give_every_actor_two_of_a_small_job():
    assert block_rows(concurrency=32, images=2000, actors=2) == 128  # four rounds of 32
    assert block_rows(concurrency=1, images=2000, actors=1) == 4
    assert block_rows(concurrency=200, images=100_000, actors=8) == 256  # at most 256 rows held per block
    assert block_rows(concurrency=32, images=40, actors=2) == 10  # 4 blocks: two per actor
    assert block_rows(concurrency=8, images=1, actors=4) == 1


# ---------------------------------------------------------------- bad images


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 100, 150)).save(buf, format="PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A real small PNG whose header claims another size (a decompression bomb's header)."""
    data = bytearray(_png(8, 8))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of data
    ihdr[4:8], ihdr[8:12] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[12:29] = ihdr
    data[29:33] = zlib.crc32(bytes(ihdr)).to_bytes(4, "big")
    return bytes(data)


def test_bad_images_become_failed_rows_with_reasons_and_never_reach_the_teacher(tmp_path, image_folder, teacher):
    good = _png(64, 64)
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "notes.png").write_bytes(b"these are my lab notes, not an image\n")
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (image_folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (image_folder / "bomb.png").write_bytes(_png_declaring(40_000, 40_000))
    spec = demo_spec(image_folder, teacher.base_url)
    storage = StorageRoot(tmp_path / "store")
    result = label_images(spec, storage, progress=False)

    n_good = len(ground_truth_files(image_folder))
    assert result.ok_new == n_good and result.failed == 5
    assert len(teacher.log) == n_good
    failed = {r["source_uri"].rsplit("/", 1)[1]: r["error"]
              for r in store_of(storage, spec).read_labels(status="failed").to_pylist()}
    assert failed["empty.png"].startswith("not_an_image")
    assert failed["notes.png"].startswith("not_an_image")
    assert failed["corrupt.png"].startswith("corrupt")
    assert failed["truncated.png"].startswith("truncated")
    assert failed["bomb.png"].startswith("too_large") and "max_image_pixels" in failed["bomb.png"]


def test_a_file_gone_since_it_was_listed_is_a_failed_image_not_a_failed_job(tmp_path, image_folder, teacher,
                                                                            monkeypatch):
    import jobs.label

    listed = jobs.label.list_files

    def list_one_more(*args):  # as if a file was deleted between the listing and its reading
        fs, paths, prefix = listed(*args)
        return fs, [*paths, str(image_folder / "deleted_meanwhile.png")], prefix

    monkeypatch.setattr(jobs.label, "list_files", list_one_more)
    spec = demo_spec(image_folder, teacher.base_url)
    storage = StorageRoot(tmp_path / "store")
    result = label_images(spec, storage, progress=False)

    n_good = len(ground_truth_files(image_folder))
    assert result.images == n_good + 1 and result.ok_new == n_good and result.failed == 1
    assert result.failures == {"cannot read the file, gone since the listing": 1}
    assert len(teacher.log) == n_good
    log = store_of(storage, spec).read_log()
    assert log.num_rows == n_good and "" not in log["image_id"].to_pylist()  # nothing to key it by: not logged


def test_empty_folder_is_a_clear_error(tmp_path, teacher):
    empty = tmp_path / "nothing"
    empty.mkdir()
    spec = demo_spec(empty, teacher.base_url)
    with pytest.raises(FileNotFoundError, match="no images"):
        label_images(spec, StorageRoot(tmp_path / "store"), progress=False)


# ---------------------------------------------------------------- crash and resume


@pytest.mark.slow
def test_job_killed_half_way_loses_no_stored_label_and_asks_only_for_the_rest(tmp_path, image_folder):
    with start_teacher(image_folder, latency_s=0.3) as sim:  # 40 images one at a time: about 12 s
        storage = StorageRoot(tmp_path / "store")
        cmd = [
            sys.executable, "-m", "jobs.label", "--spec", "datasets/demo_cells.yaml", "--quiet",
            "--storage", storage.uri,
            "--set", f"images.uri={image_folder}", "--set", "images.generate=null",
            "--set", f"teacher.base_url={sim.base_url}", "--set", "teacher.concurrency=1",
            "--set", "teacher.actors=1",
        ]
        env = {**os.environ, "RAY_ADDRESS": ""}
        job = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spec = demo_spec(image_folder, sim.base_url, **{"teacher.concurrency": 1, "teacher.actors": 1})
        store = store_of(storage, spec)
        deadline = time.monotonic() + 120
        try:
            while not store.root.list("label_log", suffix=".parquet"):
                assert job.poll() is None, "the label job ended before it was killed"
                assert time.monotonic() < deadline, "the label job wrote nothing in 120 s"
                time.sleep(0.2)
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

        stored_after_kill = {r["image_id"] for r in store.read_log().to_pylist() if r["status"] == "ok"}
        all_files = ground_truth_files(image_folder)
        assert 0 < len(stored_after_kill) < len(all_files)
        sim.reset_log()

        result = label_images(spec.model_copy(update={"teacher": spec.teacher.model_copy(
            update={"concurrency": 8, "actors": 2})}), storage, progress=False)
    asked = {e.image for e in sim.log}
    truth = {json.loads(line)["file"]: json.loads(line)["image_id"] for line in (image_folder / "ground_truth.jsonl").open()}
    assert asked == {f for f, i in truth.items() if i not in stored_after_kill}
    assert result.cached == len(stored_after_kill) and result.ok_total == len(all_files)
    final = {r["image_id"] for r in store.read_labels().to_pylist()}
    assert final == set(truth.values()) and stored_after_kill <= final


@pytest.mark.slow
def test_a_job_killed_half_way_loses_only_its_last_seconds_of_answers(tmp_path):
    """400 images, 2 actors x 4 requests in flight, 1 s per answer: SIGKILLed after about 200 answers, the
    re-run asks again only about images answered in the last seconds before the kill (each answer is in
    the log within `flush_s` = 2 s of arriving), never a block's worth."""
    from raydar.demo import make_demo_cells

    folder = make_demo_cells(tmp_path / "images", n=400, size=64, seed=11)
    latency = 1.0
    with start_teacher(folder, latency_s=latency) as sim:
        storage = StorageRoot(tmp_path / "store")
        overrides = {"teacher.concurrency": 4, "teacher.actors": 2}
        cmd = [sys.executable, "-m", "jobs.label", "--spec", "datasets/demo_cells.yaml", "--quiet",
               "--storage", storage.uri, "--set", f"images.uri={folder}", "--set", "images.generate=null",
               "--set", f"teacher.base_url={sim.base_url}",
               *[arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]]
        job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        try:
            while sum(e.time + latency <= time.time() for e in sim.log) < 200:
                assert job.poll() is None, "the label job ended before it was killed"
                assert time.monotonic() < deadline, "the label job did not get 200 answers in 240 s"
                time.sleep(0.05)
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            killed_at = time.time()
            job.wait()
        answered = {e.image: e.time + latency for e in sim.log if e.time + latency <= killed_at}
        in_flight = sum(e.time + latency > killed_at for e in sim.log)
        sim.reset_log()
        spec = demo_spec(folder, sim.base_url, **overrides)
        result = label_images(spec, storage, progress=False)
    asked_again = {e.image for e in sim.log} & set(answered)
    late = {image: round(killed_at - at, 2) for image, at in answered.items() if image in asked_again}
    # An answer in the log within 2 s of arriving (plus the time a part takes to write, and the kill's own).
    assert all(age <= 2.5 for age in late.values()), late
    assert len(asked_again) <= 2.5 * 8, (len(asked_again), in_flight)  # 2 actors x 4 in flight: 8 answers a second
    assert len(answered) >= 190 and result.ok_total == 400


class _ThrottledFilesystemSimulator:
    """Stands in for an object store that throttles (S3's SLOW_DOWN, which moto does not produce): the
    first `fail` opens of each file raise `error`, then the real local file is read."""

    def __init__(self, error: OSError, fail: int) -> None:
        import pyarrow.fs as pafs

        self.local, self.error, self.fail, self.opens = pafs.LocalFileSystem(), error, fail, 0

    def open_input_stream(self, path: str):
        self.opens += 1
        if self.opens <= self.fail:
            raise self.error
        return self.local.open_input_stream(path)


def test_an_actor_retries_a_throttled_read_and_fails_loudly_on_any_other_error(image_folder):
    from jobs.label import LabelImages

    path = str(image_folder / ground_truth_files(image_folder)[0])
    actor = LabelImages.__new__(LabelImages)  # only its reading, without Ray
    actor.fs = _ThrottledFilesystemSimulator(OSError("AWS Error SLOW_DOWN during GetObject operation"), fail=2)
    assert actor._read(path) == open(path, "rb").read() and actor.fs.opens == 3

    actor.fs = _ThrottledFilesystemSimulator(PermissionError("AWS Error ACCESS_DENIED: no credentials"), fail=1)
    with pytest.raises(PermissionError, match="ACCESS_DENIED"):  # every read would fail: not a failed row each
        actor._read(path)
    assert actor.fs.opens == 1

    actor.fs = _ThrottledFilesystemSimulator(OSError("AWS Error SLOW_DOWN"), fail=10)
    with pytest.raises(OSError, match="SLOW_DOWN"):
        actor._read(path, attempts=2)
