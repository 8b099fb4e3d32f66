"""Images and the storage root on S3: a real S3-compatible server (moto) on 127.0.0.1, reached only
through pyarrow filesystem URIs, as a user's bucket would be."""

from __future__ import annotations

import os
import socket

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from cluster import StorageRoot, connect
from jobs.label import label_images
from raydar.labels import LabelStore
from tests.conftest import demo_spec, ground_truth_files

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


def test_label_images_from_a_bucket_into_a_bucket(s3_endpoint, image_folder, teacher):
    fs, _ = pafs.FileSystem.from_uri(f"s3://raydar?{s3_endpoint}&allow_bucket_creation=true")
    fs.create_dir("raydar")
    for path in sorted(image_folder.iterdir()):
        with fs.open_output_stream(f"raydar/images/{path.name}") as f:
            f.write(path.read_bytes())

    spec = demo_spec(image_folder, teacher.base_url, **{"images.uri": f"s3://raydar/images?{s3_endpoint}"})
    storage = StorageRoot(f"s3://raydar/store?{s3_endpoint}")
    first = label_images(spec, storage, progress=False)

    files = ground_truth_files(image_folder)
    assert first.ok_new == len(files) == len(teacher.log)
    assert first.output == "s3://raydar/store/demo_cells/labels/labels.parquet"  # no options in what is shown
    with fs.open_input_file("raydar/store/demo_cells/labels/labels.parquet") as f:
        table = pq.read_table(f)
    assert table.num_rows == len(files)
    assert all(uri.startswith("s3://raydar/images/cells_") for uri in table["source_uri"].to_pylist())
    assert fs.get_file_info("raydar/store/demo_cells/labels/manifest.json").type == pafs.FileType.File

    teacher.reset_log()
    again = label_images(spec, storage, progress=False)  # the cache lives in the bucket too
    assert teacher.log == [] and again.cached == len(files)
    labels = LabelStore(storage.child("demo_cells", "labels")).read_labels()
    assert labels.num_rows == len(files)
