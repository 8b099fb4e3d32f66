"""The main job: every stage of the pipeline on one dataset spec, in order.

    raydar run --spec datasets/demo_cells.yaml
    ray job submit --working-dir . -- python -m jobs.pipeline --spec datasets/demo_cells.yaml

Stages so far: label. Each stage caches its work, so a re-run after a crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time

from cluster import StorageRoot, connect
from cluster.connect import dashboard_url
from jobs.label import add_common_arguments, label_images, spec_from_args

STAGES = ("label",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydar run", description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--dashboard", action="store_true", help="Start the Ray dashboard with the embedded Ray.")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    storage = StorageRoot(args.storage)
    connect(args.address, dashboard=args.dashboard)
    started = time.time()

    print(f"[1/{len(STAGES)}] label: {spec.teacher.kind} teacher {spec.teacher.model}", flush=True)
    labelled = label_images(spec, storage, progress=not args.quiet)
    print(f"      {labelled.summary()}", flush=True)

    print(f"done in {time.time() - started:.0f} s; outputs under {storage.uri_of(spec.name)}")
    url = dashboard_url()
    if url:
        print(f"Ray dashboard: {url}")
    return 0 if labelled.ok_total else 1


if __name__ == "__main__":
    sys.exit(main())
