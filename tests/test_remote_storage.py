"""Images and the storage root on S3: a real S3-compatible server (moto) on 127.0.0.1, reached only
through pyarrow filesystem URIs, as a user's bucket would be. Label, then fine-tune from the labels in
the bucket into a checkpoint in the bucket."""

from __future__ import annotations

import os
import shutil
import socket
from types import SimpleNamespace

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from cluster import StorageRoot, connect
from jobs.finetune import finetune
from jobs.label import label_images
from raydar.labels import LabelStore
from tests.conftest import demo_spec, ground_truth_files, start_teacher

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raydar-test", "AWS_SECRET_ACCESS_KEY": "raydar-test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 on a free loopback port; credentials in the environment before Ray starts, so the
    read tasks on Ray's workers find them as they would on a cluster."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    connect(num_cpus=2)
    yield f"endpoint_override=127.0.0.1:{port}&scheme=http"
    ray.shutdown()
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


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
    yield SimpleNamespace(fs=fs, spec=spec, storage=storage, first=first, teacher=teacher,
                          files=ground_truth_files(folder))
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
    assert result.checkpoint.startswith("raydar/store/demo_cells/train/in-the-bucket/"), result.checkpoint
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "spec.json", "metrics.json"):
        info = labelled_bucket.fs.get_file_info(f"{result.checkpoint}/{name}")
        assert info.type == pafs.FileType.File and info.size > 0, name
