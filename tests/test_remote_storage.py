"""Images and the storage root on S3: a real S3-compatible server (moto) on 127.0.0.1, reached only
through pyarrow filesystem URIs, as a user's bucket would be. Label, then fine-tune from the labels in
the bucket into a checkpoint in the bucket, then serve that checkpoint with the feedback log in the bucket."""

from __future__ import annotations

import shutil
import socket
import time
from types import SimpleNamespace

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from cluster import StorageRoot, connect
from jobs.finetune import finetune
from jobs.label import label_images
from raydar.labels import LabelStore
from tests.conftest import TEST_STUDENT, demo_spec, ground_truth_files, s3_server, start_teacher

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3; Ray started inside it, so the read tasks on Ray's workers find the credentials."""
    with s3_server() as options:
        connect(num_cpus=2)
        yield options
        ray.shutdown()


@pytest.fixture(scope="module")
def labelled_bucket(s3_endpoint, demo_folder, tmp_path_factory):
    """The demo images uploaded to a bucket and labelled once into a storage root in the same bucket."""
    fs, _ = pafs.FileSystem.from_uri(f"s3://raydar?{s3_endpoint}&allow_bucket_creation=true")
    fs.create_dir("raydar")
    folder = tmp_path_factory.mktemp("s3") / "images"
    shutil.copytree(demo_folder, folder)
    for path in sorted(folder.iterdir()):
        with fs.open_output_stream(f"raydar/images/{path.name}") as f:
            f.write(path.read_bytes())
    teacher = start_teacher(folder)
    spec = demo_spec(folder, teacher.base_url, **{"images.uri": f"s3://raydar/images?{s3_endpoint}"})
    storage = StorageRoot(f"s3://raydar/store?{s3_endpoint}")
    first = label_images(spec, storage, progress=False)
    overrides = {"images.uri": f"s3://raydar/images?{s3_endpoint}", "images.generate": None,
                 "teacher.base_url": teacher.base_url, **TEST_STUDENT}
    yield SimpleNamespace(fs=fs, spec=spec, storage=storage, first=first, teacher=teacher,
                          files=ground_truth_files(folder), folder=folder, overrides=overrides)
    teacher.stop()


def test_label_images_from_a_bucket_into_a_bucket(labelled_bucket):
    fs, first, files, teacher = (labelled_bucket.fs, labelled_bucket.first, labelled_bucket.files,
                                 labelled_bucket.teacher)
    assert first.ok_new == len(files) == len(teacher.log)
    assert first.output == "s3://raydar/store/demo_cells/labels/labels.parquet"  # no options in what is shown
    with fs.open_input_file("raydar/store/demo_cells/labels/labels.parquet") as f:
        table = pq.read_table(f)
    assert table.num_rows == len(files)
    assert all(uri.startswith("s3://raydar/images/cells_") for uri in table["source_uri"].to_pylist())
    assert fs.get_file_info("raydar/store/demo_cells/labels/manifest.json").type == pafs.FileType.File

    teacher.reset_log()  # the cache lives in the bucket too
    again = label_images(labelled_bucket.spec, labelled_bucket.storage, progress=False)
    assert teacher.log == [] and again.cached == len(files)
    labels = LabelStore(labelled_bucket.storage.child("demo_cells", "labels")).read_labels()
    assert labels.num_rows == len(files)


def test_finetune_reads_labels_from_the_bucket_and_writes_the_checkpoint_there(labelled_bucket):
    """Images, labels and the Ray Train run (checkpoints, adapter) all in the bucket; nothing on local disk."""
    result = finetune(labelled_bucket.spec, labelled_bucket.storage, run_name="in-the-bucket", max_steps=2,
                      report_every=1)
    assert result.metrics["step"] == 2
    # A URI another process can open: the scheme and the endpoint option (no credentials) included.
    assert result.checkpoint.startswith("s3://raydar/store/demo_cells/train/in-the-bucket/"), result.checkpoint
    assert result.checkpoint.endswith("?" + labelled_bucket.storage.uri.split("?", 1)[1])
    path = result.checkpoint.removeprefix("s3://").split("?", 1)[0]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "spec.json", "metrics.json"):
        info = labelled_bucket.fs.get_file_info(f"{path}/{name}")
        assert info.type == pafs.FileType.File and info.size > 0, name
    labelled_bucket.checkpoint = result.checkpoint


def test_the_endpoint_serves_the_checkpoint_from_the_bucket_and_logs_feedback_there(labelled_bucket, tmp_path):
    """label -> finetune -> serve, all against the bucket: the replica copies the adapter from S3, and the
    request log (feedback) is written back to it."""
    import httpx
    from ray import serve

    from serving.app import build_app

    checkpoint = getattr(labelled_bucket, "checkpoint", None)
    if checkpoint is None:  # run alone: make the checkpoint first
        checkpoint = finetune(labelled_bucket.spec, labelled_bucket.storage, run_name="for-serving", max_steps=1,
                              report_every=1).checkpoint
    from jobs.index import index_labels

    index_labels(labelled_bucket.spec, labelled_bucket.storage)  # the RAG member's knowledge base, in the bucket
    token = tmp_path / "token"
    token.write_text("s3-serving-token\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({
            "spec": str(labelled_bucket.spec.source_file), "set": labelled_bucket.overrides,
            "storage": labelled_bucket.storage.uri, "members": ["finetuned", "rag"], "adapters": {"v1": checkpoint},
            "token_env": "RAYDAR_TEST_UNSET_TOKEN", "token_file": str(token), "max_new_tokens": 16,
            "feedback": {"flush_s": 0.2}, "finetuned": {"num_cpus": 0.5}, "ingress": {"num_cpus": 0.5},
            "rag": {"num_cpus": 0.5},
        }), name="s3", route_prefix="/")
        image = (labelled_bucket.folder / labelled_bucket.files[0]).read_bytes()
        response = httpx.post(f"http://127.0.0.1:{port}/v1/detect", files={"image": ("cells.png", image, "image/png")},
                              headers={"Authorization": "Bearer s3-serving-token"}, timeout=120)
        assert response.status_code == 200, response.text
        answer = response.json()
        # The student ran with the adapter and the point head copied from the bucket (the demo's student
        # answers with its head: a label, no text)...
        member = answer["members"]["finetuned"]
        assert member["adapter_version"].startswith("sha256:") and member["status"] == "ok", member
        assert member["label"] is not None and member["raw"] == "", member
        # ...and the RAG member answered from the knowledge base in the bucket.
        assert answer["members"]["rag"]["status"] == "ok" and answer["members"]["rag"]["examples"], answer
        assert "points" in answer["fused"]
        deadline = time.time() + 30
        while time.time() < deadline:  # the feedback log's part lands in the bucket within its flush interval
            parts = labelled_bucket.fs.get_file_info(pafs.FileSelector("raydar/store/demo_cells/feedback",
                                                                       recursive=True, allow_not_found=True))
            if any(p.path.endswith(".parquet") for p in parts):
                break
            time.sleep(0.5)
        else:
            pytest.fail("no feedback log part reached the bucket")
    finally:
        serve.shutdown()
